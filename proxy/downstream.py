"""Downstream connections: a client's HTTP/1.1 requests, forwarded one at a time upstream.

This is the hot path. A `DownstreamConnection` is the asyncio protocol for one accepted
socket, the sink of its `RequestCodec`, and, while a request is in flight, the sink of
the pooled upstream connection's `ResponseCodec`: bytes go llhttp → callback → a list of
outgoing pieces, and each `data_received` ends with at most one write per socket. No
Task, Future or timer is created per request: deadlines are plain floats a per-listener
sweep checks a few times a second, and body streaming is policed by a progress counter.

Per request: the router (proxy/dispatch.py) picks the pool (and endpoint), the head is
rewritten (hop-by-hop fields were already removed by the codec; `Via`,
`X-Forwarded-For`, `X-Forwarded-Proto`, `X-Request-Id` added), bodies stream in both
directions with the original framing (Content-Length passes through, chunked is
re-chunked piece by piece with trailers), and the response head is rewritten the same
way. Pipelined requests queue behind the one in flight with reading paused.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from bisect import bisect_left as _bisect
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from proxy import local_reply
from proxy.codec import (
    Fields,
    RequestCodec,
    RequestHead,
    ResponseHead,
    chunk_prefix,
    encode_last_chunk,
    encode_request_head,
    encode_response_head,
)
from proxy.errors import BadMessageError
from proxy.pool import Pool, PoolOverflowError
from proxy.stats import LATENCY_BOUNDS, DestinationStats, ProxyStats
from proxy.upstream import PAUSE_UPSTREAM as _PAUSE_UPSTREAM
from proxy.upstream import UNOWNED, WRITE_HIGH, WRITE_LOW, UpstreamConnection

if TYPE_CHECKING:
    from collections.abc import Callable

    from proxy.balance import Balancer, Endpoint, PickContext
    from proxy.egress import EgressGuard

_monotonic = time.monotonic
# CONNECT dials in flight (held so they are not garbage-collected mid-way).
_TASKS: set[asyncio.Task[None]] = set()
# The balancers' random source: module-level, so nothing is allocated per request.
RNG = random.Random()

# Why reading from the client is paused (bits; reading resumes when none is left).
PAUSE_BACKLOG = 1  # pipelined requests wait behind the one in flight
PAUSE_UPSTREAM = _PAUSE_UPSTREAM  # the upstream socket's write buffer is full
PAUSE_CONNECTING = 4  # no upstream connection yet; body pieces would pile up
PAUSE_SWITCHING = 8  # Upgrade/CONNECT: bytes after the head wait for the tunnel

# Phases, for the sweep that enforces timeouts.
IDLE = 0  # between requests (keep-alive idle timeout)
HEAD = 1  # part of a request head received (header-read timeout)
ACTIVE = 2  # bodies moving (idle timeout on lack of progress)
WAIT = 3  # request sent, waiting for the response head (request timeout)
TUNNEL = 4  # handed over to a tunnel

# Response state of the current exchange.
R_NONE = 0
R_HEAD = 1
R_SWITCHING = 2
R_DONE = 3

_NO_BODY = frozenset({204, 304})
# Interim responses relayed per exchange (`interim`: bit 0 a 100 was sent, the rest
# counts 103s).
_SENT_CONTINUE = 1
MAX_EARLY_HINTS = 2
_IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})
_VIA11 = (b"Via", b"1.1 tether")
_VIA10 = (b"Via", b"1.0 tether")
# What ends a forwarded request head after the X-Request-Id value.
_RID_VIA11_END = b"\r\nVia: 1.1 tether\r\n\r\n"
_RID_VIA10_END = b"\r\nVia: 1.0 tether\r\n\r\n"
_VIA11_END = _RID_VIA11_END[2:]
_VIA10_END = _RID_VIA10_END[2:]
# Response head endings of the fast path (Via, then what the client's connection needs).
_RESP_END = b"Via: 1.1 tether\r\n\r\n"
_RESP_END_CLOSE = b"Via: 1.1 tether\r\nConnection: close\r\n\r\n"
_RESP_END_KEEP10 = b"Via: 1.1 tether\r\nConnection: keep-alive\r\n\r\n"
_STATUS_LINES: dict[int, bytes] = {}
# The last two hex digits of a request id (see ProxyServer.new_request_id).
_HEX2 = tuple(b"%02x" % i for i in range(256))


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
    """Chooses where a request goes (proxy/dispatch.py). See DownstreamConnection.routed."""

    name: str

    @property
    def egress_guard(self) -> EgressGuard | None:
        """What CONNECT tunnels may not reach (proxy/egress.py), if this router tunnels."""

    def route(self, conn: DownstreamConnection, head: RequestHead) -> Pool | None: ...

    def connect(self, conn: DownstreamConnection, head: RequestHead) -> tuple[str, int] | None:
        """CONNECT: the (host, port) to tunnel to, or None after answering locally."""

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
    ) -> None:
        self.router = router
        self.name = router.name
        self.timeouts = timeouts
        self.stats = stats
        self.scheme = scheme
        self.xfp = (b"X-Forwarded-Proto", scheme)
        self.xfp_line = b"X-Forwarded-Proto: " + scheme + b"\r\n"
        self.connections: set[DownstreamConnection] = set()
        self.draining = False
        # Request ids look like UUIDs: a random per-process head and a counter.
        rnd = os.urandom(10).hex()
        self._id_head = f"{rnd[:8]}-{rnd[8:12]}-4{rnd[13:16]}-a{rnd[17:20]}-".encode()
        self._id_seq = 0
        # The id but its last two hex digits, which change every 256 ids.
        self._id_block = self._id_head + b"%010x" % 0
        stats.downstream_active.setdefault(self.name, 0)
        stats.downstream_total.setdefault(self.name, 0)

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

    def sweep(self, now: float) -> None:
        idle_timeout = self.timeouts.idle
        for conn in list(self.connections):
            if conn.phase == ACTIVE and conn.progress != conn.seen_progress:
                conn.seen_progress = conn.progress
                conn.deadline = now + idle_timeout
                continue
            if conn.deadline and now >= conn.deadline:
                conn.on_deadline()
        self.router.sweep(now)

    def __repr__(self) -> str:
        return (
            f"<ProxyServer {self.name} connections={len(self.connections)}"
            f"{' draining' if self.draining else ''}>"
        )


class DownstreamConnection(asyncio.Protocol):
    """One client connection (asyncio protocol) and its current exchange."""

    __slots__ = (
        "active",
        "backlog",
        "balancer",
        "closed",
        "codec",
        "deadline",
        "dstats",
        "early",
        "endpoint",
        "exchange",
        "head",
        "interim",
        "keep_alive",
        "memo_end",
        "memo_head",
        "memo_rhead",
        "path",
        "pause_mask",
        "peer",
        "phase",
        "pick_ctx",
        "pool",
        "progress",
        "req_chunked",
        "req_done",
        "request_bytes",
        "request_timeout",
        "resp_chunked",
        "resp_state",
        "response_edit",
        "retried",
        "seen_progress",
        "server",
        "start",
        "status",
        "transport",
        "ubuf",
        "upstream",
        "waiting",
        "wbuf",
        "xff",
        "xff_line",
    )

    def __init__(self, server: ProxyServer) -> None:
        self.server = server
        self.transport: Any = None
        self.codec = RequestCodec(self)
        self.peer = b""
        # The hashing balancers' view of this connection's requests (proxy/dispatch.py).
        self.pick_ctx: PickContext | None = None
        self.xff = (b"X-Forwarded-For", b"")
        self.xff_line = b""
        self.wbuf: list[bytes] = []  # to the client
        self.ubuf: list[bytes] = []  # to the upstream
        self.pause_mask = 0
        self.phase = IDLE
        self.deadline = 0.0
        self.progress = 0
        self.seen_progress = 0
        self.closed = False
        self.backlog: list[tuple[int, Any]] | None = None
        self.early: bytes | None = None
        self.exchange = 0  # bumped per request, so late async answers can be recognised
        # The last cached response head forwarded, its ending, and the bytes they made.
        self.memo_rhead: ResponseHead | None = None
        self.memo_end = b""
        self.memo_head = b""
        self._reset_exchange()

    def _reset_exchange(self) -> None:
        self.active = False
        self.head: RequestHead | None = None
        self.path = b""
        self.upstream: UpstreamConnection | None = None
        self.pool: Pool | None = None
        self.waiting: Pool | None = None
        self.endpoint: Endpoint | None = None
        self.balancer: Balancer | None = None
        self.dstats: DestinationStats | None = None
        self.start = 0.0
        self.req_done = False
        self.req_chunked = False
        self.resp_state = R_NONE
        self.resp_chunked = False
        self.status = 0
        self.keep_alive = True
        self.retried = False
        self.interim = 0
        self.request_bytes = b""
        # Set by a router whose route edits response headers (proxy/policy_router.py).
        self.response_edit: Callable[[Fields], None] | None = None
        # Set by a router whose policy gives this request its own timeout (0: the listener's).
        self.request_timeout = 0.0

    # asyncio.Protocol -----------------------------------------------------------------

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        transport.set_write_buffer_limits(WRITE_HIGH, WRITE_LOW)
        peer = transport.get_extra_info("peername")
        self.peer = str(peer[0]).encode() if peer else b"unknown"
        self.xff = (b"X-Forwarded-For", self.peer)
        self.xff_line = b"X-Forwarded-For: " + self.peer + b"\r\n"
        server = self.server
        server.connections.add(self)
        server.stats.downstream_active[server.name] += 1
        server.stats.downstream_total[server.name] += 1
        self.deadline = _monotonic() + server.timeouts.idle

    def data_received(self, data: bytes) -> None:
        self.progress += 1
        if self.early is not None:
            self.early += data
            return
        codec = self.codec
        try:
            rest = codec.feed(data)
        except BadMessageError as e:
            # Requests before the bad bytes in this read still go out (flushed below).
            self._bad_request(e)
            rest = None
        if rest is not None:
            self._switching(rest)
        # self.flush(), inlined: this runs once per request
        buf = self.ubuf
        if buf:
            conn = self.upstream
            if conn is not None and not conn.closed:
                if len(buf) == 1:
                    conn.transport.write(buf[0])
                else:
                    conn.transport.writelines(buf)
                buf.clear()
        buf = self.wbuf
        if buf and not self.closed:
            if len(buf) == 1:
                self.transport.write(buf[0])
            else:
                self.transport.writelines(buf)
            buf.clear()
        if codec.head_bytes and not codec.in_body and self.phase == IDLE and not self.closed:
            self.phase = HEAD
            self.deadline = _monotonic() + self.server.timeouts.header_read

    def eof_received(self) -> bool:
        # A client may half-close after its request and still read the response; one
        # that half-closes in the middle of its request body abandoned it.
        self.keep_alive = False
        if not self.active:
            self.close()
            return False
        return self.req_done

    def connection_lost(self, exc: Exception | None) -> None:
        if self.phase == TUNNEL:
            return
        self._gone()
        # The client left mid-exchange: that upstream connection's state is unknown.
        self._drop_upstream()

    def _drop_upstream(self, record: bool = True) -> None:
        """Stop waiting for a connection and abort the one in use: its state is unknown."""
        if self.waiting is not None:
            self.waiting.cancel(self)
            self.waiting = None
            self._end_endpoint(_monotonic(), False)
        conn = self.upstream
        if conn is not None:
            self.upstream = None
            conn.unbind()
            conn.abort()
            self._account(0, False, record=record)

    def pause_writing(self) -> None:
        if self.upstream is not None:
            self.upstream.pause()

    def resume_writing(self) -> None:
        if self.upstream is not None:
            self.upstream.resume()

    # output ---------------------------------------------------------------------------

    def flush(self) -> None:
        """Write what the last callbacks produced: one call per socket."""
        buf = self.ubuf
        if buf:
            conn = self.upstream
            if conn is not None and not conn.closed:
                if len(buf) == 1:
                    conn.transport.write(buf[0])
                else:
                    conn.transport.writelines(buf)
                buf.clear()
        buf = self.wbuf
        if buf and not self.closed:
            if len(buf) == 1:
                self.transport.write(buf[0])
            else:
                self.transport.writelines(buf)
            buf.clear()

    def count_progress(self) -> None:
        self.progress += 1

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
            self.pick_ctx = None  # its `header` refers back to this connection
            server = self.server
            server.connections.discard(self)
            server.stats.downstream_active[server.name] -= 1

    # request events (RequestCodec sink) ---------------------------------------------

    def on_request_head(self, head: RequestHead) -> None:
        if self.closed:
            return
        if self.active:
            # Pipelined: wait for the response in flight (order must be kept).
            if self.backlog is None:
                self.backlog = []
                self.set_pause(PAUSE_BACKLOG)
            self.backlog.append((0, head))
            return
        server = self.server
        self.active = True
        self.exchange += 1
        self.head = head
        self.path = head.target
        self.req_chunked = head.chunked
        self.req_done = False
        self.resp_state = R_NONE
        self.status = 0
        self.retried = False
        self.interim = 0
        self.dstats = None
        self.response_edit = None
        self.keep_alive = head.keep_alive and not server.draining
        self.start = now = _monotonic()
        self.phase = ACTIVE
        self.deadline = now + server.timeouts.idle
        if head.method == b"CONNECT":
            target = server.router.connect(self, head)
            if target is not None:
                self._tasks_open(target)
            return
        pool = server.router.route(self, head)
        if pool is not None:
            self.forward(pool)

    def on_request_body(self, data: bytes) -> None:
        if self.backlog is not None:
            self.backlog.append((1, data))
            return
        if self.resp_state == R_DONE or self.closed:
            return  # answered already (local reply or early response): discard
        if self.req_chunked:
            ubuf = self.ubuf
            ubuf.append(chunk_prefix(len(data)))
            ubuf.append(data)
            ubuf.append(b"\r\n")
        else:
            self.ubuf.append(data)
        if self.upstream is None:
            self.set_pause(PAUSE_CONNECTING)

    def on_request_end(self, trailers: Fields | None) -> None:
        if self.backlog is not None:
            self.backlog.append((2, trailers))
            return
        if self.closed or not self.active:
            return
        self.req_done = True
        if self.resp_state == R_DONE:
            self.finish(_monotonic())
            return
        if self.req_chunked:
            self.ubuf.append(encode_last_chunk(trailers))
        if self.resp_state == R_NONE and self.phase != TUNNEL:
            self.phase = WAIT
            self.deadline = _monotonic() + (self.request_timeout or self.server.timeouts.request)

    def _tasks_open(self, target: tuple[str, int]) -> None:
        loop = asyncio.get_running_loop()
        task = loop.create_task(self._open_tunnel(self.exchange, target[0], target[1]))
        _TASKS.add(task)
        task.add_done_callback(_TASKS.discard)

    def _switching(self, rest: bytes) -> None:
        """The codec stopped at an Upgrade or CONNECT head; `rest` followed it."""
        self.early = rest
        self.keep_alive = False  # unless the tunnel opens, the connection ends
        self.set_pause(PAUSE_SWITCHING)

    def _bad_request(self, e: BadMessageError) -> None:
        if self.active and (self.req_done or self.backlog is not None):
            # The bad bytes belong to a later, pipelined request: answer it in its turn.
            if self.backlog is None:
                self.backlog = []
            self.backlog.append((3, e))
            self.set_pause(PAUSE_BACKLOG)
            self.early = b""  # nothing more is parsed on this connection
            return
        if not self.active:
            # Between exchanges (a bad head after a finished one): the refusal is an
            # exchange of its own, not the end of the last one's response.
            self.resp_state = R_NONE
            self.dstats = None
            self.start = _monotonic()
        # A bad body mid-stream: the upstream got part of a request; drop it.
        self._drop_upstream()
        if self.resp_state == R_NONE:
            self.ubuf.clear()
            self.local_reply(e.reason, e.message, status=e.status, close=True)
        else:
            self.server.stats.local_reply(e.reason, self.dstats)
            self.flush()
            self.abort()

    # routing and upstream -------------------------------------------------------------

    def routed(self, exchange: int, pool: Pool | None) -> None:
        """Asynchronous routing answered (first request to a service not seen before)."""
        if exchange != self.exchange or self.closed:
            return
        self.clear_pause(PAUSE_CONNECTING)
        if pool is not None and self.active:
            self.forward(pool)
        self.flush()

    def forward(self, pool: Pool) -> None:
        head = self.head
        assert head is not None
        server = self.server
        raw = head.raw
        if raw is not None:
            # A cached head: its field lines pass through as bytes; ours are appended
            # (an X-Request-Id the client sent is among its lines already).
            ff = head.forwarded_for
            rid = head.request_id
            if rid is None:
                # server.new_request_id(), inlined: this runs once per request
                server._id_seq = seq = server._id_seq + 1
                low = seq & 0xFF
                if not low:
                    server._id_block = b"%s%010x" % (server._id_head, seq >> 8)
                head.request_id = rid = server._id_block + _HEX2[low]
                rid_name = b"X-Request-Id: "
                end = _RID_VIA11_END if head.version == "1.1" else _RID_VIA10_END
            else:
                rid = rid_name = b""
                end = _VIA11_END if head.version == "1.1" else _VIA10_END
            self.request_bytes = data = b"".join(
                (
                    head.method,
                    b" ",
                    self.path,
                    b" HTTP/1.1\r\n",
                    raw,
                    self.xff_line
                    if ff is None
                    else b"X-Forwarded-For: " + ff + b", " + self.peer + b"\r\n",
                    server.xfp_line if head.forwarded_proto is None else b"",
                    rid_name,
                    rid,
                    end,
                )
            )
            ubuf = self.ubuf
            if ubuf:
                ubuf.insert(0, data)
            else:
                ubuf.append(data)
            self.pool = pool
            idle = pool.idle
            if idle:
                conn = idle.pop()  # pool.acquire() and _attach(), inlined
                if not conn.closed:
                    self.upstream = conn
                    conn.sink = self
                    codec = conn.codec
                    codec.sink = self
                    codec.head_request = head.method == b"HEAD"
                    conn.requests += 1
                    return
            self._acquire(pool)
            return
        headers = head.headers
        ff = head.forwarded_for
        headers.append(self.xff if ff is None else (b"X-Forwarded-For", ff + b", " + self.peer))
        if head.forwarded_proto is None:
            headers.append(server.xfp)
        if head.request_id is None:
            head.request_id = rid = server.new_request_id()
            headers.append((b"X-Request-Id", rid))
        headers.append(_VIA11 if head.version == "1.1" else _VIA10)
        if head.chunked:
            headers.append((b"Transfer-Encoding", b"chunked"))
        elif head.content_length is not None:
            headers.append((b"Content-Length", b"%d" % head.content_length))
        if head.upgrade is not None:
            headers.append((b"Connection", b"upgrade"))
            headers.append((b"Upgrade", head.upgrade))
        self.request_bytes = data = encode_request_head(head.method, self.path, headers)
        self.ubuf.insert(0, data)
        self.pool = pool
        idle = pool.idle
        if idle:
            conn = idle.pop()  # the common case, pool.acquire() inlined
            if not conn.closed:
                self._attach(conn)
                return
        self._acquire(pool)

    def _acquire(self, pool: Pool) -> None:
        try:
            conn = pool.acquire(self)
        except PoolOverflowError as e:
            self.ubuf.clear()
            self.local_reply(local_reply.DRAINING if pool.closed else local_reply.OVERFLOW, str(e))
            return
        if conn is None:
            self.waiting = pool
            if not self.req_done:
                self.set_pause(PAUSE_CONNECTING)
        else:
            self._attach(conn)

    def _attach(self, conn: UpstreamConnection) -> None:
        head = self.head
        assert head is not None
        self.upstream = conn
        conn.sink = self  # conn.bind(), inlined: this runs once per request
        codec = conn.codec
        codec.sink = self
        codec.head_request = head.method == b"HEAD"
        conn.requests += 1

    def on_upstream_ready(self, conn: UpstreamConnection) -> None:
        pool = self.waiting
        if pool is None or self.closed or not self.active:
            conn.pool.release(conn, _monotonic())
            return
        self.waiting = None
        self._attach(conn)
        self.flush()
        self.clear_pause(PAUSE_CONNECTING)

    def on_upstream_failed(self, reason: str, message: str) -> None:
        if self.waiting is None or self.closed or not self.active:
            return
        self.waiting = None
        self.ubuf.clear()
        self.clear_pause(PAUSE_CONNECTING)
        self.local_reply(reason, message)
        self.flush()

    def on_upstream_lost(self, conn: UpstreamConnection, reason: str, message: str) -> None:
        if conn is not self.upstream:
            return
        self.upstream = None
        conn.unbind()
        head = self.head
        if (
            self.resp_state == R_NONE
            and reason == local_reply.UPSTREAM_RESET
            and conn.requests > 1
            and not self.retried
            and head is not None
            and not head.has_body
            and head.method in _IDEMPOTENT
            and self.pool is not None
        ):
            # A reused keep-alive connection the server closed as we sent (its idle
            # timeout raced our request): sent again once on another connection, for
            # idempotent methods only (RFC 9110 9.2.2). The balancer hears of the failed
            # attempt; the request stays with its endpoint (the same pool).
            ep, balancer = self.endpoint, self.balancer
            now = self._account(0, False, record=False)
            if ep is not None and balancer is not None:
                self.endpoint = ep
                balancer.on_start(ep, now)
            self.retried = True
            self.ubuf.clear()
            self.ubuf.append(self.request_bytes)
            self._acquire(self.pool)
            return
        self._account(0, False, record=False)
        if self.resp_state == R_NONE:
            self.ubuf.clear()
            self.local_reply(reason, message)
        else:
            # Part of the response went out: the client must see it cut short.
            if self.dstats is not None:
                self.dstats.record(0, _monotonic() - self.start)
            self.server.stats.local_reply(reason, self.dstats)
            self.flush()
            self.abort()

    def _account(self, status: int, ok: bool, record: bool = True) -> float:
        now = _monotonic()
        self._end_endpoint(now, ok)
        if record and self.dstats is not None:
            self.dstats.record(status, now - self.start)
        return now

    def _end_endpoint(self, now: float, ok: bool) -> None:
        """Tell the balancer the request it was told of (at the pick) is over: once."""
        ep = self.endpoint
        if ep is not None:
            self.endpoint = None
            if self.balancer is not None:
                self.balancer.on_end(ep, now, now - self.start, ok)

    # response events (ResponseCodec sink, while an upstream connection is bound) ----

    def on_informational(self, rhead: ResponseHead) -> None:
        # Relayed only where the client can use it (RFC 9110 15.2): 100 once, to a client
        # that sent `Expect: 100-continue`; 103 Early Hints at most MAX_EARLY_HINTS times;
        # other 1xx are dropped. The codec fails a flood of them (502).
        head = self.head
        if head is None or head.version != "1.1":
            return
        status = rhead.status
        if status == 100:
            if not head.expect_continue or self.interim & _SENT_CONTINUE:
                return
            self.interim |= _SENT_CONTINUE
        elif status == 103:
            if self.interim >> 1 >= MAX_EARLY_HINTS:
                return
            self.interim += 2
        else:
            return
        self.wbuf.append(encode_response_head(status, rhead.reason, rhead.headers))

    def on_response_head(self, rhead: ResponseHead) -> None:
        head = self.head
        assert head is not None
        status = rhead.status
        if status == 101 and head.upgrade is None:
            raise BadMessageError(
                "101 to a request that asked for no upgrade",
                status=502,
                reason=local_reply.UPSTREAM_PROTOCOL_ERROR,
            )
        self.status = status
        self.resp_state = R_HEAD
        self.phase = ACTIVE
        raw = rhead.raw
        if raw is not None and self.response_edit is None:
            # A cached head (2xx-5xx but not 204/304, Content-Length framing): the field
            # lines pass through as bytes, Via and Connection follow.
            self.resp_chunked = False
            if not rhead.keep_alive and self.upstream is not None:
                self.upstream.keep_alive = False
            if self.server.draining:
                self.keep_alive = False
            if not self.keep_alive:
                end = _RESP_END_CLOSE
            elif head.version == "1.0":
                end = _RESP_END_KEEP10
            else:
                end = _RESP_END
            if rhead is self.memo_rhead and end is self.memo_end:
                # The same cached head with the same ending as this connection's previous
                # response: the same bytes (a cached head never changes).
                self.wbuf.append(self.memo_head)
                return
            line = _STATUS_LINES.get(status)
            if line is None:
                line = _STATUS_LINES[status] = b"HTTP/1.1 %d %s\r\n" % (status, rhead.reason)
            self.memo_head = data = line + raw + end
            self.memo_rhead = rhead
            self.memo_end = end
            self.wbuf.append(data)
            return
        headers = rhead.headers
        if self.response_edit is not None:
            self.response_edit(headers)
        headers.append(_VIA11)
        if not rhead.keep_alive and self.upstream is not None:
            self.upstream.keep_alive = False
        if self.server.draining:
            self.keep_alive = False
        if status == 101:
            self.resp_state = R_SWITCHING
            headers.append((b"Connection", b"upgrade"))
            headers.append((b"Upgrade", rhead.upgrade or head.upgrade or b""))
            self.wbuf.append(encode_response_head(status, rhead.reason, headers))
            return
        if status in _NO_BODY or head.method == b"HEAD":
            self.resp_chunked = False
            if rhead.content_length is not None and status != 204:
                headers.append((b"Content-Length", b"%d" % rhead.content_length))
        elif rhead.content_length is not None:
            self.resp_chunked = False
            headers.append((b"Content-Length", b"%d" % rhead.content_length))
        elif head.version == "1.1":
            self.resp_chunked = True
            headers.append((b"Transfer-Encoding", b"chunked"))
        else:
            # An HTTP/1.0 client cannot read chunked: the body ends with the connection.
            self.resp_chunked = False
            self.keep_alive = False
        if not self.keep_alive:
            headers.append((b"Connection", b"close"))
        elif head.version == "1.0":
            headers.append((b"Connection", b"keep-alive"))
        self.wbuf.append(encode_response_head(status, rhead.reason, headers))

    def on_response_body(self, data: bytes) -> None:
        wbuf = self.wbuf
        if self.resp_chunked:
            wbuf.append(chunk_prefix(len(data)))
            wbuf.append(data)
            wbuf.append(b"\r\n")
        else:
            wbuf.append(data)

    def on_response_end(self, trailers: Fields | None) -> None:
        if self.resp_state == R_SWITCHING:
            return  # the tunnel takes over in on_upstream_switched
        if self.resp_chunked:
            self.wbuf.append(encode_last_chunk(trailers))
        self.resp_state = R_DONE
        now = _monotonic()
        latency = now - self.start
        status = self.status
        ep = self.endpoint
        if ep is not None:
            self.endpoint = None  # _end_endpoint(), inlined: on_end exactly once
            balancer = self.balancer
            if balancer is not None:
                balancer.on_end(ep, now, latency, status < 500)
        ds = self.dstats
        if ds is not None:
            # DestinationStats.record(), inlined: this runs once per request
            ds.by_class[status // 100 if 0 < status < 600 else 0] += 1
            ds.buckets[_bisect(LATENCY_BOUNDS, latency)] += 1
            ds.latency_sum += latency
        conn = self.upstream
        self.upstream = None
        if conn is not None:
            if self.req_done:
                pool = conn.pool
                codec = conn.codec
                if (
                    conn.keep_alive
                    and not (conn.closed or conn.reading_paused or codec.in_body)
                    and not (codec.upgraded or pool.closed or pool.waiters)
                    and len(pool.idle) < pool.policy.max_idle
                ):
                    # pool.release(), inlined for its common case: the connection goes
                    # back to the idle list (conn.unbind() with nothing paused).
                    conn.sink = None
                    codec.sink = UNOWNED
                    conn.idle_since = now
                    pool.idle.append(conn)
                else:
                    pool.release(conn, now)
            else:
                # Answered before the request ended: that connection is mid-request.
                conn.unbind()
                conn.close()
                self.keep_alive = False
        if self.req_done:
            if self.keep_alive and self.backlog is None and not self.server.draining:
                # finish(), inlined for the common case: the connection stays open.
                self.active = False
                self.head = None
                self.pool = None
                self.balancer = None
                self.response_edit = None
                self.phase = IDLE
                self.deadline = now + self.server.timeouts.idle
                # The response is complete and nothing follows it in this exchange: written
                # here, which spares the upstream connection its flush() (inlined: this
                # runs once per request).
                buf = self.wbuf
                if buf and not self.closed:
                    if len(buf) == 1:
                        self.transport.write(buf[0])
                    else:
                        self.transport.writelines(buf)
                    buf.clear()
                return
            self.finish(now)
        elif not self.keep_alive:
            self.finish(now)

    def on_upstream_switched(self, conn: UpstreamConnection, rest: bytes) -> None:
        """The upstream answered 101: from now on both sockets carry raw bytes."""
        from proxy.tunnel import splice

        if conn is not self.upstream or self.resp_state != R_SWITCHING:
            conn.abort()
            return
        self.upstream = None
        conn.pool.detach(conn)
        conn.unbind()
        self._account(101, True)
        self.flush()
        self._to_tunnel()
        splice(
            self.transport,
            conn.transport,
            to_a=rest,
            to_b=self.early or b"",
            on_close=self._tunnel_closed,
        )

    def _to_tunnel(self) -> None:
        stats = self.server.stats
        self.phase = TUNNEL
        self._gone()
        stats.tunnels_active += 1
        stats.tunnels_total += 1

    def _tunnel_closed(self) -> None:
        self.server.stats.tunnels_active -= 1

    async def _open_tunnel(self, exchange: int, host: str, port: int) -> None:
        """CONNECT host:port: dial, answer 200, then splice (a Task per CONNECT)."""
        from proxy.tunnel import dial, splice

        timeout = self.server.timeouts.connect
        try:
            upstream, parked = await dial(host, port, timeout)
        except (OSError, TimeoutError) as e:
            if exchange == self.exchange and not self.closed:
                detail = "timed out" if isinstance(e, TimeoutError) else str(e)
                self.local_reply(
                    local_reply.UPSTREAM_CONNECT_ERROR, f"connect to {host}:{port}: {detail}"
                )
                self.flush()
            return
        if exchange != self.exchange or self.closed:
            upstream.close()
            return
        guard = self.server.router.egress_guard
        what = guard.denied(upstream) if guard is not None else None
        if what is not None:
            upstream.abort()
            self.local_reply(local_reply.EGRESS_DENIED, f"CONNECT to {host}:{port} reaches {what}")
            self.flush()
            return
        self.flush()
        self.transport.write(b"HTTP/1.1 200 Connection Established\r\n\r\n")
        self.status = 200
        self._account(200, True)
        self._to_tunnel()
        splice(
            self.transport,
            upstream,
            to_a=parked.received,
            to_b=self.early or b"",
            on_close=self._tunnel_closed,
        )

    # local replies and the end of an exchange ---------------------------------------

    def local_reply(
        self, reason: str, message: str | None = None, *, status: int | None = None,
        close: bool = False,
    ) -> None:  # fmt: skip
        """Answer the current request ourselves (or cut the connection if too late)."""
        stats = self.server.stats
        stats.local_reply(reason, self.dstats)
        if self.resp_state != R_NONE:
            self.flush()
            self.abort()
            return
        head = self.head
        if close or not self.req_done:
            self.keep_alive = False
        code = status if status is not None else local_reply.REPLIES.get(reason, (500, ""))[0]
        self.status = code
        self.wbuf.append(
            local_reply.render(
                reason,
                message,
                status=code,
                close=not self.keep_alive,
                head_only=head is not None and head.method == b"HEAD",
                request_id=head.request_id if head is not None else None,
            )
        )
        self.resp_state = R_DONE
        if self.dstats is not None:
            self.dstats.record(code, _monotonic() - self.start)
        if head is None or self.req_done or not self.keep_alive:
            self.finish(_monotonic())

    def finish(self, now: float) -> None:
        """The exchange is over: keep the connection for the next request, or close it."""
        keep = self.keep_alive and not self.server.draining
        # A request its balancer was told of that never got a response (no connection,
        # pool overflow, a timeout while connecting): over now, as a failure.
        self._end_endpoint(now, False)
        # Only what holds references or is read between exchanges; the rest is set
        # again by the next on_request_head.
        self.active = False
        self.head = None
        self.pool = None
        self.balancer = None
        self.response_edit = None
        if not keep:
            self.close()
            return
        self.phase = IDLE
        self.deadline = now + self.server.timeouts.idle
        if self.backlog is not None:
            self._replay()

    def _replay(self) -> None:
        events = self.backlog or []
        self.backlog = None
        for i, (kind, value) in enumerate(events):
            if self.closed:
                return
            if self.backlog is not None:
                self.backlog.extend(events[i:])
                return
            if kind == 0:
                self.on_request_head(value)
            elif kind == 1:
                self.on_request_body(value)
            elif kind == 2:
                self.on_request_end(value)
            else:
                self._bad_request(value)
        if self.backlog is None:
            self.clear_pause(PAUSE_BACKLOG)

    def on_deadline(self) -> None:
        """Called by the sweep when this connection's current deadline passed."""
        phase = self.phase
        if phase == IDLE:
            self.close()
        elif phase == HEAD:
            self.local_reply(local_reply.HEADER_TIMEOUT, close=True)
        elif phase in (WAIT, ACTIVE):
            self._drop_upstream(record=False)
            if self.resp_state == R_NONE:
                self.ubuf.clear()
                message = (
                    f"no response within {self.request_timeout or self.server.timeouts.request}s"
                    if phase == WAIT
                    else f"no progress for {self.server.timeouts.idle}s"
                )
                self.local_reply(local_reply.UPSTREAM_TIMEOUT, message, close=phase == ACTIVE)
                self.flush()
            else:
                self.server.stats.local_reply(local_reply.UPSTREAM_TIMEOUT, self.dstats)
                self.abort()

    def __repr__(self) -> str:
        phase = ("idle", "head", "active", "wait", "tunnel")[self.phase]
        head = self.head
        req = f" {head.method.decode()} {head.target[:40]!r}" if head is not None else ""
        return (
            f"<DownstreamConnection {self.server.name} peer={self.peer.decode()} {phase}{req}"
            f" upstream={self.upstream!r}{' closed' if self.closed else ''}>"
        )
