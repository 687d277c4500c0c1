"""The sidecar's end of the policy push: one WebSocket to the control plane, kept open.

It says hello (who this sidecar is, the services it calls, the config version and hash
it runs), then applies each snapshot through its `Applier` and answers ACK, or NACK
with the error while the last good config keeps serving. When the app starts calling a
service the control plane has not heard of, `want` sends an "interest" message. When
the control plane is away the sidecar keeps what it has (defaults, if it never got
anything) and reconnects with exponential backoff and jitter. While connected it sends
a `stats` report every `stats_interval` seconds (what the sidecar handled since the
last one), which `tether top` and the dashboard read at the control plane. The mesh
CA's trust bundle arrives after the hello and on every change of the roots, and goes
to `on_bundle` (the sidecar's identity). Protocol:
docs/push-protocol.md; messages: wire/push.py.
"""

from __future__ import annotations

import asyncio
import logging
import random
import ssl
import time
from collections.abc import Callable
from typing import Any, Protocol

import aiohttp

from proxy.backoff import BackoffPolicy
from wire import push as protocol

log = logging.getLogger("tether.policy")

# A connection that lasted this long resets the backoff, even if it ended in an error.
STABLE_AFTER = 5.0
# How often a sidecar reports its stats ("every few seconds"); the control plane takes
# reports at most twice a second per connection.
STATS_INTERVAL = 2.0

# Given a monotonic clock reading, what the sidecar handled since it was last asked.
StatsSource = Callable[[float], protocol.Stats]


class Applier(Protocol):
    """Applies a snapshot or raises with a message for the NACK; keeps the old on error."""

    version: int
    hash: str

    async def apply(self, snapshot: protocol.Snapshot) -> None: ...


class PolicyClient:
    """Keeps the push connection; `run` until `aclose`."""

    def __init__(
        self,
        url: str,
        node: protocol.NodeIdentity,
        applier: Applier,
        *,
        backoff: BackoffPolicy | None = None,
        rng: random.Random | None = None,
        heartbeat: float = 15.0,
        token: str | None = None,
        stats: StatsSource | None = None,
        stats_interval: float = STATS_INTERVAL,
        on_bundle: Callable[[protocol.Bundle], None] | None = None,
        tls: Callable[[], ssl.SSLContext | None] | None = None,
        check_server: Callable[[Any], None] | None = None,
    ) -> None:
        self.url = push_url(url)
        # The sidecar's registry token: with ACLs on, the control plane serves a hello
        # only to a token that may write the service it names.
        self._headers = {"X-Consul-Token": token} if token else {}
        self.node = node
        self.applier = applier
        self.backoff = backoff or BackoffPolicy(base=0.2, factor=2.0, cap=10.0)
        self.rng = rng or random.Random()
        self.heartbeat = heartbeat
        self.calls: dict[str, None] = {}
        self.connected = False
        self.connects = 0
        self.last_error = ""
        self.last_contact = 0.0
        self.acks = 0
        self.nacks = 0
        self.last_nack = ""
        # The answer to the last snapshot: "ack", "nack" or "none" (none received yet).
        self.last_result = "none"
        self.stats = stats
        self.stats_interval = stats_interval
        self.reports = 0
        # The mesh CA's trust bundle goes to the sidecar's identity (proxy/identity.py).
        self.on_bundle = on_bundle
        self.bundles = 0
        # On the control plane's TLS port: the sidecar's current client context (its
        # certificate is its identity there) and the check of the server's certificate.
        self.tls = tls
        self.check_server = check_server
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._session: aiohttp.ClientSession | None = None
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._connected_at = 0.0
        self._sends: set[asyncio.Task[None]] = set()

    # -- interest ------------------------------------------------------------------------

    def want(self, service: str, namespace: str) -> None:
        """Note that the app calls this service (cheap when already known)."""
        key = protocol.service_key(service, namespace)
        if key in self.calls:
            return
        self.calls[key] = None
        ws = self._ws
        if ws is not None and not ws.closed and self.connected:
            msg = protocol.encode(protocol.Interest(add=(key,)))
            task = asyncio.get_running_loop().create_task(self._send_quiet(ws, msg))
            self._sends.add(task)
            task.add_done_callback(self._sends.discard)

    async def _send_quiet(self, ws: aiohttp.ClientWebSocketResponse, text: str) -> None:
        # A send that fails means the connection is going; the hello after the reconnect
        # carries the whole interest set, so nothing is lost.
        try:
            await ws.send_str(text)
        except (ConnectionError, RuntimeError, aiohttp.ClientError):
            pass

    # -- lifecycle -----------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self.run())

    async def aclose(self) -> None:
        self._closing = True
        if self._ws is not None:
            await self._ws.close()
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        if self._session is not None:
            await self._session.close()

    async def run(self) -> None:
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None))
        attempt = 0
        while not self._closing:
            self._connected_at = 0.0
            try:
                served = await self._connect_once(self._session)
            except asyncio.CancelledError:
                raise
            except protocol.ProtocolVersionError as exc:
                # Another protocol version: retrying soon cannot help, so wait long.
                self.last_error = str(exc)
                log.error("control plane refused: %s", exc)
                served = False
                attempt = max(attempt, 6)
            except (aiohttp.ClientError, OSError, TimeoutError, protocol.PushProtocolError) as exc:
                self.last_error = f"{type(exc).__name__}: {exc}"
                served = False
            except Exception as exc:
                # Whatever went wrong, this loop must go on: it is the sidecar's only
                # way back to the control plane.
                log.exception("policy client: unexpected error")
                self.last_error = f"{type(exc).__name__}: {exc}"
                served = False
            self.connected = False
            self._ws = None
            if self._closing:
                return
            lived = time.monotonic() - self._connected_at if self._connected_at else 0.0
            if served or lived > STABLE_AFTER:
                attempt = 0
            delay = self.backoff.delay(attempt, self.rng)
            attempt += 1
            await asyncio.sleep(delay)

    async def _connect_once(self, session: aiohttp.ClientSession) -> bool:
        """One connection's life; True if it got as far as an answered hello."""
        async with session.ws_connect(
            self.url,
            protocols=(protocol.SUBPROTOCOL,),
            heartbeat=self.heartbeat,
            max_msg_size=protocol.MAX_MESSAGE,
            timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=5.0),
            headers=self._headers,
            ssl=(self.tls() or True) if self.tls is not None else True,
        ) as ws:
            if self.check_server is not None:
                self.check_server(ws.get_extra_info("ssl_object"))
            self._ws = ws
            self.connects += 1
            self._connected_at = time.monotonic()
            hello = protocol.Hello(
                node=self.node,
                calls=tuple(self.calls),
                version=self.applier.version,
                hash=self.applier.hash,
            )
            await ws.send_str(protocol.encode(hello))
            self.connected = True
            self.last_contact = time.time()
            self.last_error = ""
            reporter = asyncio.get_running_loop().create_task(self._report(ws))
            try:
                return await self._serve(ws)
            finally:
                reporter.cancel()

    async def _report(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        """Send a stats report every `stats_interval` while the connection lasts."""
        if self.stats is None:
            return
        while not ws.closed:
            # The first report covers the time since the sidecar started (after a
            # reconnect, since the last report); one is sent even when empty, as the
            # control plane divides by the seconds reports cover.
            report = self.stats(time.monotonic())
            await self._send_quiet(ws, protocol.encode(report))
            self.reports += 1
            await asyncio.sleep(self.stats_interval)

    async def _serve(self, ws: aiohttp.ClientWebSocketResponse) -> bool:
        """Answer the control plane's messages until the connection ends."""
        served = False
        async for frame in ws:
            if frame.type != aiohttp.WSMsgType.TEXT:
                if frame.type == aiohttp.WSMsgType.ERROR:
                    raise ConnectionError(str(ws.exception()))
                continue
            self.last_contact = time.time()
            msg = protocol.decode(frame.data)
            served = True
            if isinstance(msg, protocol.Snapshot):
                await self._on_snapshot(ws, msg)
            elif isinstance(msg, protocol.Bundle):
                self.bundles += 1
                if self.on_bundle is not None:
                    try:
                        self.on_bundle(msg)
                    except ValueError as exc:
                        log.error("refused the trust bundle (index %d): %s", msg.index, exc)
            elif isinstance(msg, protocol.ErrorMessage):
                if msg.code == protocol.ProtocolVersionError.code:
                    raise protocol.ProtocolVersionError(msg.message)
                raise protocol.PushProtocolError(f"control plane: {msg.code}: {msg.message}")
            else:
                raise protocol.PushProtocolError(f"unexpected {type(msg).__name__} from server")
        # A close after a quiet, current hello is a normal end (e.g. a replica
        # restarting): the hello was answered by silence, which means "current".
        return served or ws.close_code == aiohttp.WSCloseCode.GOING_AWAY

    async def _on_snapshot(
        self, ws: aiohttp.ClientWebSocketResponse, snap: protocol.Snapshot
    ) -> None:
        error = ""
        got = protocol.content_hash(protocol.canonical_json(snap.resources))
        if got != snap.hash:
            error = f"content hash {got} does not match the snapshot's {snap.hash}"
        else:
            try:
                await self.applier.apply(snap)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                error = str(exc) or type(exc).__name__
        if error:
            self.nacks += 1
            self.last_nack = error
            self.last_result = "nack"
            log.warning("refused config version %d: %s", snap.version, error)
            reply: protocol.Message = protocol.Nack(snap.version, snap.nonce, error)
        else:
            self.acks += 1
            self.last_result = "ack"
            reply = protocol.Ack(snap.version, snap.nonce)
        await ws.send_str(protocol.encode(reply))

    def describe(self) -> dict[str, Any]:
        return {
            "url": self.url,
            "connected": self.connected,
            "connects": self.connects,
            "last_error": self.last_error,
            "acks": self.acks,
            "nacks": self.nacks,
            "last_nack": self.last_nack,
            "stats_reports": self.reports,
            "bundles": self.bundles,
            "calls": list(self.calls),
        }

    def __repr__(self) -> str:
        state = "connected" if self.connected else "disconnected"
        return f"<PolicyClient {self.node.key} {state} v{self.applier.version}>"


def push_url(base: str) -> str:
    """`http://cp:15010` -> `ws://cp:15010/api/v1/push` (an explicit ws URL is kept)."""
    url = base.rstrip("/")
    if url.startswith("http://"):
        url = "ws://" + url.removeprefix("http://")
    elif url.startswith("https://"):
        url = "wss://" + url.removeprefix("https://")
    elif not url.startswith(("ws://", "wss://")):
        url = "ws://" + url
    if not url.split("://", 1)[1].count("/"):
        url += protocol.PATH
    return url
