"""Request mirroring: a copy of a request sent to a shadow, fire and forget.

A matched rule with `mirror` (proxy/route_filters.py's `Mirror`) that draws a request
gets a `MirrorTap` on its `RouteResult`; the exchange asks the tap for a `MirrorCopy`
when it is routed, feeds it the request body as it streams to the real destination, and
tells it to send at the request's end. The copy goes on its own connection, from a
task of its own, with its own deadline: the caller's response and latency never wait
for it, and the shadow's response is read and dropped. As Envoy does, the copy's Host
gets a `-shadow` suffix; it also carries `x-tether-mirror: 1`. Bodies over the rule's
limit are not mirrored, copies beyond `max_in_flight` are dropped: both counted
(`MirrorSender.counts`, shown by the admin's /config_dump).
"""

from __future__ import annotations

import asyncio
import random
import ssl as ssl_module
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from proxy.balance import Endpoint
    from proxy.heads import RequestHead
    from proxy.route_filters import Mirror
    from proxy.tls import UpstreamTLS

# Where a copy goes: the shadow's endpoint, and the mTLS it is dialled with (None: plain).
Target = tuple["Endpoint", "UpstreamTLS | None"]

MIRROR_HEADER = (b"x-tether-mirror", b"1")
# Fields the copy frames itself (its body is whole: Content-Length), or replaces.
_DROP = frozenset({b"host", b"content-length", b"transfer-encoding", b"x-tether-mirror"})


def shadow_host(host: bytes) -> bytes:
    """`orders` → `orders-shadow`, `orders:8080` → `orders-shadow:8080` (Envoy's rule)."""
    name, colon, port = host.rpartition(b":")
    if colon and port.isdigit() and not host.endswith(b"]"):
        return name + b"-shadow:" + port
    return host + b"-shadow"


class MirrorSender:
    """Sends copies for one listener; bounded in flight, counted, never awaited."""

    def __init__(
        self,
        pick: Callable[[Mirror], Target | None],
        *,
        ssl: ssl_module.SSLContext | None = None,
        max_in_flight: int = 64,
        timeout: float = 5.0,
    ) -> None:
        # The shadow's endpoint for a mirror (its cluster or subset), and its mTLS.
        self.pick = pick
        self.ssl = ssl
        self.max_in_flight = max_in_flight
        self.timeout = timeout
        self.tasks: set[asyncio.Task[None]] = set()
        # Copies of HTTP/2 streams in flight (proxy/h2_mirror.py), bounded with the tasks.
        self.streams: set[object] = set()
        self.counts = {"sent": 0, "failed": 0, "too_large": 0, "busy": 0, "no_endpoint": 0}

    def tap(self, mirror: Mirror) -> MirrorTap:
        return MirrorTap(self, mirror)

    def launch(self, copy: MirrorCopy) -> None:
        if len(self.tasks) + len(self.streams) >= self.max_in_flight:
            self.counts["busy"] += 1
            return
        target = self.pick(copy.mirror)
        if target is None:
            self.counts["no_endpoint"] += 1
            return
        ep, tls = target
        data = b"".join((copy.head, b"Content-Length: %d\r\n\r\n" % copy.size, *copy.body))
        task = asyncio.get_running_loop().create_task(self._send(ep.host, ep.port, tls, data))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _send(self, host: str, port: int, tls: UpstreamTLS | None, data: bytes) -> None:
        writer = None
        try:
            async with asyncio.timeout(self.timeout):
                if tls is not None:
                    # A mesh peer, as the pools dial it: mTLS, checked by its SPIFFE ID.
                    reader, writer = await asyncio.open_connection(
                        host, port, ssl=tls.context, server_hostname=""
                    )
                    if tls.check(writer.transport) is not None:
                        self.counts["failed"] += 1
                        return
                else:
                    reader, writer = await asyncio.open_connection(host, port, ssl=self.ssl)
                writer.write(data)
                await writer.drain()
                # Read the response head and drop it: the shadow's answer is not ours.
                await reader.readuntil(b"\r\n\r\n")
            self.counts["sent"] += 1
        except (OSError, TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                ssl_module.SSLError):  # fmt: skip
            self.counts["failed"] += 1
        finally:
            if writer is not None:
                writer.transport.abort()

    def close(self) -> None:
        for task in list(self.tasks):
            task.cancel()

    def __repr__(self) -> str:
        return f"<MirrorSender in_flight={len(self.tasks)} {self.counts}>"


class MirrorTap:
    """One routed request's promise of a copy (made only when the mirror's draw hit)."""

    __slots__ = ("mirror", "sender")

    def __init__(self, sender: MirrorSender, mirror: Mirror) -> None:
        self.sender = sender
        self.mirror = mirror

    def copy(
        self, head: RequestHead, path: bytes | None, early: list[bytes], done: bool
    ) -> MirrorCopy | None:
        """The copy of `head` (origin-form `path` if the request named a URI), with the
        body pieces that arrived while it was routed (`early`; `done`: all of it).
        None when it cannot be mirrored (counted)."""
        if early and head.chunked:
            # Already framed for the upstream: not worth unframing for a copy.
            self.sender.counts["too_large"] += 1
            return None
        lines = [head.method, b" ", path if path is not None else head.target, b" HTTP/1.1\r\n"]
        host = head.host or self.mirror.service.encode()
        lines += [b"Host: ", shadow_host(host), b"\r\n"]
        for name, value in head.headers:
            if name.lower() not in _DROP:
                lines += [name, b": ", value, b"\r\n"]
        lines.append(b"x-tether-mirror: 1\r\nConnection: close\r\n")
        copy: MirrorCopy | None = MirrorCopy(self.sender, self.mirror, b"".join(lines))
        for piece in early:
            if copy is not None:
                copy = copy.feed(piece)
        if copy is not None and done:
            copy.send()
            return None
        return copy


class MirrorCopy:
    """A request copy being filled as the original's body streams."""

    __slots__ = ("body", "head", "mirror", "sender", "size")

    def __init__(self, sender: MirrorSender, mirror: Mirror, head: bytes) -> None:
        self.sender = sender
        self.mirror = mirror
        self.head = head
        self.body: list[bytes] = []
        self.size = 0

    def feed(self, data: bytes) -> MirrorCopy | None:
        """Keep a body piece; None (the copy abandoned, counted) past the limit."""
        self.size += len(data)
        if self.size > self.mirror.max_body:
            self.sender.counts["too_large"] += 1
            return None
        self.body.append(data)
        return self

    def send(self) -> None:
        self.sender.launch(self)


def pick_endpoint(
    endpoints: tuple[Endpoint, ...], now: float, rng: random.Random
) -> Endpoint | None:
    """A random available endpoint (the shadow's balancer is not told: a copy is not
    the service's traffic)."""
    up = [ep for ep in endpoints if ep.available(now)]
    return rng.choice(up) if up else None
