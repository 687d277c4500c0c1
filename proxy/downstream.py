"""The HTTP/1 downstream connection: a client's socket and codec, creating one exchange per request.

This is the adapter between a socket and the sans-IO exchange (proxy/exchange.py). A
`DownstreamConnection` is the asyncio protocol of one accepted socket and the sink of
its `RequestCodec`: each request head makes an `Exchange`, the router's answer goes to
it, and the rest of the request follows it; the exchange answers through this
connection's buffers (`wbuf` to the client, `ubuf` to the upstream), and each
`data_received` ends with at most one write per socket. Requests are handled one at a
time: pipelined ones wait (reading paused) until the one in flight ended, then are
replayed in order. What belongs to the connection rather than to a request stays here:
the keep-alive idle and header-read deadlines, malformed heads (answered with
`Connection: close`, no exchange), the client's flow control, and the hand-over to a
tunnel after `101` or CONNECT.

No Task, Future or timer is made per request: deadlines are plain floats that a
per-listener sweep (`ProxyServer.sweep`) checks a few times a second, and body streaming
is policed by a progress counter on the exchange.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Protocol

from proxy import local_reply
from proxy.codec import RequestCodec
from proxy.errors import BadMessageError
from proxy.exchange import Exchange
from proxy.exchange_states import (
    ABORT,
    GONE,
    KEEP,
    PAUSE_BACKLOG,
    PAUSE_CONNECTING,
    PAUSE_SWITCHING,
    SERVE,
    T_IDLE,
    TUNNEL,
)
from proxy.forwarding import ResponseMemo
from proxy.head_cache import HeadCache
from proxy.heads import Fields, RequestHead
from proxy.route_result import Peer, RouteResult
from proxy.stats import ProxyStats
from proxy.upstream import WRITE_HIGH, WRITE_LOW

if TYPE_CHECKING:
    from proxy.access_log import ListenerAccessLog
    from proxy.egress import EgressGuard
    from proxy.h2_downstream import H2Front
    from proxy.pool import Pool
    from proxy.trace_context import ListenerTracing

# HTTP/2 with prior knowledge (RFC 9113 section 3.4): here, so that sniffing an HTTP/1
# connection does not import the HTTP/2 side (the h2 package) into an idle sidecar.
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

# Route answers and CONNECT dials in flight (held so they are not garbage-collected).
_TASKS: set[asyncio.Task[None]] = set()
# The balancers' random source: module-level, so nothing is allocated per request.
RNG = random.Random()

# Phases of the connection, for the sweep that enforces its own timeouts.
IDLE: Final = 0  # between requests (keep-alive idle timeout)
HEAD: Final = 1  # part of a request head received (header-read timeout)
BUSY: Final = 2  # an exchange is in flight (its own deadline applies)
TUNNEL_PHASE: Final = 3  # handed over to a tunnel

# The last two hex digits of a request id (see ProxyServer.new_request_id).
_HEX2: Final = tuple(b"%02x" % i for i in range(256))


@dataclass(frozen=True)
class TimeoutPolicy:
    """Seconds. `idle` covers keep-alive idleness and stalled body transfers alike."""

    header_read: float = 10.0
    idle: float = 60.0
    request: float = 15.0
    connect: float = 2.0

    @property
    def tick(self) -> float:
        return max(0.02, min(1.0, self.header_read / 4, self.idle / 4, self.request / 4))


class Router(Protocol):
    """Chooses where a request goes (proxy/dispatch.py, proxy/policy_router.py).

    `route` and `connect` return a `RouteResult` and change nothing outside the router:
    a local reply, a pool (with the endpoint and tracker), a tunnel target, or, when
    they must wait, a pending result. tests/test_router_conformance.py runs every
    router through the same cases."""

    name: str
    head_cache: HeadCache

    @property
    def egress_guard(self) -> EgressGuard | None:
        """What CONNECT tunnels may not reach (proxy/egress.py), if this router tunnels."""

    def route(self, head: RequestHead, peer: Peer) -> RouteResult: ...

    def connect(self, head: RequestHead, peer: Peer) -> RouteResult:
        """CONNECT: a tunnel target, or a local reply."""

    def retry_route(
        self, head: RequestHead, peer: Peer, previous: RouteResult, tried: list[Any]
    ) -> RouteResult:
        """Where a retry of a request routed to `previous` goes (another endpoint of its
        cluster not in `tried`, where one is available)."""

    def sweep(self, now: float) -> None: ...

    def pools(self) -> list[Pool]: ...

    def close(self) -> None: ...


class ProxyServer:
    """State shared by one listener's connections; also its protocol factory."""

    def __init__(
        self,
        router: Router,
        timeouts: TimeoutPolicy,
        stats: ProxyStats,
        *,
        scheme: bytes = b"http",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.router = router
        self.name = router.name
        self.timeouts = timeouts
        self.stats = stats
        self.scheme = scheme
        self.clock = clock
        # Heads llhttp already parsed: the router's (its pools parse the responses).
        self.head_cache = router.head_cache
        self.xfp = (b"X-Forwarded-Proto", scheme)
        self.xfp_line = b"X-Forwarded-Proto: " + scheme + b"\r\n"
        self.connections: set[DownstreamConnection] = set()
        self.draining = False
        # Set by the sidecar when tracing or the access log is on (None: off, free).
        self.tracer: ListenerTracing | None = None
        self.access_log: ListenerAccessLog | None = None
        # An mTLS listener's check of each connection (proxy/tls.py InboundIdentity):
        # the caller's SPIFFE ID, "" for plaintext it accepts, None to refuse.
        self.identify: Callable[[Any], str | None] | None = None
        # Request ids look like UUIDs: a random per-process head and a counter.
        rnd = os.urandom(10).hex()
        self._id_head = f"{rnd[:8]}-{rnd[8:12]}-4{rnd[13:16]}-a{rnd[17:20]}-".encode()
        self._id_seq = 0
        # The id but its last two hex digits, which change every 256 ids.
        self._id_block = self._id_head + b"%010x" % 0
        stats.downstream_active.setdefault(self.name, 0)
        stats.downstream_total.setdefault(self.name, 0)
        # The listener's HTTP/2 side (proxy/h2_downstream.py), made at the first h2c
        # connection; `app_h2`: the inbound app speaks HTTP/2 (protocol http2 or grpc).
        self.h2: H2Front | None = None
        self.app_h2 = False
        # The app's protocol as policy says (its service's ServiceDefaults), if pushed.
        self.app_protocol: Callable[[], str | None] | None = None

    def __call__(self) -> DownstreamConnection:
        return DownstreamConnection(self)

    def new_request_id(self) -> bytes:
        """b"%s%012x" % (head, seq): formatted once per 256 ids (formatting costs more
        than the rest of making the id), the last two hex digits taken from a table."""
        self._id_seq = seq = self._id_seq + 1
        low = seq & 0xFF
        if not low:
            self._id_block = b"%s%010x" % (self._id_head, seq >> 8)
        return self._id_block + _HEX2[low]

    def call_later(self, delay: float, callback: Callable[[], None]) -> asyncio.TimerHandle:
        """A timer (per-try timeouts and retry backoff: requests with a retry policy)."""
        return asyncio.get_running_loop().call_later(delay, callback)

    def sweep(self, now: float) -> None:
        idle_timeout = self.timeouts.idle
        for conn in list(self.connections):
            ex = conn.exchange
            if ex is None:
                if conn.deadline and now >= conn.deadline:
                    conn.on_deadline()
                continue
            if ex.timer == T_IDLE and ex.progress != ex.seen_progress:
                ex.seen_progress = ex.progress
                ex.deadline = now + idle_timeout
            elif now >= ex.deadline:
                ex.on_deadline()
        if self.h2 is not None:
            self.h2.sweep(now)
        self.router.sweep(now)

    def __repr__(self) -> str:
        return (
            f"<ProxyServer {self.name} connections={len(self.connections)}"
            f"{' draining' if self.draining else ''}>"
        )


class DownstreamConnection(asyncio.Protocol):
    """One client connection (asyncio protocol) and the exchange in flight on it."""

    __slots__ = (
        "backlog",
        "closed",
        "codec",
        "deadline",
        "early",
        "exchange",
        "memo",
        "pause_mask",
        "peer",
        "phase",
        "server",
        "sniff",
        "tls",
        "transport",
        "ubuf",
        "wbuf",
    )

    def __init__(self, server: ProxyServer) -> None:
        self.server = server
        self.transport: Any = None
        # A TLS transport: what one flush writes goes as one record (see `flush`).
        self.tls = False
        self.codec = RequestCodec(self, server.head_cache)
        self.codec.conn = self  # called directly (compiled), not through RequestSink
        self.peer = Peer(b"")
        self.memo = ResponseMemo()
        self.wbuf: list[bytes] = []  # to the client
        self.ubuf: list[bytes] = []  # to the upstream connection of the exchange
        self.pause_mask = 0
        self.phase = IDLE
        self.deadline = 0.0
        self.closed = False
        self.exchange: Exchange | None = None
        # Codec events of pipelined requests, waiting for the exchange in flight.
        self.backlog: list[tuple[int, Any]] | None = None
        # Bytes after an Upgrade/CONNECT head, for the tunnel.
        self.early: bytes | None = None
        # The first bytes, until they tell HTTP/1 from the HTTP/2 preface (None: told).
        self.sniff: bytes | None = b""

    @property
    def active(self) -> bool:
        return self.exchange is not None

    # asyncio.Protocol -----------------------------------------------------------------

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.tls = transport.get_extra_info("sslcontext") is not None
        transport.set_write_buffer_limits(WRITE_HIGH, WRITE_LOW)
        peer = transport.get_extra_info("peername")
        self.peer = Peer(str(peer[0]).encode() if peer else b"unknown")
        server = self.server
        if server.identify is not None:
            identity = server.identify(transport)
            if identity is None:
                self.closed = True
                transport.abort()
                return
            if identity:
                self.peer.set_identity(identity)
        server.connections.add(self)
        server.stats.downstream_active[server.name] += 1
        server.stats.downstream_total[server.name] += 1
        self.deadline = server.clock() + server.timeouts.idle

    def data_received(self, data: bytes) -> None:
        if self.sniff is not None:
            data = self._sniff(data)
            if not data:
                return
        if self.early is not None:
            self.early += data
            return
        ex = self.exchange
        if ex is not None:
            ex.progress += 1
        codec = self.codec
        try:
            rest = codec.feed(data)
        except BadMessageError as e:
            # Requests before the bad bytes in this read still go out (flushed below).
            self._bad_request(e)
            rest = None
        if rest is not None:
            self._switching(rest)
        self.flush()
        if codec.head_bytes and not codec.in_body and self.phase == IDLE and not self.closed:
            self.phase = HEAD
            self.deadline = self.server.clock() + self.server.timeouts.header_read

    def _sniff(self, data: bytes) -> bytes:
        """HTTP/2 with prior knowledge starts with the preface: hand the socket to the
        HTTP/2 side. Anything else is HTTP/1 (returned, to be parsed)."""
        seen = self.sniff + data if self.sniff else data
        if not H2_PREFACE.startswith(seen[:24]):
            self.sniff = None
            return seen
        if len(seen) < len(H2_PREFACE):
            self.sniff = seen  # part of the preface so far
            return b""
        self.sniff = None
        self.phase = TUNNEL_PHASE  # the socket is the HTTP/2 connection's from now on
        server = self.server
        server.connections.discard(self)
        if server.h2 is None:
            from proxy.h2_downstream import H2Front

            server.h2 = H2Front(server)
        server.h2.adopt(self.transport, self.peer, seen)
        return b""

    def eof_received(self) -> bool:
        # A client may half-close after its request and still read the response; one
        # that half-closes in the middle of its request body abandoned it.
        ex = self.exchange
        if ex is None:
            self.close()
            return False
        ex.on_last_request()
        return ex.req_done

    def connection_lost(self, exc: Exception | None) -> None:
        if self.phase == TUNNEL_PHASE:
            return
        self._gone()
        ex = self.exchange
        if ex is not None:
            # The client left mid-exchange: that upstream connection's state is unknown.
            ex.on_client_gone()

    def pause_writing(self) -> None:
        ex = self.exchange
        if ex is not None and ex.upstream is not None:
            ex.upstream.pause()

    def resume_writing(self) -> None:
        ex = self.exchange
        if ex is not None and ex.upstream is not None:
            ex.upstream.resume()

    # output (the exchange's actions) ----------------------------------------------------

    def flush(self) -> None:
        """Write what the last callbacks produced: one call per socket.

        Over TLS the pieces are joined first: the TLS transport encrypts each piece of
        `writelines` as a record of its own (a head and a small body would be two
        records, two AEAD passes and twice the framing), where a plaintext transport
        sends them with one writev."""
        buf = self.ubuf
        if buf:
            ex = self.exchange
            up = ex.upstream if ex is not None else None
            if up is not None and not up.closed:
                if len(buf) == 1:
                    up.transport.write(buf[0])
                elif up.tls:
                    up.transport.write(b"".join(buf))
                else:
                    up.transport.writelines(buf)
                buf.clear()
        buf = self.wbuf
        if buf and not self.closed:
            if len(buf) == 1:
                self.transport.write(buf[0])
            elif self.tls:
                self.transport.write(b"".join(buf))
            else:
                self.transport.writelines(buf)
            buf.clear()

    def set_pause(self, bit: int) -> None:
        if not self.pause_mask and not self.closed:
            self.transport.pause_reading()
        self.pause_mask |= bit

    def clear_pause(self, bit: int) -> None:
        if self.pause_mask & bit:
            self.pause_mask &= ~bit
            if not self.pause_mask and not self.closed:
                self.transport.resume_reading()

    def close(self) -> None:
        if not self.closed:
            self.flush()
            self._gone()
            self.transport.close()

    def abort(self) -> None:
        if not self.closed:
            self._gone()
            self.transport.abort()

    def _gone(self) -> None:
        if not self.closed:
            self.closed = True
            server = self.server
            server.connections.discard(self)
            server.stats.downstream_active[server.name] -= 1

    # request events (RequestCodec sink) ---------------------------------------------

    def on_request_head(self, head: RequestHead) -> None:
        if self.closed:
            return
        if self.exchange is not None:
            # Pipelined: wait for the response in flight (order must be kept).
            if self.backlog is None:
                self.backlog = []
                self.set_pause(PAUSE_BACKLOG)
            self.backlog.append((0, head))
            return
        self.phase = BUSY
        self.exchange = ex = Exchange(self, head)
        router = self.server.router
        if head.method == b"CONNECT":
            result = router.connect(head, self.peer)
        else:
            result = router.route(head, self.peer)
        pending = result.pending
        if pending is not None:
            self._route_later(ex, pending)
            return
        ex.on_routed(result)

    def on_request_body(self, data: bytes) -> None:
        if self.backlog is not None:
            self.backlog.append((1, data))
            return
        ex = self.exchange
        if ex is not None:
            ex.on_request_body(data)

    def on_request_end(self, trailers: Fields | None) -> None:
        if self.backlog is not None:
            self.backlog.append((2, trailers))
            return
        ex = self.exchange
        if ex is not None:
            ex.on_request_end(trailers)

    def _route_later(self, ex: Exchange, pending: Awaitable[RouteResult]) -> None:
        """The router must wait (discovery's first answer): reading stops meanwhile."""
        self.set_pause(PAUSE_CONNECTING)
        self._spawn(self._routed(ex, pending))

    async def _routed(self, ex: Exchange, pending: Awaitable[RouteResult]) -> None:
        result = await pending
        if ex is not self.exchange or self.closed:
            return  # the exchange ended meanwhile (its client left, a timeout)
        self.clear_pause(PAUSE_CONNECTING)
        ex.on_routed(result)
        self.flush()

    @staticmethod
    def _spawn(coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        _TASKS.add(task)
        task.add_done_callback(_TASKS.discard)

    def _switching(self, rest: bytes) -> None:
        """The codec stopped at an Upgrade or CONNECT head; `rest` followed it."""
        self.early = rest
        ex = self.exchange
        if ex is not None:
            ex.on_last_request()  # unless the tunnel opens, the connection ends
        self.set_pause(PAUSE_SWITCHING)

    def _bad_request(self, e: BadMessageError) -> None:
        ex = self.exchange
        if ex is not None and (ex.req_done or self.backlog is not None):
            # The bad bytes belong to a later, pipelined request: answer it in its turn.
            if self.backlog is None:
                self.backlog = []
            self.backlog.append((3, e))
            self.set_pause(PAUSE_BACKLOG)
            self.early = b""  # nothing more is parsed on this connection
            return
        if ex is not None:
            ex.on_bad_request(e)
            self.flush()
            return
        self._local_reply(e.reason, e.message, status=e.status)

    def _local_reply(
        self, reason: str, message: str | None = None, *, status: int | None = None
    ) -> None:
        """Answer a request that never made an exchange (a malformed head, a head that
        did not arrive in time), and close."""
        self.server.stats.local_reply(reason)
        self.wbuf.append(local_reply.render(reason, message, status=status, close=True))
        self.close()

    # CONNECT (the exchange's `dial`) ------------------------------------------------

    def dial(self, exchange: Exchange, host: str, port: int) -> None:
        self._spawn(self._open_tunnel(exchange, host, port))

    async def _open_tunnel(self, ex: Exchange, host: str, port: int) -> None:
        """CONNECT host:port: dial, then the exchange answers 200 (a Task per CONNECT)."""
        from proxy.tunnel import dial

        try:
            upstream, parked = await dial(host, port, self.server.timeouts.connect)
        except (OSError, TimeoutError) as e:
            if ex is self.exchange and not self.closed:
                detail = "timed out" if isinstance(e, TimeoutError) else str(e)
                ex.on_tunnel_failed(
                    local_reply.UPSTREAM_CONNECT_ERROR, f"connect to {host}:{port}: {detail}"
                )
            return
        if ex is not self.exchange or self.closed:
            upstream.close()
            return
        guard = self.server.router.egress_guard
        what = guard.denied(upstream) if guard is not None else None
        if what is not None:
            upstream.abort()
            ex.on_tunnel_failed(
                local_reply.EGRESS_DENIED, f"CONNECT to {host}:{port} reaches {what}"
            )
            return
        ex.on_tunnel_ready(upstream, parked.received)

    # the end of an exchange ---------------------------------------------------------

    def exchange_done(self, ex: Exchange, now: float) -> None:
        """The exchange ended: keep the connection for the next request, or close it."""
        if ex is not self.exchange:
            return
        self.exchange = None
        after = ex.after
        if after == KEEP and not self.server.draining and not self.closed:
            self.phase = IDLE
            self.deadline = now + self.server.timeouts.idle
            # The response is complete and nothing follows it in this exchange: written
            # now, which spares the upstream connection its flush().
            self.flush()
            if self.backlog is not None:
                self._replay()
                self.flush()
        elif after == TUNNEL:
            self._to_tunnel(ex)
        elif after == SERVE and not self.server.draining and not self.closed:
            # After the codec handed over the bytes that followed the CONNECT head.
            asyncio.get_running_loop().call_soon(self._serve_inside)
        elif after == ABORT:
            self.flush()
            self.abort()
        elif after != GONE:
            self.close()

    def _replay(self) -> None:
        events = self.backlog or []
        self.backlog = None
        for i, (kind, value) in enumerate(events):
            if self.closed:
                return
            # Read through a call: the handlers below may set `backlog` again, which a
            # narrowing of `self.backlog` to None after the assignment above would miss
            # (and the compiled build would then refuse the list).
            later = self._backlog()
            if later is not None:
                later.extend(events[i:])
                return
            if kind == 0:
                self.on_request_head(value)
            elif kind == 1:
                self.on_request_body(value)
            elif kind == 2:
                self.on_request_end(value)
            else:
                self._bad_request(value)
        if self._backlog() is None:
            self.clear_pause(PAUSE_BACKLOG)

    def _backlog(self) -> list[tuple[int, Any]] | None:
        return self.backlog

    def _serve_inside(self) -> None:
        """CONNECT to a mesh name was answered: the bytes after it are requests again
        (HTTP/1, or HTTP/2 after its preface), parsed and routed here."""
        if self.closed:
            return
        self.flush()
        rest = self.early or b""
        self.early = None
        self.codec = RequestCodec(self, self.server.head_cache)
        self.codec.conn = self
        self.sniff = b""
        self.phase = IDLE
        self.deadline = self.server.clock() + self.server.timeouts.idle
        self.clear_pause(PAUSE_SWITCHING)
        if rest:
            self.data_received(rest)

    def _to_tunnel(self, ex: Exchange) -> None:
        """After 101 or CONNECT's 200: from now on both sockets carry raw bytes."""
        from proxy.tunnel import splice

        self.flush()
        stats = self.server.stats
        self.phase = TUNNEL_PHASE
        self._gone()
        stats.tunnels_active += 1
        stats.tunnels_total += 1
        transport, received = ex.tunnel
        splice(
            self.transport,
            transport,
            to_a=received,
            to_b=self.early or b"",
            on_close=self._tunnel_closed,
        )

    def _tunnel_closed(self) -> None:
        self.server.stats.tunnels_active -= 1

    def on_deadline(self) -> None:
        """Called by the sweep when the connection's own deadline passed (no exchange)."""
        if self.phase == HEAD:
            self._local_reply(local_reply.HEADER_TIMEOUT)
        else:
            self.close()

    def __repr__(self) -> str:
        phase = ("idle", "head", "busy", "tunnel")[self.phase]
        ex = f" {self.exchange!r}" if self.exchange is not None else ""
        return (
            f"<DownstreamConnection {self.server.name} peer={self.peer.address.decode()}"
            f" {phase}{ex}{' closed' if self.closed else ''}>"
        )
