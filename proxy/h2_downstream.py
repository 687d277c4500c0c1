"""The HTTP/2 downstream connection: a client's h2c connection, one exchange per stream.

A listener's HTTP/1 connection (proxy/downstream.py) hands its socket here when the
first bytes are the HTTP/2 connection preface (`PRI * HTTP/2.0`, prior knowledge), so
both protocols share the outbound and inbound listeners. Each stream the client opens
becomes an `H2Exchange` (proxy/h2_exchange.py), routed on its own.

`H2Front` is what a listener's HTTP/2 connections share: the router, the HTTP/2 pools
(one per upstream address, keyed like the HTTP/1 pools the router returns), and the
timeouts. What protects the sidecar, beyond `h2`'s own checks:
- SETTINGS: at most MAX_CONCURRENT_STREAMS streams, MAX_HEADER_LIST_SIZE of decoded
  fields (an HPACK bomb fails the connection with ENHANCE_YOUR_CALM before its fields
  are built), frames of MAX_FRAME_SIZE (proxy/h2_link.py).
- Rapid reset (CVE-2023-44487): streams the client resets draw on a `ResetBudget`; a
  client that resets faster than it is allowed gets GOAWAY ENHANCE_YOUR_CALM and its
  connection closed. A reset stream's upstream stream is reset too, so the work it
  caused upstream stops at once.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from h2.errors import ErrorCodes
from h2.exceptions import ProtocolError

from proxy import local_reply
from proxy.h2_exchange import T_IDLE, H2Exchange
from proxy.h2_link import Fields, H2Link, flush_touched
from proxy.h2_pool import H2Pool

if TYPE_CHECKING:
    from proxy.downstream import ProxyServer
    from proxy.pool import Pool, PoolPolicy
    from proxy.route_result import Peer

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


class ResetBudget:
    """How many streams a client may reset: `burst` at once, refilled at `rate` per
    second (a token bucket; the clock is the caller's)."""

    __slots__ = ("burst", "rate", "stamp", "tokens")

    def __init__(self, rate: float = 100.0, burst: float = 200.0, now: float = 0.0) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.stamp = now

    def take(self, now: float) -> bool:
        """One reset at `now`: False once the budget is spent."""
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens < 1.0:
            return False
        self.tokens -= 1.0
        return True


class H2Front:
    """One listener's HTTP/2 side (made at its first HTTP/2 connection)."""

    def __init__(self, server: ProxyServer) -> None:
        self.server = server
        self.router = server.router
        self.stats = server.stats
        self.timeouts = server.timeouts
        self.clock: Callable[[], float] = server.clock
        self.scheme = server.scheme
        # Inbound: whether the local app speaks HTTP/2 (its protocol is http2 or grpc).
        self.app_h2: bool = getattr(server, "app_h2", False)
        self.connections: set[H2DownstreamConnection] = set()
        self.pools: dict[tuple[str, int, int], H2Pool] = {}
        # The pool gauges count HTTP/2 connections beside the HTTP/1 ones.
        self.stats.pool_sources.append(lambda: list(self.pools.values()))
        self.reset_rate = 100.0
        self.reset_burst = 200.0
        # The TLS context HTTP/2 pools dial with where the router's pool uses TLS: it
        # must offer ALPN `h2` only (proxy/h2_pool.py's `alpn_context`), as the HTTP/1
        # pools' context must not offer it. Set by the listener that has one.
        self.h2_ssl: Any = None

    def pool_for(self, pool: Pool) -> H2Pool | None:
        """The HTTP/2 pool to the address of the HTTP/1 `pool` the router chose, or None
        when that upstream is spoken to as HTTP/1.1: the inbound app, unless its
        protocol says otherwise, and egress hosts (h2c with prior knowledge is for the
        mesh's own hops)."""
        if self.router.name == "inbound" and not self.app_speaks_h2():
            return None
        if pool.guard is not None:
            return None  # egress: a host outside the mesh, spoken to as HTTP/1.1
        ssl = None
        tls = pool.tls
        if tls is None and pool.ssl is not None:
            ssl = self.h2_ssl
            if ssl is None:
                return None  # no HTTP/2 context for this TLS: the stream goes as HTTP/1.1
        key = (pool.host, pool.port, id(ssl) if tls is None else id(tls))
        h2pool = self.pools.get(key)
        if h2pool is None:
            h2pool = self.pools[key] = H2Pool(
                pool.host,
                pool.port,
                pool.policy,
                ssl=ssl,
                server_hostname=pool.server_hostname,
                name=pool.name,
                guard=pool.guard,
                tls=tls,
            )
        return h2pool

    def shadow_pool(self, host: str, port: int, tls: Any, policy: PoolPolicy) -> H2Pool:
        """The HTTP/2 pool to a mirror's shadow endpoint (proxy/h2_mirror.py): plain h2c,
        or the mesh's mTLS (`tls`, ALPN h2) as the stream's own hops."""
        key = (host, port, id(tls))
        h2pool = self.pools.get(key)
        if h2pool is None:
            h2pool = self.pools[key] = H2Pool(
                host, port, policy, name=f"shadow/{host}:{port}", tls=tls
            )
        return h2pool

    def app_speaks_h2(self) -> bool:
        """Inbound: the app's protocol is http2 or grpc (its sidecar's --app-protocol, or
        the pushed ServiceDefaults of its service)."""
        if self.app_h2:
            return True
        source = self.server.app_protocol
        return source is not None and source() in ("http2", "grpc")

    def adopt(self, transport: Any, peer: Peer, received: bytes) -> H2DownstreamConnection:
        """Take over an accepted socket whose first bytes were the preface."""
        conn = H2DownstreamConnection(self, peer)
        self.connections.add(conn)
        transport.set_protocol(conn)
        conn.connection_made(transport)
        conn.data_received(received)
        return conn

    def sweep(self, now: float) -> None:
        for conn in list(self.connections):
            conn.sweep(now)
        for key, pool in list(self.pools.items()):
            pool.sweep(now)
            if not pool.conns and not pool.connecting and not pool.waiters:
                del self.pools[key]

    def drain(self) -> None:
        """GOAWAY to every client: streams in flight finish, idle connections close."""
        for conn in list(self.connections):
            conn.send_goaway()
            if not conn.exchanges:
                conn.close()

    def abort(self) -> None:
        for conn in list(self.connections):
            conn.abort()
        for pool in self.pools.values():
            pool.close()

    def __repr__(self) -> str:
        return f"<H2Front connections={len(self.connections)} pools={len(self.pools)}>"


class H2DownstreamConnection(H2Link):
    """One client's HTTP/2 connection and its exchanges, by stream id."""

    def __init__(self, front: H2Front, peer: Peer) -> None:
        super().__init__(server=True)
        self.front = front
        self.peer = peer
        self.exchanges: dict[int, H2Exchange] = {}
        now = front.clock()
        self.deadline = now + front.timeouts.idle
        self.resets = ResetBudget(front.reset_rate, front.reset_burst, time.monotonic())
        self.streams_total = 0

    def on_request(self, stream_id: int, headers: Fields, end: bool) -> None:
        if self.goaway:
            self.h2.reset_stream(stream_id, ErrorCodes.REFUSED_STREAM)
            return
        self.streams_total += 1
        ex = H2Exchange(self, stream_id, headers, end)
        self.exchanges[stream_id] = ex
        self.sinks[stream_id] = ex
        ex.begin()

    def on_stream_reset(self, stream_id: int, remote: bool) -> None:
        if remote and not self.resets.take(time.monotonic()):
            # CVE-2023-44487: resetting streams as fast as they open costs the client
            # nothing and us a routing decision and an upstream stream each.
            self.front.stats.local_reply(local_reply.H2_RAPID_RESET)
            self.send_goaway(ErrorCodes.ENHANCE_YOUR_CALM)
            self.abort()

    def protocol_error(self, e: ProtocolError) -> None:
        if not self.peer_goaway and not self.h2_closed_by_peer(e):
            self.front.stats.local_reply(local_reply.H2_PROTOCOL_ERROR)
        super().protocol_error(e)

    def exchange_done(self, ex: H2Exchange) -> None:
        self.exchanges.pop(ex.sid, None)
        self.finished_receiving(ex.sid)
        if not self.exchanges:
            self.deadline = self.front.clock() + self.front.timeouts.idle
            if self.goaway and not self.closed:
                self.close()

    def sweep(self, now: float) -> None:
        exchanges = self.exchanges
        if not exchanges:
            if now >= self.deadline and not self.closed:
                self.send_goaway()
                self.close()
            return
        idle = self.front.timeouts.idle
        for ex in list(exchanges.values()):
            if ex.timer == T_IDLE and ex.progress != ex.seen_progress:
                ex.seen_progress = ex.progress
                ex.deadline = now + idle
            if now >= ex.deadline or (ex.call_deadline and now >= ex.call_deadline):
                ex.on_deadline(now)
        flush_touched()

    def connection_gone(self) -> None:
        front = self.front
        if self in front.connections:
            front.connections.discard(self)
            front.stats.downstream_active[front.server.name] -= 1

    def __repr__(self) -> str:
        return (
            f"<H2DownstreamConnection {self.front.server.name} "
            f"peer={self.peer.address.decode()} streams={len(self.exchanges)}"
            f"{' closed' if self.closed else ''}>"
        )
