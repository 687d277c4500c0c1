"""The exchange: one request and its response, a sans-IO state machine with one end.

An `Exchange` is made by the connection that received a request head (the HTTP/1
connection in proxy/downstream.py now, an HTTP/2 stream later) and driven by events
(`on_*`): the rest of the request, the router's answer, the pool's, the upstream
connection's (while bound, the exchange is its codec's sink), a CONNECT dial's, and the
connection's (deadline, client gone, bad request). It acts only through its
`Downstream` (bytes appended to `wbuf` for the client and `ubuf` for the upstream,
`flush`, pause/resume reading, `dial`, `exchange_done`) and the upstream connection it
holds: no sockets, no clock of its own (the server's `clock`).

Every request ends in `end(outcome)`, once: the typed outcome (proxy/outcome.py) is
what stats, the balancer's tracker (`on_end`, exactly once per `on_start`) and the
local-reply counters read, and where retries, outlier detection, spans and access logs
attach. Afterwards the connection reads `after` (keep the connection, close it, abort
it, or turn it into a tunnel).

States (`state`): ROUTING → CONNECTING (or DIALING for CONNECT) → SENDING →
RESPONDING (or SWITCHING after a 101) → ENDED. What each event does in the states it is
valid in (`TABLE` is the same, as data; tests/test_exchange.py walks every cell):

| event | valid in | does |
|---|---|---|
| request_body | ROUTING..RESPONDING | buffer (pause reading) until connected, then forward |
| request_end | ROUTING..RESPONDING | mark the request whole; arm the request timeout |
| routed | ROUTING | local reply (end), dial (DIALING), or take a connection |
| upstream_ready | CONNECTING | bind it, send what is buffered (SENDING) |
| upstream_failed | CONNECTING | end: connect failure (502) |
| tunnel_ready | DIALING | answer 200, end: completed, tunnel |
| tunnel_failed | DIALING | end: connect failure (502) |
| informational | SENDING | relay a 1xx to an HTTP/1.1 client |
| response_head | SENDING | relay the rewritten head (RESPONDING, or SWITCHING on 101) |
| response_body | RESPONDING | relay (re-chunked if needed) |
| response_end | RESPONDING, SWITCHING | end: completed, release the connection (SWITCHING: wait) |
| upstream_switched | SWITCHING | end: completed 101, tunnel |
| upstream_lost | SENDING..SWITCHING | retry once (reused connection), else end: reset |
| deadline, client_gone, bad_request | any but ENDED | drop the upstream, end |
| last_request | any but ENDED | the connection carries nothing after this exchange |

Anywhere else an event raises `ExchangeStateError` (the caller broke the protocol),
except an answer that arrives after the end (`LATE`: a discovery answer, a pool's
connection for a client that left), which is dropped, its resources returned.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final, Protocol

from proxy import local_reply
from proxy import outcome as outcomes
from proxy import retry as retries
from proxy.balance.outlier import classify
from proxy.errors import BadMessageError
from proxy.forwarding import (
    Forwarder,
    ResponseMemo,
    cached_response_head,
    forwarded_request_head,
    forwarded_response_head,
)
from proxy.heads import chunk_prefix, encode_last_chunk, encode_response_head
from proxy.outcome import Outcome
from proxy.pool import PoolOverflowError
from proxy.upstream import PAUSE_UPSTREAM as PAUSE_UPSTREAM  # the upstream's buffer is full

if TYPE_CHECKING:
    from collections.abc import Callable

    from proxy.balance import Endpoint
    from proxy.heads import Fields, RequestHead, ResponseHead
    from proxy.pool import Pool
    from proxy.resilience import Resilience
    from proxy.route_result import Peer, RouteResult
    from proxy.stats import ProxyStats
    from proxy.upstream import UpstreamConnection

ROUTING: Final = 0  # the head is in; waiting for the router's answer
CONNECTING: Final = 1  # routed to a pool; waiting for a connection
DIALING: Final = 2  # CONNECT: the tunnel's connection is being dialled
SENDING: Final = 3  # an upstream connection carries the request; no response head yet
RESPONDING: Final = 4  # the response head went to the client; its body follows
SWITCHING: Final = 5  # 101 relayed; the upstream connection becomes a tunnel
ENDED: Final = 6
STATE_NAMES: Final = (
    "routing",
    "connecting",
    "dialing",
    "sending",
    "responding",
    "switching",
    "ended",
)

# What the connection does once the exchange ended (`after`).
KEEP: Final = 0  # ready for the next request
CLOSE: Final = 1  # write what is pending, then close
ABORT: Final = 2  # the response was cut short: reset, so the client cannot take it as whole
TUNNEL: Final = 3  # splice the client with `tunnel` (transport, bytes it sent first)
GONE: Final = 4  # the client left: nothing to do

# Why reading from the client is paused (bits; reading resumes when none is left).
PAUSE_BACKLOG: Final = 1  # pipelined requests wait behind the one in flight
PAUSE_CONNECTING: Final = 4  # no upstream connection yet; body pieces would pile up
PAUSE_SWITCHING: Final = 8  # Upgrade/CONNECT: bytes after the head wait for the tunnel

# Deadlines: idle (renewed by progress), request (from the request's end to the response).
T_IDLE: Final = 0
T_REQUEST: Final = 1

# `flags`: a 100 was relayed; the request was sent again once; 103s relayed, counted in
# steps of _EARLY_HINT (at most MAX_EARLY_HINTS).
_SENT_CONTINUE = 1
_RETRIED = 2
_EARLY_HINT = 4
MAX_EARLY_HINTS = 2
_IDEMPOTENT = retries.IDEMPOTENT_METHODS
# `rflags` (resilience): an attempt is open (the tracker owes it an on_end); the
# request holds a slot of its breakers; its retry holds a retry slot.
_ATTEMPT = 1
_ADMITTED = 2
_RETRY_SLOT = 4

# The state table as data: event -> the states it is valid in (anything else raises,
# except in ENDED, where the events in `LATE` are dropped).
TABLE: Final[dict[str, frozenset[int]]] = {
    "request_body": frozenset({ROUTING, CONNECTING, DIALING, SENDING, RESPONDING}),
    "request_end": frozenset({ROUTING, CONNECTING, DIALING, SENDING, RESPONDING}),
    "routed": frozenset({ROUTING}),
    "upstream_ready": frozenset({CONNECTING}),
    "upstream_failed": frozenset({CONNECTING}),
    "tunnel_ready": frozenset({DIALING}),
    "tunnel_failed": frozenset({DIALING}),
    "informational": frozenset({SENDING}),
    "response_head": frozenset({SENDING}),
    "response_body": frozenset({RESPONDING}),
    "response_end": frozenset({RESPONDING, SWITCHING}),
    "upstream_switched": frozenset({SWITCHING}),
    "upstream_lost": frozenset({SENDING, RESPONDING, SWITCHING}),
    "deadline": frozenset({ROUTING, CONNECTING, DIALING, SENDING, RESPONDING, SWITCHING}),
    "client_gone": frozenset({ROUTING, CONNECTING, DIALING, SENDING, RESPONDING, SWITCHING}),
    "bad_request": frozenset({ROUTING, CONNECTING, DIALING, SENDING, RESPONDING, SWITCHING}),
    "last_request": frozenset({ROUTING, CONNECTING, DIALING, SENDING, RESPONDING, SWITCHING}),
}
# Events that may arrive after the end and are dropped (their resources given back):
# all but the response events, which come only from the upstream bound to the exchange.
LATE: Final = frozenset(TABLE) - {
    "informational",
    "response_head",
    "response_body",
    "response_end",
}


class ExchangeStateError(Exception):
    """An event arrived in a state where it cannot happen (a bug in the caller)."""


class Timeouts(Protocol):
    """Seconds (proxy/downstream.py's TimeoutPolicy)."""

    @property
    def idle(self) -> float: ...
    @property
    def request(self) -> float: ...


class TimerHandle(Protocol):
    def cancel(self) -> None: ...


class Rerouter(Protocol):
    def retry_route(
        self, head: RequestHead, peer: Peer, previous: RouteResult, tried: list[Any]
    ) -> RouteResult:
        """Where a retry goes: another endpoint of `previous`'s cluster where one is
        available (not in `tried`), else `previous`."""


class Server(Forwarder, Protocol):
    """What an exchange reads of its listener (proxy/downstream.py's ProxyServer)."""

    @property
    def router(self) -> Rerouter: ...
    def call_later(self, delay: float, callback: Callable[[], None]) -> TimerHandle:
        """Per-try timeouts and retry backoff (only requests with a retry policy)."""

    @property
    def timeouts(self) -> Timeouts: ...
    @property
    def stats(self) -> ProxyStats: ...
    @property
    def draining(self) -> bool: ...
    def clock(self) -> float: ...


class Downstream(Protocol):
    """What an exchange needs of the connection that carries it (its actions)."""

    @property
    def server(self) -> Server: ...
    @property
    def peer(self) -> Peer: ...
    @property
    def memo(self) -> ResponseMemo: ...

    # Bytes waiting for flush(): to the client, and to the upstream connection.
    wbuf: list[bytes]
    ubuf: list[bytes]

    def flush(self) -> None: ...
    def set_pause(self, bit: int) -> None: ...
    def clear_pause(self, bit: int) -> None: ...
    def dial(self, exchange: Exchange, host: str, port: int) -> None:
        """CONNECT: dial host:port, then call on_tunnel_ready / on_tunnel_failed."""

    def exchange_done(self, exchange: Exchange, now: float) -> None:
        """The exchange ended (`exchange.after` says what the connection does next)."""


class Exchange:
    """One request and its response (see the module's docstring for the state table).

    Only what changes per request lives here; what the router decided stays in `route`
    (a `RouteResult` the router may share between requests, never changed)."""

    __slots__ = (
        "abandoned",
        "after",
        "attempt",
        "attempt_start",
        "conn",
        "deadline",
        "flags",
        "head",
        "keep_alive",
        "outcome",
        "progress",
        "replay",
        "replay_size",
        "req_done",
        "request_bytes",
        "res",
        "resp_chunked",
        "rflags",
        "route",
        "rspec",
        "seen_progress",
        "server",
        "start",
        "state",
        "status",
        "timer",
        "timer_handle",
        "tried",
        "tunnel",
        "upstream",
    )

    outcome: Outcome
    after: int
    tunnel: tuple[Any, bytes]
    request_bytes: bytes
    resp_chunked: bool
    # Requests with a retry policy: endpoints tried, the connection given up last, how
    # many body bytes are kept for a replay, when the current attempt started.
    tried: list[Endpoint] | None
    abandoned: UpstreamConnection | None
    replay_size: int
    attempt_start: float

    def __init__(self, conn: Downstream, head: RequestHead) -> None:
        server = conn.server
        self.conn = conn
        self.server = server
        self.head = head
        self.state = ROUTING
        self.route: RouteResult | None = None
        self.upstream: UpstreamConnection | None = None
        self.req_done = False
        self.keep_alive = head.keep_alive and not server.draining
        self.flags = 0  # _SENT_CONTINUE, _RETRIED, 103s counted in steps of _EARLY_HINT
        self.start = now = server.clock()
        self.timer = T_IDLE
        self.deadline = now + server.timeouts.idle
        # Bumped by both sockets' data; the sweep renews the idle deadline on progress.
        self.progress = 0
        self.seen_progress = 0
        # Set when first needed: resp_chunked, request_bytes, tunnel, outcome, after,
        # and for requests with a resilience policy: rspec, replay_size, tried, abandoned.
        self.status = 0
        self.attempt = 0  # attempts so far (1: the first is out)
        self.rflags = 0
        self.res: Resilience | None = None
        self.replay: list[bytes] | None = None  # body bytes kept for a retry
        self.timer_handle: TimerHandle | None = None
        self.rspec: retries.RetrySpec | None = None

    def _invalid(self, event: str) -> None:
        """An event outside the table: dropped after the end if it may come late, else
        a clear error."""
        if self.state == ENDED and event in LATE:
            return
        raise ExchangeStateError(
            f"{event} in state {STATE_NAMES[self.state]} ({self.head.method.decode()} "
            f"{self.head.target[:60]!r})"
        )

    @property
    def retried(self) -> bool:
        """Whether the request was sent again (once, after a reused connection's reset)."""
        return bool(self.flags & _RETRIED)

    @property
    def pool(self) -> Pool | None:
        route = self.route
        return route.pool if route is not None else None

    # -- request events ---------------------------------------------------------------

    def on_request_body(self, data: bytes) -> None:
        state = self.state
        if state > RESPONDING:
            self._invalid("request_body")  # after a local reply or early response: dropped
            return
        ubuf = self.conn.ubuf
        if self.head.chunked:
            ubuf.append(chunk_prefix(len(data)))
            ubuf.append(data)
            ubuf.append(b"\r\n")
        else:
            ubuf.append(data)
        replay = self.replay
        if replay is not None:
            self._keep_for_replay(replay, data)
        if self.upstream is None and state != DIALING:
            self.conn.set_pause(PAUSE_CONNECTING)

    def on_request_end(self, trailers: Fields | None) -> None:
        state = self.state
        if state > RESPONDING:
            self._invalid("request_end")
            return
        self.req_done = True
        if self.head.chunked:
            last = encode_last_chunk(trailers)
            self.conn.ubuf.append(last)
            if self.replay is not None:
                self.replay.append(last)
        if state < RESPONDING and state != DIALING:
            self.timer = T_REQUEST
            self.deadline = self.server.clock() + self._request_timeout()

    def _request_timeout(self) -> float:
        route = self.route
        timeout = route.request_timeout if route is not None else 0.0
        return timeout or self.server.timeouts.request

    # -- routing --------------------------------------------------------------------------

    def on_routed(self, result: RouteResult) -> None:
        """The router's answer (at once, or later for a service not seen before): a
        local reply, a tunnel to dial, or a pool to take a connection from."""
        if self.state != ROUTING:
            self._invalid("routed")
            return
        self.route = result
        reply = result.reply
        if reply is not None:
            self.local_reply(reply.reason, reply.message, status=reply.status, close=reply.close)
            return
        if result.tunnel is not None:
            self.state = DIALING
            self.conn.dial(self, *result.tunnel)
            return
        pool = result.pool
        if pool is None:
            raise ExchangeStateError(f"{result!r} names no destination")
        # The balancer hears of the request at the pick, not once a connection is
        # attached: a burst to an endpoint still connecting must see it busy. It hears
        # of the attempt's end exactly once (_attempt_end).
        self._attempt_start(result, self.start)
        res = result.resilience
        if res is not None and self._resilient(res):
            return
        if self.timer == T_REQUEST and result.request_timeout:
            # The request ended while routing: its timeout is the route's.
            self.deadline = self.start + result.request_timeout
        conn = self.conn
        # The rewritten head goes before any body bytes that arrived meanwhile.
        path = result.path
        self.request_bytes = data = forwarded_request_head(
            self.head, path if path is not None else self.head.target, conn.peer, self.server
        )
        ubuf = conn.ubuf
        if ubuf:
            ubuf.insert(0, data)
        else:
            ubuf.append(data)
        self._acquire(pool)
        if self.rspec is not None and self.state < RESPONDING:
            self._arm_try()

    def _acquire(self, pool: Pool) -> None:
        self.state = CONNECTING
        try:
            up = pool.acquire(self)
        except PoolOverflowError as e:
            self.conn.ubuf.clear()
            reason = local_reply.DRAINING if pool.closed else local_reply.OVERFLOW
            self.local_reply(reason, str(e))
            return
        if up is not None:
            self._attach(up)
        elif not self.req_done:
            self.conn.set_pause(PAUSE_CONNECTING)

    def _attach(self, up: UpstreamConnection) -> None:
        self.state = SENDING
        self.upstream = up
        up.bind(self, self.head.method == b"HEAD")

    # -- the pool's answers (PoolWaiter) ------------------------------------------------

    def on_upstream_ready(self, up: UpstreamConnection) -> None:
        if self.state != CONNECTING:
            if self.state == ENDED:
                up.pool.release(up, self.server.clock())
                return
            self._invalid("upstream_ready")
        self._attach(up)
        conn = self.conn
        conn.flush()
        conn.clear_pause(PAUSE_CONNECTING)

    def on_upstream_failed(self, reason: str, message: str) -> None:
        if self.state != CONNECTING:
            self._invalid("upstream_failed")
            return
        conn = self.conn
        conn.ubuf.clear()
        if self.res is not None:
            code = local_reply.REPLIES.get(reason, (502, ""))[0]
            failed = outcomes.local(outcomes.ConnectFailure, reason, code)
            if self._retry(retries.F_CONNECT, failed, message):
                conn.flush()
                return
        conn.clear_pause(PAUSE_CONNECTING)
        self._reply(outcomes.ConnectFailure, reason, message)
        conn.flush()

    # -- CONNECT --------------------------------------------------------------------------

    def on_tunnel_ready(self, transport: Any, received: bytes) -> None:
        """The CONNECT dial succeeded: answer 200 and hand both sockets to a tunnel."""
        if self.state != DIALING:
            if self.state == ENDED:
                transport.close()
                return
            self._invalid("tunnel_ready")
        self.conn.wbuf.append(b"HTTP/1.1 200 Connection Established\r\n\r\n")
        self.status = 200
        self.tunnel = (transport, received)
        self.end(outcomes.completed(200), TUNNEL)

    def on_tunnel_failed(self, reason: str, message: str) -> None:
        """The CONNECT dial failed (upstream_connect_error), or reached what egress may
        not (egress_denied)."""
        if self.state != DIALING:
            self._invalid("tunnel_failed")
            return
        self._reply(outcomes.ConnectFailure, reason, message)
        self.conn.flush()

    # -- response events (the bound upstream codec's sink) ------------------------------

    def on_informational(self, rhead: ResponseHead) -> None:
        # Relayed only where the client can use it (RFC 9110 15.2): 100 once, to a client
        # that sent `Expect: 100-continue`; 103 Early Hints at most MAX_EARLY_HINTS times;
        # other 1xx are dropped. The codec fails a flood of them (502).
        if self.state != SENDING:
            if self._stale():
                return
            self._invalid("informational")
        head = self.head
        if head.version != "1.1":
            return
        status = rhead.status
        if status == 100:
            if not head.expect_continue or self.flags & _SENT_CONTINUE:
                return
            self.flags |= _SENT_CONTINUE
        elif status == 103:
            if self.flags // _EARLY_HINT >= MAX_EARLY_HINTS:
                return
            self.flags += _EARLY_HINT
        else:
            return
        self.conn.wbuf.append(encode_response_head(status, rhead.reason, rhead.headers))

    def on_response_head(self, rhead: ResponseHead) -> None:
        if self.state != SENDING:
            if self._stale():
                return
            self._invalid("response_head")
        if self.timer_handle is not None:
            self._cancel_timer()  # the per-try timeout covers the wait for this head
        head = self.head
        status = rhead.status
        spec = self.rspec
        if spec is not None and status >= 200 and self._retry_response(spec, rhead):
            return
        if status == 101 and head.upgrade is None:
            raise BadMessageError(
                "101 to a request that asked for no upgrade",
                status=502,
                reason=local_reply.UPSTREAM_PROTOCOL_ERROR,
            )
        self.status = status
        self.state = RESPONDING
        self.timer = T_IDLE
        if not rhead.keep_alive:
            up = self.upstream
            if up is not None:
                up.keep_alive = False
        if self.server.draining:
            self.keep_alive = False
        route = self.route
        edit = route.response_edit if route is not None else None
        if rhead.raw is not None and edit is None:
            # A cached head (2xx-5xx but not 204/304, Content-Length framing).
            self.resp_chunked = False
            self.conn.wbuf.append(
                cached_response_head(rhead, head.version, self.keep_alive, self.conn.memo)
            )
            return
        if status == 101:
            self.state = SWITCHING
        data, self.resp_chunked, self.keep_alive = forwarded_response_head(
            rhead, head, self.keep_alive, edit
        )
        self.conn.wbuf.append(data)

    def on_response_body(self, data: bytes) -> None:
        if self.state != RESPONDING:
            if self._stale():
                return
            self._invalid("response_body")
        wbuf = self.conn.wbuf
        if self.resp_chunked:
            wbuf.append(chunk_prefix(len(data)))
            wbuf.append(data)
            wbuf.append(b"\r\n")
        else:
            wbuf.append(data)

    def on_response_end(self, trailers: Fields | None) -> None:
        state = self.state
        if state != RESPONDING:
            if state == SWITCHING or self._stale():
                return  # the tunnel takes over in on_upstream_switched
            self._invalid("response_end")
        if self.resp_chunked:
            self.conn.wbuf.append(encode_last_chunk(trailers))
        now = self.server.clock()
        up = self.upstream
        self.upstream = None
        if up is not None:
            if self.req_done:
                up.pool.release(up, now)
            else:
                # Answered before the request ended: that connection is mid-request.
                up.unbind()
                up.close()
                self.keep_alive = False
        after = KEEP if self.keep_alive and self.req_done else CLOSE
        self.end(outcomes.completed(self.status), after, now)

    def on_upstream_switched(self, up: UpstreamConnection, rest: bytes) -> None:
        """The upstream answered 101: from now on both sockets carry raw bytes."""
        if up is not self.upstream or self.state != SWITCHING:
            up.abort()
            if self.state != ENDED:
                self._invalid("upstream_switched")
            return
        self.upstream = None
        up.pool.detach(up)
        up.unbind()
        self.tunnel = (up.transport, rest)
        self.end(outcomes.completed(101), TUNNEL)

    def on_upstream_lost(self, up: UpstreamConnection, reason: str, message: str) -> None:
        if up is not self.upstream:
            if self.state == ENDED or (self.res is not None and up is self.abandoned):
                return  # the connection of an attempt given up for a retry
            self._invalid("upstream_lost")
        self.upstream = None
        up.unbind()
        head = self.head
        route = self.route
        if (
            self.state == SENDING
            and reason == local_reply.UPSTREAM_RESET
            and up.requests > 1
            and not self.flags & _RETRIED
            and not head.has_body
            and head.method in _IDEMPOTENT
            and route is not None
            and route.pool is not None
        ):
            # A reused keep-alive connection the server closed as we sent (its idle
            # timeout raced our request): sent again once on another connection, for
            # idempotent methods only (RFC 9110 9.2.2). The balancer hears of the failed
            # attempt; the request stays with its endpoint (the same pool).
            ep, tracker = route.endpoint, route.tracker
            if ep is not None and tracker is not None:
                now = self.server.clock()
                tracker.on_end(ep, now, now - self.start, False)
                tracker.on_start(ep, now)
            self.flags |= _RETRIED
            ubuf = self.conn.ubuf
            ubuf.clear()
            ubuf.append(self.request_bytes)
            self._acquire(route.pool)
            return
        if self.state == SENDING and self.res is not None:
            failed = outcomes.local(outcomes.Reset, reason, 502)
            if self._retry(retries.F_RESET, failed, message):
                return
        self._reply(outcomes.Reset, reason, message)

    # -- what the bound upstream connection asks of it (proxy/upstream.py) -------------

    def flush(self) -> None:
        # After the end the connection has written everything itself (exchange_done).
        if self.state != ENDED:
            self.conn.flush()

    def set_pause(self, bit: int) -> None:
        self.conn.set_pause(bit)

    def clear_pause(self, bit: int) -> None:
        self.conn.clear_pause(bit)

    # -- the connection's events ----------------------------------------------------------

    def on_deadline(self) -> None:
        """The sweep saw this exchange's deadline pass."""
        if self.state == ENDED:
            return
        waiting = self.timer == T_REQUEST
        self._drop_upstream()
        which: outcomes.TimeoutKind = "request" if waiting else "idle"
        if self.state < RESPONDING:
            self.conn.ubuf.clear()
            message = (
                f"no response within {self._request_timeout()}s"
                if waiting
                else f"no progress for {self.server.timeouts.idle}s"
            )
            # The whole request's timeout and the idle one: each its own reason.
            reason = local_reply.REQUEST_TIMEOUT if waiting else local_reply.UPSTREAM_TIMEOUT
            status = local_reply.REPLIES[reason][0]
            self._render(reason, message, status, close=not waiting)
            after = KEEP if self.keep_alive and self.req_done else CLOSE
            self.end(outcomes.timeout(which, reason, status), after)
        else:
            self.end(outcomes.timeout(which, local_reply.UPSTREAM_TIMEOUT, 0), ABORT)
        self.conn.flush()

    def on_client_gone(self) -> None:
        """The client's connection closed: the upstream connection's state is unknown."""
        if self.state == ENDED:
            return
        self._drop_upstream()
        self.end(outcomes.CLIENT_GONE, GONE)

    def on_last_request(self) -> None:
        """Nothing follows this request on its connection (the client half-closed, or
        its codec switched protocols): the response says `Connection: close`."""
        if self.state == ENDED:
            return
        self.keep_alive = False

    def on_bad_request(self, e: BadMessageError) -> None:
        """The request body was malformed mid-stream: the upstream got part of a request."""
        if self.state == ENDED:
            return
        self._drop_upstream()
        if self.state < RESPONDING:
            self.conn.ubuf.clear()
            self.local_reply(e.reason, e.message, status=e.status, close=True)
        else:
            self.end(outcomes.local(outcomes.Reset, e.reason, 0), ABORT)

    def _drop_upstream(self) -> None:
        """Stop waiting for a connection and abort the one in use: its state is unknown."""
        if self.timer_handle is not None:
            self._cancel_timer()
        up = self.upstream
        if up is not None:
            self.upstream = None
            up.unbind()
            up.abort()
        elif self.state == CONNECTING:
            pool = self.pool
            if pool is not None:
                pool.cancel(self)

    # -- answering ------------------------------------------------------------------------

    def local_reply(
        self, reason: str, message: str | None = None, *, status: int | None = None,
        close: bool = False,
    ) -> None:  # fmt: skip
        """Answer the request ourselves (or cut the response short if it started)."""
        self._reply(outcomes.LocalReply, reason, message, status=status, close=close)

    def _reply(
        self, kind: type[Outcome], reason: str, message: str | None, *,
        status: int | None = None, close: bool = False,
    ) -> None:  # fmt: skip
        if self.state >= RESPONDING:
            # Part of the response went out: the client must see it cut short.
            cut = outcomes.Reset if kind is outcomes.LocalReply else kind
            self.end(outcomes.local(cut, reason, 0), ABORT)
            return
        code = status if status is not None else local_reply.REPLIES.get(reason, (500, ""))[0]
        self._render(reason, message, code, close)
        after = KEEP if self.keep_alive and self.req_done else CLOSE
        self.end(outcomes.local(kind, reason, code), after)

    def _render(self, reason: str, message: str | None, code: int, close: bool) -> None:
        head = self.head
        if close or not self.req_done:
            self.keep_alive = False
        self.status = code
        self.conn.wbuf.append(
            local_reply.render(
                reason,
                message,
                status=code,
                close=not self.keep_alive,
                head_only=head.method == b"HEAD",
                request_id=head.request_id,
            )
        )

    # -- attempts: retries, per-try timeouts, breakers, outlier detection ---------------
    #
    # An attempt starts at `_attempt_start` (the pick's tracker hears of it) and ends at
    # `_attempt_end` with its own typed outcome (the tracker and the outlier detector
    # read it); a request has one attempt, or more when its route's retry policy
    # (proxy/retry.py) sends it again. Nothing of a failed attempt reaches the client.

    def _attempt_start(self, route: RouteResult, now: float) -> None:
        self.attempt += 1
        self.attempt_start = now
        ep, tracker = route.endpoint, route.tracker
        if ep is not None and tracker is not None:
            tracker.on_start(ep, now)
            self.rflags |= _ATTEMPT
        ds = route.dstats
        if ds is not None:
            ds.attempts += 1

    def _attempt_end(self, outcome: Outcome, now: float) -> None:
        self.rflags &= ~_ATTEMPT
        route = self.route
        assert route is not None
        ep, tracker = route.endpoint, route.tracker
        if ep is not None and tracker is not None:
            tracker.on_end(ep, now, now - self.attempt_start, outcome.ok)
        res = self.res
        if res is not None:
            if self.rflags & _RETRY_SLOT:
                self.rflags &= ~_RETRY_SLOT
                res.retry_done()
            detector, cluster = res.outlier, res.cluster
            if detector is not None and ep is not None and cluster is not None:
                what = classify(outcome.kind, outcome.status)
                detector.observe(ep, what, now, cluster.endpoints)

    def _release(self, outcome: Outcome, now: float) -> None:
        """At the end: the open attempt ends with the request's outcome; the breakers'
        slots and the timer are given back."""
        if self.rflags & _ATTEMPT:
            self._attempt_end(outcome, now)
        res = self.res
        if res is not None:
            if self.timer_handle is not None:
                self._cancel_timer()
            if self.rflags & _ADMITTED:
                res.release()
        self.rflags = 0

    def _stale(self) -> bool:
        """Whether a response event comes from the connection of an attempt given up
        for a retry (its codec finishes the bytes it was parsing; they are dropped)."""
        return (
            self.res is not None
            and self.abandoned is not None
            and self.state
            in (
                CONNECTING,
                ENDED,
            )
        )

    def _resilient(self, res: Resilience) -> bool:
        """The route has a resilience policy: take the breakers' slots (True: refused,
        answered 503 overflow), count the request in the retry budget, keep its body."""
        self.res = res
        self.tried = None
        self.abandoned = None
        if res.breaker is not None or res.rule_breaker is not None:
            refused = res.admit()
            if refused is not None:
                self.conn.ubuf.clear()
                self.local_reply(
                    local_reply.OVERFLOW,
                    f"circuit breaker {refused.name}: "
                    f"{refused.spec.max_active_requests} requests in flight",
                )
                return True
            self.rflags |= _ADMITTED
        spec = res.retry
        if spec is not None and res.budget is not None:
            if spec.header_override:
                spec = _overridden(spec, self.head.headers)
            self.rspec = spec
            res.budget.request(self.start)
            # Body bytes that came before the route (the head goes first, apart).
            pieces = list(self.conn.ubuf)
            self.replay = pieces
            self.replay_size = 0
            for piece in pieces:
                self._keep_for_replay([], piece)
        return False

    def _keep_for_replay(self, replay: list[bytes], data: bytes) -> None:
        size = self.replay_size + len(data)
        spec = self.rspec
        if spec is None or size > spec.buffer_limit:
            self.replay = None  # too long to send again: never retried
            return
        self.replay_size = size
        if replay is self.replay:
            if self.head.chunked:
                replay.append(chunk_prefix(len(data)))
                replay.append(data)
                replay.append(b"\r\n")
            else:
                replay.append(data)

    def _arm_try(self) -> None:
        spec = self.rspec
        if spec is not None and spec.per_try_timeout:
            self.timer_handle = self.server.call_later(spec.per_try_timeout, self.on_try_timeout)

    def _cancel_timer(self) -> None:
        handle = self.timer_handle
        self.timer_handle = None
        if handle is not None:
            handle.cancel()

    def on_try_timeout(self) -> None:
        """The per-try timeout fired before the attempt's response head."""
        self.timer_handle = None
        if self.state not in (CONNECTING, SENDING):
            return
        self._drop_upstream()
        conn = self.conn
        conn.ubuf.clear()
        reason = local_reply.PER_TRY_TIMEOUT
        status = local_reply.REPLIES[reason][0]
        failed = outcomes.timeout("per_try", reason, status)
        spec = self.rspec
        message = f"no response within the per-try timeout ({spec.per_try_timeout if spec else 0}s)"
        if not self._retry(retries.F_TIMEOUT, failed, message):
            conn.clear_pause(PAUSE_CONNECTING)
            self._render(reason, message, status, close=False)
            after = KEEP if self.keep_alive and self.req_done else CLOSE
            self.end(failed, after)
        conn.flush()

    def _retry_response(self, spec: retries.RetrySpec, rhead: ResponseHead) -> bool:
        """A response head the policy may retry (its status, or headers): True when the
        exchange took it (a retry, or 503 retry_budget_exhausted), so it is not relayed."""
        status = rhead.status
        names = None
        if spec.reads_headers:
            names = frozenset(n.lower() for n, _ in rhead.headers)
        failure = retries.F_STATUS
        if not spec.retriable(failure, status, names):
            # A remote sidecar's own 502/503: its app refused, or reset (one hop on).
            failure = retries.remote(status, rhead.headers)
            if not failure or not spec.retriable(failure):
                return False
        return self._retry(failure, outcomes.completed(status), f"the upstream answered {status}")

    def _retry(self, failure: int, failed: Outcome, message: str) -> bool:
        """An attempt failed before its response head was relayed: send the request
        again (True) after a backoff, to another endpoint where there is one, if the
        policy covers the failure and allows another attempt; else False (the caller
        ends the request with the failure), or, when only the budget is spent, answer
        `retry_budget_exhausted` with the failure's status (True)."""
        spec, res = self.rspec, self.res
        if spec is None or res is None or res.budget is None:
            return False
        if failure != retries.F_STATUS and not spec.retriable(failure):
            return False
        now = self.server.clock()
        refused = failure == retries.F_CONNECT or failure == retries.F_REFUSED
        why = retries.may_retry(
            spec, self.attempt, self.head.method, self.replay is not None, res.budget, now, refused
        )
        route = self.route
        assert route is not None
        if (
            not why
            and failed.reason == local_reply.UPSTREAM_CONNECT_TIMEOUT
            and not self._elsewhere(route, now)
        ):
            why = retries.NO_OTHER_ENDPOINT  # a second timeout on the same endpoint is likely
        if not why and not res.admit_retry():
            why = retries.OVERFLOW
        ds = route.dstats
        if why:
            if ds is not None:
                ds.retries_refused[why] = ds.retries_refused.get(why, 0) + 1
            if why != retries.BUDGET_EXHAUSTED:
                return False
            self._abandon()
            self._attempt_end(failed, now)
            self.conn.ubuf.clear()
            self.conn.clear_pause(PAUSE_CONNECTING)
            self._reply(
                outcomes.LocalReply,
                local_reply.RETRY_BUDGET_EXHAUSTED,
                f"{message}; not retried: the retry budget of {res.name} is spent",
                status=failed.status or 503,
            )
            return True
        res.budget.spend(now)
        if ds is not None:
            ds.retries += 1
        self._abandon()
        self._attempt_end(failed, now)
        self.rflags |= _RETRY_SLOT
        tried = self.tried
        if tried is None:
            tried = self.tried = []
        if route.endpoint is not None:
            tried.append(route.endpoint)
        self.state = CONNECTING
        self.status = 0
        self.conn.ubuf.clear()
        if not self.req_done:
            self.conn.set_pause(PAUSE_CONNECTING)
        delay = retries.backoff(spec, self.attempt, retries.RNG)
        self.timer_handle = self.server.call_later(delay, self._send_retry)
        return True

    def _elsewhere(self, route: RouteResult, now: float) -> bool:
        """Whether the cluster has an available endpoint this request has not tried."""
        res = self.res
        cluster = res.cluster if res is not None else None
        if cluster is None:
            return False
        tried = self.tried or ()
        return any(
            ep is not route.endpoint and ep not in tried and ep.available(now)
            for ep in cluster.endpoints
        )

    def _abandon(self) -> None:
        """Give up the attempt's connection (mid-response, or mid-request)."""
        up = self.upstream
        if up is not None:
            self.upstream = None
            self.abandoned = up
            up.unbind()
            up.abort()

    def _send_retry(self) -> None:
        """The backoff is over: the next attempt, on the endpoint the router picks."""
        self.timer_handle = None
        if self.state != CONNECTING or self.upstream is not None:
            return
        route = self.route
        assert route is not None
        server = self.server
        tried = self.tried or []
        nxt = server.router.retry_route(self.head, self.conn.peer, route, tried)
        if nxt.pool is None:
            nxt = route  # nowhere else (no endpoint available): the same one again
        self.route = nxt
        self._attempt_start(nxt, server.clock())
        conn = self.conn
        ubuf = conn.ubuf
        ubuf.clear()
        data = self.request_bytes
        ubuf.append(b"%sx-tether-attempt: %d\r\n\r\n" % (data[:-2], self.attempt))
        if self.replay:
            ubuf.extend(self.replay)
        pool = nxt.pool
        assert pool is not None
        self._acquire(pool)
        if self.state == SENDING:
            conn.clear_pause(PAUSE_CONNECTING)
        if self.state < RESPONDING:
            self._arm_try()
        conn.flush()

    # -- the end --------------------------------------------------------------------------

    def end(self, outcome: Outcome, after: int = CLOSE, now: float = 0.0) -> None:
        """Where every request ends, once: the outcome goes to the balancer's tracker
        (`on_end`, owed since the pick's `on_start`), the destination's stats and the
        local-reply counters; then the connection does `after` (KEEP, CLOSE, ABORT,
        TUNNEL, GONE). Later features read the outcome here: outlier detection, retry
        budgets, spans, access logs."""
        if self.state == ENDED:
            raise ExchangeStateError(f"ended twice: {self.outcome!r}, then {outcome!r}")
        self.state = ENDED
        self.outcome = outcome
        self.after = after
        if not now:
            now = self.server.clock()
        route = self.route
        ds = None
        if route is not None:
            if self.rflags:
                self._release(outcome, now)
            ds = route.dstats
            if ds is not None:
                ds.record(outcome.status, now - self.start)
        if outcome.reason:
            self.server.stats.local_reply(outcome.reason, ds)
        self.conn.exchange_done(self, now)

    def __repr__(self) -> str:
        head = self.head
        up = f" upstream={self.upstream!r}" if self.upstream is not None else ""
        out = f" {self.outcome!r}" if self.state == ENDED else ""
        return (
            f"<Exchange {head.method.decode()} {head.target[:40]!r}"
            f" {STATE_NAMES[self.state]}{up}{out}>"
        )


_RETRY_ATTEMPTS = b"x-tether-retry-attempts"
_RETRY_ON = b"x-tether-retry-on"


def _overridden(spec: retries.RetrySpec, headers: Fields) -> retries.RetrySpec:
    """The policy as the request's x-tether-retry-* headers change it (allowHeaderOverride)."""
    attempts = on = None
    for name, value in headers:
        low = name.lower()
        if low == _RETRY_ATTEMPTS:
            attempts = value
        elif low == _RETRY_ON:
            on = value
    return spec.override(attempts, on) if attempts is not None or on is not None else spec
