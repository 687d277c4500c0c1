"""Dispatch: from a request head to the pool that carries it (outbound and inbound routers).

Outbound, the levels are Linkerd's: the *logical* target is the name the app dialled
(absolute-form URI or `Host`, see proxy/target.py); the *concrete* target is the
cluster the directory returns for it; the *endpoint* is what the cluster's balancer
picks, and each endpoint address has its own keep-alive pool. Egress hosts get a pool
per host:port. The first request to a service the directory has not seen waits for
discovery (`ServiceDirectory.resolve`, one Task then); every later one is answered
synchronously from `lookup`.

Inbound, every request goes to the local app's pool.
"""

from __future__ import annotations

import asyncio
import ssl as ssl_module
import time
from typing import Literal

from proxy import local_reply
from proxy.balance import PickContext
from proxy.cluster import Cluster, ServiceDirectory
from proxy.codec import RequestHead
from proxy.downstream import PAUSE_CONNECTING, RNG, DownstreamConnection
from proxy.egress import EgressGuard
from proxy.errors import BadMessageError
from proxy.pool import Pool, PoolPolicy
from proxy.stats import DestinationStats, ProxyStats
from proxy.target import Authority, parse_authority, split_absolute_form

_NO_HASH = PickContext()
# How long a two-label name the directory did not know stays classified as egress.
NOT_MESH_TTL = 5.0
_MAX_CACHED_AUTHORITIES = 4096
_LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})


def _pick_context(conn: DownstreamConnection) -> PickContext:
    """What a hashing balancer may read of the request: its fields (by case-insensitive
    name; repeated fields joined, cookies with "; "), the client's address, the path.

    One context per connection, made at its first hashed request: the source address is
    the connection's, `header` reads the request being routed when it is called, and only
    `path` is set per request. (The connection drops it when it closes: the context's
    `header` refers back to the connection.)"""
    ctx = conn.pick_ctx
    if ctx is None:

        def header(name: str) -> str | None:
            # Read lazily: a source-address hash must not make a cached head parse its
            # fields.
            head = conn.head
            if head is None:
                return None
            key = name.lower().encode("latin-1")
            values = [v for n, v in head.headers if n.lower() == key]
            if not values:
                return None
            return (b"; " if key == b"cookie" else b", ").join(values).decode("latin-1")

        ctx = conn.pick_ctx = PickContext(source_ip=conn.peer.decode("latin-1"), header=header)
    ctx.path = conn.path.decode("latin-1")
    return ctx


def _absolute_to_origin(head: RequestHead, conn: DownstreamConnection) -> bytes | None:
    """The authority a request names; rewrites absolute-form to origin-form on `conn`."""
    target = head.target
    if target == b"*":
        return head.host
    split = split_absolute_form(target)
    if split is None:
        return head.host
    authority, path = split
    conn.path = path
    # RFC 9112 3.2.2: the URI's authority wins, and Host is replaced by it.
    head.set_host(authority)
    return authority


class OutboundRouter:
    """Routes the app's calls: mesh services by name, other hosts as egress."""

    name = "outbound"

    def __init__(
        self,
        directory: ServiceDirectory,
        stats: ProxyStats,
        *,
        namespace: str = "default",
        egress: Literal["allow", "deny"] = "allow",
        pool_policy: PoolPolicy | None = None,
        upstream_ssl: ssl_module.SSLContext | None = None,
        resolve_timeout: float = 5.0,
        egress_guard: EgressGuard | None = None,
    ) -> None:
        self.directory = directory
        # What egress may not reach (proxy/egress.py); checked on every egress connection.
        self.egress_guard = egress_guard if egress_guard is not None else EgressGuard()
        self.stats = stats
        self.namespace = namespace
        self.egress = egress
        self.pool_policy = pool_policy or PoolPolicy()
        self.upstream_ssl = upstream_ssl
        self.resolve_timeout = resolve_timeout
        self.listen_port = 0  # set by the listener, to refuse requests to itself
        self._authorities: dict[bytes, Authority] = {}
        self._pools: dict[tuple[str, int], Pool] = {}
        self._egress_pools: dict[tuple[str, int], Pool] = {}
        self._not_mesh: dict[tuple[str, str], float] = {}
        self._dstats: dict[str, DestinationStats] = {}
        self._egress_stats = stats.destination(self.name, "egress")
        self._tasks: set[asyncio.Task[None]] = set()

    def _authority(self, raw: bytes, default_port: int = 80) -> Authority:
        auth = self._authorities.get(raw)
        if auth is None:
            auth = parse_authority(raw, default_port)
            if len(self._authorities) >= _MAX_CACHED_AUTHORITIES:
                self._authorities.clear()
            self._authorities[raw] = auth
        return auth

    def route(self, conn: DownstreamConnection, head: RequestHead) -> Pool | None:
        try:
            # Origin-form (the app named the service in Host) is the common case.
            raw = head.host if head.target[0] == 47 else _absolute_to_origin(head, conn)
            if raw is None:
                raise BadMessageError("the request names no host (no Host, no absolute URI)")
            auth = self._authorities.get(raw) or self._authority(raw)
        except BadMessageError as e:
            conn.local_reply(e.reason, e.message, status=e.status)
            return None
        service = auth.service
        if service is not None:
            ns = auth.namespace or self.namespace
            cluster = self.directory.lookup(ns, service)
            if cluster is not None:
                return self._to_cluster(conn, cluster)
            if auth.namespace is None:
                self._resolve_later(conn, ns, service, None)
                return None
            expiry = self._not_mesh.get((ns, service))
            if expiry is None or expiry < conn.start:
                self._resolve_later(conn, ns, service, auth)
                return None
        return self._egress(conn, auth)

    def _to_cluster(self, conn: DownstreamConnection, cluster: Cluster) -> Pool | None:
        name = cluster.name
        dstats = self._dstats.get(name)
        if dstats is None:
            dstats = self._dstats[name] = self.stats.destination(self.name, name)
        conn.dstats = dstats
        balancer = cluster.balancer
        # Only the hashing balancers read the request; the others share one empty context.
        ctx = _pick_context(conn) if balancer.uses_context else _NO_HASH
        ep = balancer.pick(ctx, conn.start, RNG)
        if ep is None:
            conn.local_reply(
                local_reply.NO_HEALTHY_UPSTREAM, f"service {name} has no healthy endpoint"
            )
            return None
        # The balancer hears of the request now, not once a connection is attached: a
        # burst of requests to an endpoint still connecting must see it busy.
        conn.endpoint = ep
        conn.balancer = tracker = balancer.tracker  # a layer may delegate on_start/on_end
        tracker.on_start(ep, conn.start)
        key = (ep.host, ep.port)
        pool = self._pools.get(key)
        if pool is None:
            pool = self._pools[key] = Pool(
                ep.host,
                ep.port,
                self.pool_policy,
                ssl=self.upstream_ssl,
                name=f"{name}/{ep.host}:{ep.port}",
            )
        return pool

    def _egress(self, conn: DownstreamConnection, auth: Authority) -> Pool | None:
        conn.dstats = self._egress_stats
        if self.egress == "deny":
            conn.local_reply(local_reply.EGRESS_DENIED, f"egress to {auth.host} is denied")
            return None
        if auth.host in _LOOPBACK and auth.port == self.listen_port:
            conn.local_reply(local_reply.PROXY_LOOP)
            return None
        key = (auth.host, auth.port)
        pool = self._egress_pools.get(key)
        if pool is None:
            pool = self._egress_pools[key] = Pool(
                auth.host,
                auth.port,
                self.pool_policy,
                name=f"egress/{auth.host}:{auth.port}",
                guard=self.egress_guard,
            )
        return pool

    def _resolve_later(
        self, conn: DownstreamConnection, ns: str, service: str, egress: Authority | None
    ) -> None:
        conn.set_pause(PAUSE_CONNECTING)
        task = asyncio.get_running_loop().create_task(
            self._resolve(conn, conn.exchange, ns, service, egress)
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _resolve(
        self,
        conn: DownstreamConnection,
        exchange: int,
        ns: str,
        service: str,
        egress: Authority | None,
    ) -> None:
        try:
            cluster = await asyncio.wait_for(
                self.directory.resolve(ns, service), self.resolve_timeout
            )
        except TimeoutError:
            if exchange == conn.exchange and not conn.closed:
                # The name is the app's, maybe no service at all: no label of its own.
                conn.dstats = None
                conn.local_reply(
                    local_reply.NO_HEALTHY_UPSTREAM,
                    f"discovery did not answer about {service}.{ns} in {self.resolve_timeout}s",
                )
                conn.routed(exchange, None)
            return
        if exchange != conn.exchange or conn.closed:
            return
        pool: Pool | None
        if cluster is not None:
            pool = self._to_cluster(conn, cluster)
        elif egress is not None:
            self._not_mesh[(ns, service)] = time.monotonic() + NOT_MESH_TTL
            pool = self._egress(conn, egress)
        else:
            conn.dstats = None  # counted under local replies: names are unbounded
            conn.local_reply(
                local_reply.UNKNOWN_SERVICE, f"no service {service!r} in namespace {ns!r}"
            )
            pool = None
        conn.routed(exchange, pool)

    def connect(self, conn: DownstreamConnection, head: RequestHead) -> tuple[str, int] | None:
        conn.dstats = self._egress_stats
        try:
            auth = parse_authority(head.target, 443)
        except BadMessageError as e:
            conn.local_reply(e.reason, e.message, status=e.status, close=True)
            return None
        if auth.service is not None and (
            auth.namespace is None
            or self.directory.lookup(auth.namespace, auth.service) is not None
        ):
            conn.local_reply(
                local_reply.BAD_REQUEST,
                f"CONNECT tunnels egress only; {auth.host} is a mesh name (use http://)",
                close=True,
            )
            return None
        if self.egress == "deny":
            conn.local_reply(
                local_reply.EGRESS_DENIED, f"egress to {auth.host} is denied", close=True
            )
            return None
        return auth.host, auth.port

    def sweep(self, now: float) -> None:
        for pools in (self._pools, self._egress_pools):
            for key, pool in list(pools.items()):
                pool.sweep(now)
                if pool.size == 0 and not pool.waiters:
                    del pools[key]

    def pools(self) -> list[Pool]:
        return [*self._pools.values(), *self._egress_pools.values()]

    def close(self) -> None:
        for pool in self.pools():
            pool.close()

    def __repr__(self) -> str:
        return (
            f"<OutboundRouter ns={self.namespace} egress={self.egress}"
            f" pools={len(self._pools)} egress_pools={len(self._egress_pools)}>"
        )


class InboundRouter:
    """Routes other sidecars' requests to the local app (one pool)."""

    name = "inbound"
    egress_guard: EgressGuard | None = None  # no egress here: CONNECT is refused

    def __init__(
        self,
        app_port: int,
        stats: ProxyStats,
        *,
        app_host: str = "127.0.0.1",
        pool_policy: PoolPolicy | None = None,
        app_ssl: ssl_module.SSLContext | None = None,
    ) -> None:
        self.pool = Pool(app_host, app_port, pool_policy or PoolPolicy(), ssl=app_ssl, name="app")
        self.dstats = stats.destination(self.name, "app")
        # Host values seen to be well-formed authorities (bounded like the outbound's).
        self._hosts: set[bytes] = set()

    def route(self, conn: DownstreamConnection, head: RequestHead) -> Pool | None:
        conn.dstats = self.dstats
        try:
            if head.target[0] != 47:  # not origin-form (b"/"); llhttp never gives one empty
                _absolute_to_origin(head, conn)
            host = head.host
            if host is not None and host not in self._hosts:
                # The same authority syntax the outbound listener requires: the app must
                # not see a Host that carries a path or userinfo.
                parse_authority(host)
                if len(self._hosts) >= _MAX_CACHED_AUTHORITIES:
                    self._hosts.clear()
                self._hosts.add(host)
        except BadMessageError as e:
            conn.local_reply(e.reason, e.message, status=e.status)
            return None
        return self.pool

    def connect(self, conn: DownstreamConnection, head: RequestHead) -> tuple[str, int] | None:
        conn.dstats = self.dstats
        conn.local_reply(
            local_reply.BAD_REQUEST, "CONNECT is not accepted on the inbound listener", close=True
        )
        return None

    def sweep(self, now: float) -> None:
        self.pool.sweep(now)

    def pools(self) -> list[Pool]:
        return [self.pool]

    def close(self) -> None:
        self.pool.close()

    def __repr__(self) -> str:
        return f"<InboundRouter {self.pool!r}>"
