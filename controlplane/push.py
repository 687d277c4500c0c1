"""Versioned push of policy to sidecars over WebSockets, with ACK/NACK and convergence.

`PushServer` adds two routes to the control plane's aiohttp app: the WebSocket every
sidecar keeps open (`/api/v1/push`, protocol in docs/push-protocol.md, messages in
wire/push.py) and `GET /api/v1/sidecars`, what `tether status` shows. With the
registry's ACLs on, a sidecar's hello is served only if the token it connected with may
write the service the hello names (as Consul asks of a service's proxies), and the
sidecar list only to a token that may read the push status in the KV.

Source of truth is the registry KV: the ControlPlane's one blocking query on the
policy prefix sees every change, whichever replica made it, and `install` subscribes
this server to the snapshots it publishes. The snapshot version is the config version
(the counter stored with the resources, the number `tether apply` prints), so every
replica gives the same change the same version and it means the same everywhere. Each
change is diffed per service against the previous one, and only sidecars whose needed
set (the services they call, their own, and what routes among those lead to) touches a
changed service get a new snapshot; a MeshConfig change concerns everyone. A service's
Intentions reach its own sidecars that way (every sidecar needs its own service); an
Intention named `*` is mesh-wide like MeshConfig.

Per sidecar the replica records what it sent, what was acked and nacked (with the
error) and when it last heard from it: in memory, and in the KV in a few shards per
replica written at most once per `flush_interval`, so the KV sees a bounded number of
writes however many sidecars ack at once, and any replica can answer `tether status`.

Sidecars' `stats` reports go to the replica's `MeshStats` (controlplane/meshstats.py),
at most 256 KiB each and two a second per connection (more are dropped and counted).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import time
import uuid
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import aiohttp
from aiohttp import web

from controlplane.api import route
from controlplane.auth import READ_STATUS, RegistryAuthorizer, caller_token, write_service
from controlplane.ca.provider import TrustBundle
from controlplane.ca.service import CA_SERVICE, CAService
from controlplane.ca.tls_port import PeerVerificationError, is_tls, peer_identity
from controlplane.canary import install as install_canary
from controlplane.canary import with_live_weights
from controlplane.errors import ControlPlaneError
from controlplane.meshstats import MeshStats
from controlplane.meshstats import install as install_stats
from controlplane.store import ConfigSnapshot
from wire import push as protocol

if TYPE_CHECKING:
    from controlplane.server import ConfigChange, ControlPlane

log = logging.getLogger("tether.push")

ServiceKey = tuple[str, str]  # (namespace, service)

STATUS_PREFIX = "tether/push/sidecars/"
STATUS_SHARDS = 16
HELLO_TIMEOUT = 10.0
# A replica whose shards were not rewritten for this long is taken as gone.
STALE_AFTER = 60.0
# ... and its status is deleted after this long (a replica that was killed).
FORGET_AFTER = 3600.0
# Closure depth when routes send to other services (routes to routes to ...).
MAX_ROUTE_DEPTH = 8
# A connection's stats reports closer together than this are dropped.
MIN_STATS_GAP = 0.5


# -- what each sidecar needs -------------------------------------------------------------


def concern(doc: Mapping[str, Any]) -> ServiceKey | None:
    """The service a stored document configures; None for mesh-wide kinds (and for
    Intentions of every service, `*`, which every sidecar may need)."""
    if doc.get("kind") == "MeshConfig":
        return None
    meta = doc.get("metadata")
    meta = meta if isinstance(meta, dict) else {}
    if doc.get("kind") == "Intention" and meta.get("name") == "*":
        return None
    return (str(meta.get("namespace") or "default"), str(meta.get("name") or ""))


def route_targets(doc: Mapping[str, Any], namespace: str) -> set[ServiceKey]:
    """Services a Route's rules send to (same namespace)."""
    out: set[ServiceKey] = set()
    if doc.get("kind") != "Route":
        return out
    spec = doc.get("spec")
    rules = spec.get("rules") if isinstance(spec, dict) else None
    for rule in rules if isinstance(rules, list) else ():
        dest = rule.get("destination") if isinstance(rule, dict) else None
        svc = dest.get("service") if isinstance(dest, dict) else None
        if isinstance(svc, str) and svc:
            out.add((namespace, svc))
    return out


def _sort_key(doc: Mapping[str, Any]) -> tuple[str, str, str]:
    meta = doc.get("metadata")
    meta = meta if isinstance(meta, dict) else {}
    return (str(doc.get("kind")), str(meta.get("namespace") or ""), str(meta.get("name") or ""))


class ResourceIndex:
    """The stored resources at one KV index, grouped by the service they configure."""

    def __init__(self, docs: Iterable[Mapping[str, Any]] = (), version: int = 0) -> None:
        self.version = version
        self.mesh: list[dict[str, Any]] = []
        self.by_service: dict[ServiceKey, list[dict[str, Any]]] = {}
        self.refs: dict[ServiceKey, set[ServiceKey]] = {}
        for doc in sorted(docs, key=_sort_key):
            key = concern(doc)
            if key is None:
                self.mesh.append(dict(doc))
                continue
            self.by_service.setdefault(key, []).append(dict(doc))
            targets = route_targets(doc, key[0]) - {key}
            if targets:
                self.refs.setdefault(key, set()).update(targets)
        self.service_json = {k: protocol.canonical_json(v) for k, v in self.by_service.items()}
        self.mesh_json = protocol.canonical_json(self.mesh)
        self._bodies: dict[frozenset[ServiceKey], tuple[str, str]] = {}

    def needed(self, services: Iterable[ServiceKey]) -> frozenset[ServiceKey]:
        """`services` and everything routes among them lead to."""
        out = set(services)
        frontier = set(out)
        for _ in range(MAX_ROUTE_DEPTH):
            nxt = set()
            for key in frontier:
                nxt |= self.refs.get(key, set())
            frontier = nxt - out
            if not frontier:
                break
            out |= frontier
        return frozenset(out)

    def body(self, needed: frozenset[ServiceKey]) -> tuple[str, str]:
        """(canonical resources JSON, content hash) of a sidecar's snapshot; cached."""
        got = self._bodies.get(needed)
        if got is None:
            docs = list(self.mesh)
            for key in sorted(needed):
                docs.extend(self.by_service.get(key, ()))
            text = protocol.canonical_json(docs)
            got = (text, protocol.content_hash(text))
            self._bodies[needed] = got
        return got

    def changes(self, old: ResourceIndex) -> tuple[set[ServiceKey], bool]:
        """Services whose documents differ from `old`'s, and whether MeshConfig did."""
        changed = {
            k
            for k in self.service_json.keys() | old.service_json.keys()
            if self.service_json.get(k) != old.service_json.get(k)
        }
        return changed, self.mesh_json != old.mesh_json


# -- per sidecar -------------------------------------------------------------------------


@dataclass
class SidecarRecord:
    """What a replica knows of one sidecar; also its form in `GET /api/v1/sidecars`."""

    id: str
    service: str
    namespace: str
    instance: str
    zone: str
    replica: str
    connected: bool = True
    sent_version: int = 0
    sent_hash: str = ""
    acked_version: int = 0
    acked_hash: str = ""
    nacked_version: int = 0
    error: str = ""
    last_seen: float = 0.0
    connected_since: float = 0.0
    sent_nonce: str = ""
    # When the sidecar's mesh certificate expires (Unix time, from its stats reports);
    # None until one says (or without mTLS).
    cert_expiry: float | None = None

    # -- the per-sidecar exchange, without I/O ----------------------------------------

    def offer(self, version: int, hash_: str, nonce: str) -> bool:
        """A snapshot is ready for this sidecar: True if it must be sent (new content)."""
        if hash_ == self.sent_hash:
            return False
        self.sent_version, self.sent_hash, self.sent_nonce = version, hash_, nonce
        return True

    def answer(self, msg: protocol.Ack | protocol.Nack) -> bool:
        """Record an ACK or NACK; False (ignored) when it answers a superseded push."""
        if msg.nonce != self.sent_nonce:
            return False
        if isinstance(msg, protocol.Ack):
            self.acked_version, self.acked_hash = msg.version, self.sent_hash
            self.error = ""
        else:
            self.nacked_version, self.error = msg.version, msg.error[:2000]
        return True

    @property
    def state(self) -> str:
        if not self.connected:
            return "disconnected"
        if self.error:
            return "nacked"
        if self.sent_hash and self.acked_hash == self.sent_hash:
            return "acked"
        return "pending"

    def to_dict(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d["state"] = self.state
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SidecarRecord:
        names = cls.__dataclass_fields__
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass(eq=False)
class Session:
    """One connected sidecar."""

    ws: web.WebSocketResponse
    node: protocol.NodeIdentity
    record: SidecarRecord
    calls: set[ServiceKey] = field(default_factory=set)
    needed: frozenset[ServiceKey] = frozenset()
    pending: str | None = None
    # The trust bundle to send (encoded), ahead of any snapshot.
    bundle: str | None = None
    writer: asyncio.Task[None] | None = None
    last_stats: float = float("-inf")  # monotonic time of the last report taken


# -- the server ----------------------------------------------------------------------------


class PushServer:
    """Pushes snapshots to the sidecars connected to this replica."""

    def __init__(
        self,
        consul: Any = None,
        *,
        status_prefix: str = STATUS_PREFIX,
        replica: str | None = None,
        flush_interval: float = 1.0,
        heartbeat_interval: float = 15.0,
        ws_heartbeat: float = 20.0,
        token: str | None = None,
        authorizer: RegistryAuthorizer | None = None,
    ) -> None:
        # The registry client status records are written with (the control plane's own).
        self.consul = consul
        # Judges each sidecar's own token at its hello (None: no check, for tests of the
        # exchange alone; `install` always passes the control plane's).
        self.authorizer = authorizer
        self.status_prefix = status_prefix
        self.replica = replica or f"{os.uname().nodename}-{uuid.uuid4().hex[:8]}"
        self.flush_interval = flush_interval
        self.heartbeat_interval = heartbeat_interval
        self.ws_heartbeat = ws_heartbeat
        self.token = token
        self.index = ResourceIndex()
        self.loaded = asyncio.Event()
        self.sessions: dict[str, Session] = {}
        # Recently gone sidecars, kept so status shows their last state.
        self.records: dict[str, SidecarRecord] = {}
        self._nonces = itertools.count(1)
        self._dirty: set[int] = set()
        self._tasks: list[asyncio.Task[None]] = []
        self._closers: set[asyncio.Task[bool]] = set()
        self._closing = False
        self.pushes = 0
        self.kv_writes = 0
        # The stats reports of this replica's sidecars (what `tether top` reads).
        self.stats = MeshStats()
        self.stats_dropped = 0
        # The mesh CA's trust bundle, encoded (None while the CA is off or starting).
        self.bundle: str | None = None
        # The mesh CA, whose certificates identify sidecars on the TLS port.
        self.ca: CAService | None = None

    def set_bundle(self, bundle: protocol.Bundle) -> None:
        """A new trust bundle: every connected sidecar gets it (CAService.subscribe_bundle)."""
        self.bundle = protocol.encode(bundle)
        for s in self.sessions.values():
            self._send_bundle(s)

    def _send_bundle(self, s: Session) -> None:
        if self.bundle is None:
            return
        s.bundle = self.bundle
        if s.writer is None or s.writer.done():
            s.writer = asyncio.get_running_loop().create_task(self._write(s))

    # -- wiring ----------------------------------------------------------------------------

    def start(self) -> None:
        self._tasks.append(asyncio.get_running_loop().create_task(self._flusher()))

    async def aclose(self) -> None:
        if self._closing:
            return
        self._closing = True
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        # "Going away" tells sidecars to reconnect (to another replica, or this one
        # restarted) without counting it as a failure; slow peers get 5 s at most.
        closing = [
            s.ws.close(code=aiohttp.WSCloseCode.GOING_AWAY, message=b"shutting down")
            for s in list(self.sessions.values())
        ]
        if closing:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(
                    asyncio.gather(*closing, return_exceptions=True), timeout=5.0
                )
        # Leave the status in the KV saying these sidecars are no longer connected here.
        now = time.time()
        for s in self.sessions.values():
            s.record.connected = False
            s.record.last_seen = now
            self._mark(s.record)
        with contextlib.suppress(Exception):
            await self._flush()

    # -- resources -------------------------------------------------------------------------

    def update(self, new: ResourceIndex) -> int:
        """Make `new` current and push to the sidecars it concerns; returns how many."""
        old, self.index = self.index, new
        first = not self.loaded.is_set()
        self.loaded.set()
        changed, mesh_changed = new.changes(old)
        if not (changed or mesh_changed) and not first:
            return 0
        pushed = 0
        for s in self.sessions.values():
            if not s.record.connected:
                continue
            s.needed = new.needed(s.calls)
            if mesh_changed or first or not s.needed.isdisjoint(changed):
                pushed += self._offer(s)
        if pushed:
            log.info("push: version %d to %d sidecars", new.version, pushed)
        return pushed

    # -- sending ---------------------------------------------------------------------------

    def _offer(self, s: Session) -> int:
        """Send `s` its snapshot if its content differs from what it last got."""
        text, hash_ = self.index.body(s.needed)
        rec = s.record
        nonce = f"{self.replica[-8:]}-{next(self._nonces)}"
        if not rec.offer(self.index.version, hash_, nonce):
            return 0
        self._mark(rec)
        s.pending = protocol.encode_snapshot(rec.sent_version, hash_, nonce, text)
        if s.writer is None or s.writer.done():
            s.writer = asyncio.get_running_loop().create_task(self._write(s))
        self.pushes += 1
        return 1

    async def _write(self, s: Session) -> None:
        # One writer per session: a slow sidecar gets only the newest snapshot, and
        # never holds up the others.
        while (s.pending is not None or s.bundle is not None) and not s.ws.closed:
            text: str | None
            if s.bundle is not None:
                text, s.bundle = s.bundle, None
            else:
                text, s.pending = s.pending, None
            assert text is not None
            try:
                await s.ws.send_str(text)
            except (ConnectionError, RuntimeError):
                return

    # -- the WebSocket ---------------------------------------------------------------------

    async def handle_push(self, request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse(
            protocols=(protocol.SUBPROTOCOL,),
            heartbeat=self.ws_heartbeat,
            max_msg_size=protocol.MAX_MESSAGE,
        )
        await ws.prepare(request)
        session: Session | None = None
        try:
            try:
                first = await ws.receive(timeout=HELLO_TIMEOUT)
            except TimeoutError:
                await self._refuse(ws, "bad_message", "no hello within 10s")
                return ws
            if first.type != aiohttp.WSMsgType.TEXT:
                await self._refuse(ws, "bad_message", "the first message must be a text hello")
                return ws
            try:
                hello = protocol.decode(first.data)
            except protocol.PushProtocolError as exc:
                await self._refuse(ws, exc.code, str(exc))
                return ws
            if not isinstance(hello, protocol.Hello):
                await self._refuse(ws, "bad_message", "the first message must be a hello")
                return ws
            if is_tls(request):
                refused = await self._check_certificate(request, hello)
                if refused is not None:
                    await self._refuse(ws, "permission_denied", f"{hello.node.key}: {refused}")
                    return ws
            elif self.authorizer is not None:
                try:
                    await self.authorizer.require(
                        caller_token(request.headers), write_service(hello.node.service)
                    )
                except ControlPlaneError as exc:
                    await self._refuse(ws, exc.code, f"{hello.node.key}: {exc}")
                    return ws
            await self.loaded.wait()
            session = self._open(ws, hello)
            async for frame in ws:
                if frame.type != aiohttp.WSMsgType.TEXT:
                    continue
                session.record.last_seen = time.time()
                try:
                    msg = protocol.decode(frame.data)
                except protocol.PushProtocolError as exc:
                    await self._refuse(ws, exc.code, str(exc))
                    break
                if isinstance(msg, protocol.Stats):
                    self._on_stats(session, msg, len(frame.data))
                    continue
                self._on_message(session, msg)
        finally:
            if session is not None:
                self._close(session)
        return ws

    async def _check_certificate(self, request: web.Request, hello: protocol.Hello) -> str | None:
        """On the TLS port a sidecar is who its mesh certificate says: it must have one,
        and say hello as that service in that namespace (so it gets only that config)."""
        provider = self.ca.provider if self.ca is not None else None
        if provider is None:
            return "the mesh CA is not running"
        try:
            ident = await peer_identity(request, provider)
        except (PeerVerificationError, ControlPlaneError) as exc:
            return f"its certificate is refused: {exc}"
        if ident is None:
            return "the push on the TLS port takes the sidecar's mesh certificate"
        node = hello.node
        if (ident.service, ident.namespace) != (node.service, node.namespace):
            return f"its certificate is {ident}, not {node.service} in {node.namespace}"
        return None

    async def _refuse(self, ws: web.WebSocketResponse, code: str, message: str) -> None:
        log.warning("push: refusing a sidecar: %s: %s", code, message)
        with contextlib.suppress(Exception):
            await ws.send_str(protocol.encode(protocol.ErrorMessage(code, message)))
            await ws.close(code=aiohttp.WSCloseCode.POLICY_VIOLATION, message=code.encode())

    def _open(self, ws: web.WebSocketResponse, hello: protocol.Hello) -> Session:
        node = hello.node
        now = time.time()
        old = self.sessions.get(node.key)
        if old is not None:
            # The same sidecar again (a reconnect raced its old connection's end).
            old.record.connected = False
            task = asyncio.get_running_loop().create_task(old.ws.close())
            self._closers.add(task)
            task.add_done_callback(self._closers.discard)
        rec = SidecarRecord(
            id=node.key,
            service=node.service,
            namespace=node.namespace,
            instance=node.instance,
            zone=node.zone,
            replica=self.replica,
            last_seen=now,
            connected_since=now,
            # What it runs already counts as sent and acked.
            sent_version=hello.version,
            sent_hash=hello.hash,
            acked_version=hello.version if hello.hash else 0,
            acked_hash=hello.hash,
        )
        s = Session(ws=ws, node=node, record=rec)
        s.calls = {(node.namespace, node.service)}
        s.calls.update(_keys(hello.calls))
        s.needed = self.index.needed(s.calls)
        self.sessions[node.key] = s
        self.records.pop(node.key, None)
        self._mark(rec)
        self._send_bundle(s)
        self._offer(s)
        return s

    def _on_message(self, s: Session, msg: protocol.Message) -> None:
        rec = s.record
        if isinstance(msg, protocol.Ack | protocol.Nack):
            # An answer to a snapshot superseded since is ignored: the next one counts.
            if rec.answer(msg):
                self._mark(rec)
                if isinstance(msg, protocol.Nack):
                    log.warning("push: %s refused version %d: %s", rec.id, msg.version, msg.error)
        elif isinstance(msg, protocol.Interest):
            new = set(_keys(msg.add)) - s.calls
            if new:
                s.calls |= new
                s.needed = self.index.needed(s.calls)
                self._offer(s)

    def _on_stats(self, s: Session, msg: protocol.Stats, size: int) -> None:
        """Keep a stats report, within the size and rate a connection may send."""
        now = time.monotonic()
        if size > protocol.MAX_STATS_BYTES or now - s.last_stats < MIN_STATS_GAP:
            self.stats_dropped += 1
            return
        s.last_stats = now
        if msg.cert_expiry is not None and msg.cert_expiry != s.record.cert_expiry:
            s.record.cert_expiry = msg.cert_expiry  # a new certificate: status rewritten
            self._mark(s.record)
        node = s.node
        self.stats.record(node.key, protocol.service_key(node.service, node.namespace), msg)

    def _close(self, s: Session) -> None:
        rec = s.record
        if self.sessions.get(s.node.key) is s:
            del self.sessions[s.node.key]
            rec.connected = False
            rec.last_seen = time.time()
            self.records[rec.id] = rec
            self._mark(rec)
        if s.writer is not None:
            s.writer.cancel()

    # -- status ----------------------------------------------------------------------------

    def _shard(self, sidecar_id: str) -> int:
        return zlib.crc32(sidecar_id.encode()) % STATUS_SHARDS

    def _mark(self, rec: SidecarRecord) -> None:
        self._dirty.add(self._shard(rec.id))

    def local_records(self) -> list[SidecarRecord]:
        now = time.time()
        out = []
        for s in self.sessions.values():
            if s.record.connected:
                s.record.last_seen = now
            out.append(s.record)
        out.extend(self.records.values())
        return out

    async def _flusher(self) -> None:
        last_full = 0.0
        while not self._closing:
            await asyncio.sleep(self.flush_interval)
            now = time.monotonic()
            full = now - last_full >= self.heartbeat_interval
            if full:
                # Rewriting every shard now and then says "this replica is alive" and
                # refreshes last-seen of sidecars that were only quiet.
                self._dirty = set(range(STATUS_SHARDS))
                last_full = now
            try:
                await self._flush()
                if full:
                    await self._forget_gone_replicas()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.info("push: status not written (%s); retrying", exc)

    async def _flush(self) -> None:
        if not self._dirty:
            return
        dirty, self._dirty = self._dirty, set()
        shards: dict[int, list[dict[str, Any]]] = {i: [] for i in dirty}
        for rec in self.local_records():
            i = self._shard(rec.id)
            if i in shards:
                shards[i].append(rec.to_dict())
        try:
            for i, recs in shards.items():
                key = f"{self.status_prefix}{self.replica}/{i:02d}"
                value = json.dumps(
                    {"replica": self.replica, "updated": time.time(), "sidecars": recs},
                    separators=(",", ":"),
                )
                await self.consul.kv.put(key, value, token=self.token)
                self.kv_writes += 1
        except BaseException:
            self._dirty |= dirty
            raise
        # Forget gone sidecars after a while (their record stays in the KV until then).
        cutoff = time.time() - 600
        for sid in [k for k, r in self.records.items() if r.last_seen < cutoff]:
            del self.records[sid]

    async def _forget_gone_replicas(self) -> None:
        """Delete the status shards of replicas silent for FORGET_AFTER (killed ones)."""
        _, items = await self.consul.kv.get(self.status_prefix, recurse=True, keys=True)
        replicas = {k[len(self.status_prefix) :].split("/", 1)[0] for k in items or ()}
        replicas.discard(self.replica)
        now = time.time()
        for rid in sorted(replicas)[:50]:
            _, shard = await self.consul.kv.get(f"{self.status_prefix}{rid}/00")
            updated = 0.0
            with contextlib.suppress(ValueError, TypeError, AttributeError):
                updated = float(json.loads(shard["Value"]).get("updated", 0))
            if shard is not None and now - updated > FORGET_AFTER:
                log.info("push: forgetting the status of replica %s (silent)", rid)
                await self.consul.kv.delete(f"{self.status_prefix}{rid}/", recurse=True)

    async def all_records(self) -> list[SidecarRecord]:
        """Every sidecar any replica knows (this replica's own view is freshest)."""
        now = time.time()
        merged: dict[str, SidecarRecord] = {}
        try:
            _, items = await self.consul.kv.get(self.status_prefix, recurse=True, token=self.token)
        except Exception as exc:
            log.info("push: status of other replicas unreadable: %s", exc)
            items = None
        for item in items or ():
            try:
                shard = json.loads(item.get("Value") or b"{}")
            except ValueError:
                continue
            if not isinstance(shard, dict) or shard.get("replica") == self.replica:
                continue
            stale = now - float(shard.get("updated", 0)) > STALE_AFTER
            for d in shard.get("sidecars", ()):
                rec = SidecarRecord.from_dict(d)
                if stale:
                    rec.connected = False
                prev = merged.get(rec.id)
                if prev is None or _newer(rec, prev):
                    merged[rec.id] = rec
        for rec in self.local_records():
            prev = merged.get(rec.id)
            if prev is None or _newer(rec, prev):
                merged[rec.id] = rec
        return sorted(merged.values(), key=lambda r: (r.namespace, r.service, r.instance))

    async def handle_sidecars(self, request: web.Request) -> web.Response:
        recs = await self.all_records()
        service = request.query.get("service")
        namespace = request.query.get("namespace")
        if service:
            recs = [r for r in recs if r.service == service]
        if namespace:
            recs = [r for r in recs if r.namespace == namespace]
        body = {
            "version": self.index.version,
            "replica": self.replica,
            "sidecars": [r.to_dict() for r in recs],
        }
        return web.json_response(body)

    def describe(self) -> dict[str, Any]:
        return {
            "replica": self.replica,
            "version": self.index.version,
            "sidecars": len(self.sessions),
            "pushes": self.pushes,
            "kv_writes": self.kv_writes,
            "stats_reports": self.stats.reports,
            "stats_dropped": self.stats_dropped,
        }

    def __repr__(self) -> str:
        return f"<PushServer {self.replica} v{self.index.version} sidecars={len(self.sessions)}>"


PUSH_SERVER: web.AppKey[PushServer] = web.AppKey("push_server")


def index_of(snap: ConfigSnapshot) -> ResourceIndex:
    """The ResourceIndex of a store snapshot; its version is the config version. A
    TrafficSplit under a canary analysis goes out with the analysis's live weights
    (controlplane/canary.py), not the ones written."""
    docs = [
        with_live_weights(res.to_dict(), snap.status(key))
        for key, res in sorted(snap.resources.items())
    ]
    for d in docs:
        # Server-set, and not policy: a sidecar's snapshot does not change with it.
        d["metadata"].pop("generation", None)
    return ResourceIndex(docs, snap.version)


def install(cp: ControlPlane) -> PushServer:
    """Plug a push server into a ControlPlane: routes, start/stop, its snapshots."""

    server = PushServer(authorizer=cp.authorizer)

    async def on_change(change: ConfigChange) -> None:
        server.update(index_of(change.current))

    async def first_sync() -> None:
        # An empty KV publishes no change, so the first snapshot is taken from here.
        await cp.synced.wait()
        server.update(index_of(cp.snapshot))

    async def on_bundle(bundle: TrustBundle) -> None:
        server.set_bundle(
            protocol.Bundle(bundle.trust_domain, tuple(bundle.root_pems), bundle.index)
        )

    ca = cp.app.get(CA_SERVICE)
    if ca is not None:
        ca.subscribe_bundle(on_bundle)
        server.ca = ca

    async def _start(_app: web.Application) -> None:
        server.consul = cp.consul
        server.start()
        server._tasks.append(asyncio.get_running_loop().create_task(first_sync()))
        cp.subscribe(on_change)

    async def _stop(_app: web.Application) -> None:
        await server.aclose()

    # The WebSocket checks the sidecar's token at its hello, once it names its service.
    route(cp.app, "GET", protocol.PATH, server.handle_push, None)
    route(cp.app, "GET", "/api/v1/sidecars", server.handle_sidecars, READ_STATUS)
    publisher = install_stats(cp, server.stats, lambda: server.replica)

    async def mesh_numbers() -> Any:
        return (await publisher.mesh())[0]

    # Canary analyses read the same numbers `GET /api/v1/stats` serves.
    install_canary(cp, mesh_numbers)
    cp.app.on_startup.append(_start)
    cp.app.on_shutdown.append(_stop)
    cp.app[PUSH_SERVER] = server
    return server


def _newer(a: SidecarRecord, b: SidecarRecord) -> bool:
    """Whether `a` is the more recent word on a sidecar (a live connection wins)."""
    if a.connected != b.connected:
        return a.connected
    return a.last_seen >= b.last_seen


def _keys(names: Sequence[str]) -> list[ServiceKey]:
    out = []
    for name in names:
        service, namespace = protocol.split_service_key(name)
        out.append((namespace, service))
    return out
