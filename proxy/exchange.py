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
| upstream_failed | CONNECTING | retry (after a backoff), or end: connect failure |
| tunnel_ready | DIALING | answer 200, end: completed, tunnel |
| tunnel_failed | DIALING | end: connect failure (502) |
| informational | SENDING | relay a 1xx to an HTTP/1.1 client |
| response_head | SENDING | retry (a status the policy covers), or relay (RESPONDING, SWITCHING) |
| response_body | RESPONDING | relay (re-chunked if needed) |
| response_end | RESPONDING, SWITCHING | end: completed, release the connection (SWITCHING: wait) |
| upstream_switched | SWITCHING | end: completed 101, tunnel |
| upstream_lost | SENDING..SWITCHING | retry (before a head), else end: reset |
| try_timeout | CONNECTING, SENDING | retry, or end: 504 per_try_timeout |
| deadline, client_gone, bad_request | any but ENDED | drop the upstream, end |
| last_request | any but ENDED | the connection carries nothing after this exchange |

A routed request whose rule mirrors it (`RouteResult.mirror`, proxy/mirror.py) also has
a `MirrorCopy`: request_body feeds it (up to its limit), request_end sends it; the copy
never touches this exchange's state.

Anywhere else an event raises `ExchangeStateError` (the caller broke the protocol),
except an answer that arrives after the end (`LATE`: a discovery answer, a pool's
connection for a client that left), which is dropped, its resources returned, and the
rest of a response whose attempt was given up for a retry.

Retries, per-try timeouts, circuit breakers and the outlier detector's input are the
attempts' part (proxy/attempts.py, this class's base): each attempt has its own start
and end around the pick, its connection and its typed outcome.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from proxy import local_reply
from proxy import outcome as outcomes
from proxy import retry as retries
from proxy.attempts import _ATTEMPT, Attempts
from proxy.errors import BadMessageError
from proxy.forwarding import (
    cached_response_head,
    forwarded_request_head,
    forwarded_response_head,
)
from proxy.heads import chunk_prefix, encode_last_chunk, encode_response_head
from proxy.outcome import Outcome
from proxy.pool import PoolOverflowError
from proxy.upstream import PAUSE_UPSTREAM as PAUSE_UPSTREAM  # the upstream's buffer is full

if TYPE_CHECKING:
    from proxy.exchange_states import Downstream
    from proxy.heads import Fields, RequestHead, ResponseHead
    from proxy.mirror import MirrorCopy
    from proxy.pool import Pool
    from proxy.route_result import RouteResult
    from proxy.trace_context import Propagation
    from proxy.tracing import SampledTrace
    from proxy.upstream import UpstreamConnection

from proxy.exchange_states import (
    ABORT,
    CLOSE,
    CONNECTING,
    DIALING,
    ENDED,
    GONE,
    KEEP,
    LATE,
    PAUSE_CONNECTING,
    RESPONDING,
    ROUTING,
    SENDING,
    SERVE,
    STATE_NAMES,
    SWITCHING,
    T_IDLE,
    T_REQUEST,
    TUNNEL,
)  # fmt: skip

# `flags`: a 100 was relayed; the request was sent again once (_RETRIED, attempts.py's
# `_resend_stale`); 103s relayed, counted in steps of _EARLY_HINT (at most MAX_EARLY_HINTS).
_SENT_CONTINUE = 1
_EARLY_HINT = 4
MAX_EARLY_HINTS = 2


class ExchangeStateError(Exception):
    """An event arrived in a state where it cannot happen (a bug in the caller)."""


class Exchange(Attempts):
    """One request and its response (see the module's docstring for the state table).

    Only what changes per request lives here; what the router decided stays in `route`
    (a `RouteResult` the router may share between requests, never changed)."""

    __slots__ = (
        "after",
        "attempts",
        "bytes_in",
        "bytes_out",
        "conn",
        "deadline",
        "head",
        "keep_alive",
        "mirror",
        "outcome",
        "progress",
        "req_done",
        "request_bytes",
        "resp_chunked",
        "seen_progress",
        "server",
        "start",
        "timer",
        "trace",
        "tunnel",
    )

    outcome: Outcome
    after: int
    tunnel: tuple[Any, bytes]
    request_bytes: bytes
    resp_chunked: bool

    def __init__(self, conn: Downstream, head: RequestHead) -> None:
        server = conn.server
        self.conn = conn
        self.server = server
        self.head = head
        self.state = ROUTING
        self.route: RouteResult | None = None
        self.upstream: UpstreamConnection | None = None
        self.req_done = False
        self.mirror: MirrorCopy | None = None  # the copy of the request for a shadow
        self.keep_alive = head.keep_alive and not server.draining
        self.flags = 0  # _SENT_CONTINUE, _RETRIED, 103s counted in steps of _EARLY_HINT
        self.start = now = server.clock()
        self.timer = T_IDLE
        self.deadline = now + server.timeouts.idle
        # Bumped by both sockets' data; the sweep renews the idle deadline on progress.
        self.progress = 0
        self.seen_progress = 0
        # Set when first needed: resp_chunked, request_bytes, tunnel, outcome, after.
        self.status = 0
        self.attempt = 0  # attempts so far (1: the first is out)
        self.rflags = 0  # proxy/attempts.py's
        self.res = None  # the route's Resilience, when it has one
        self.replay = None  # body bytes kept for a retry
        self.timer_handle = None
        self.rspec = None  # the retry policy in force
        # Attempts sent upstream; body bytes received from the client and sent to it.
        self.attempts = self.bytes_in = self.bytes_out = 0
        # This request's trace (proxy/tracing.py): None when tracing is off, or the
        # incoming context goes on unchanged. Decided in plain code, per request.
        tracer = server.tracer
        self.trace: SampledTrace | Propagation | None = (
            tracer.begin(self) if tracer is not None else None
        )

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
    def pool(self) -> Pool | None:
        route = self.route
        return route.pool if route is not None else None

    # -- request events ---------------------------------------------------------------

    def on_request_body(self, data: bytes) -> None:
        state = self.state
        if state > RESPONDING:
            self._invalid("request_body")  # after a local reply or early response: dropped
            return
        self.bytes_in += len(data)
        ubuf = self.conn.ubuf
        if self.mirror is not None:
            self.mirror = self.mirror.feed(data)
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
        if self.mirror is not None:
            self.mirror.send()
            self.mirror = None
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
            self.local_reply(
                reply.reason, reply.message, status=reply.status, close=reply.close,
                headers=reply.headers,
            )  # fmt: skip
            return
        if result.tunnel is not None:
            self.state = DIALING
            self.conn.dial(self, *result.tunnel)
            return
        if result.serve is not None:
            self.conn.wbuf.append(b"HTTP/1.1 200 Connection Established\r\n\r\n")
            self.status = 200
            self.end(outcomes.completed(200), SERVE)
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
        tap = result.mirror
        if tap is not None:
            # Body pieces that arrived while it was routed are in ubuf, not yet framed.
            self.mirror = tap.copy(self.head, result.path, self.conn.ubuf, self.req_done)
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
        spec = self.rspec
        if spec is not None and spec.per_try_timeout and self.state < RESPONDING:
            self._arm_try()

    def _acquire(self, pool: Pool) -> None:
        """One attempt: a connection from `pool` for the request in `ubuf` (its head,
        `request_bytes`, first). An attempt that fails and is sent again calls
        `_attempt_failed` before its next `_acquire`."""
        self.attempts += 1
        trace = self.trace
        if trace is not None:
            # The attempt's own trace context goes into the head it sends.
            # (ubuf[0] is the head as this attempt sends it: a retry's carries
            # x-tether-attempt.)
            ubuf = self.conn.ubuf
            ubuf[0] = trace.attempt_start(self, ubuf[0])
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
        if (
            spec is not None
            and (status >= 500 or spec.any_status)
            and self._retry_response(spec, rhead)
        ):
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
        self.bytes_out += len(data)
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
        if self.state == SENDING:
            if self._resend_stale(up, reason):
                return
            failed = outcomes.local(outcomes.Reset, reason, 502)
            if self.res is not None and self._retry(retries.F_RESET, failed, message):
                return
        self._reply(outcomes.Reset, reason, message)

    def _attempt_failed(self, reason: str) -> None:
        """The attempt in flight failed and the request is sent again (its span ends)."""
        trace = self.trace
        if trace is not None:
            trace.attempt_end(self, reason)

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
        close: bool = False, headers: tuple[tuple[bytes, bytes], ...] = (),
    ) -> None:  # fmt: skip
        """Answer the request ourselves (or cut the response short if it started)."""
        self._reply(
            outcomes.LocalReply, reason, message, status=status, close=close, headers=headers
        )

    def _reply(
        self, kind: type[Outcome], reason: str, message: str | None, *,
        status: int | None = None, close: bool = False,
        headers: tuple[tuple[bytes, bytes], ...] = (),
    ) -> None:  # fmt: skip
        if self.state >= RESPONDING:
            # Part of the response went out: the client must see it cut short.
            cut = outcomes.Reset if kind is outcomes.LocalReply else kind
            self.end(outcomes.local(cut, reason, 0), ABORT)
            return
        code = status if status is not None else local_reply.REPLIES.get(reason, (500, ""))[0]
        self._render(reason, message, code, close, headers)
        after = KEEP if self.keep_alive and self.req_done else CLOSE
        self.end(outcomes.local(kind, reason, code), after)

    def _render(
        self, reason: str, message: str | None, code: int, close: bool,
        headers: tuple[tuple[bytes, bytes], ...] = (),
    ) -> None:  # fmt: skip
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
                headers=headers,
            )
        )

    # -- the end --------------------------------------------------------------------------

    def end(self, outcome: Outcome, after: int = CLOSE, now: float = 0.0) -> None:
        """Where every request ends, once: the outcome goes to the balancer's tracker
        (`on_end`, owed since the pick's `on_start`), the destination's stats and the
        local-reply counters, the trace (its spans close) and the access log (it keeps
        the request's values); then the connection does `after` (KEEP, CLOSE, ABORT,
        TUNNEL, GONE). Later features read the outcome here too: outlier detection,
        retry budgets."""
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
            rflags = self.rflags
            if rflags:
                if rflags == _ATTEMPT and self.timer_handle is None:
                    self._attempt_end(outcome, now)  # the tracker's on_end, owed
                    self.rflags = 0
                else:
                    self._release(outcome, now)
            ds = route.dstats
            if ds is not None:
                ds.record(outcome.status, now - self.start)
        if outcome.reason:
            self.server.stats.local_reply(outcome.reason, ds)
        trace = self.trace
        if trace is not None:
            trace.end(self, now)
        log = self.server.access_log
        if log is not None:
            log.record(self, now)
        self.conn.exchange_done(self, now)

    def __repr__(self) -> str:
        head = self.head
        up = f" upstream={self.upstream!r}" if self.upstream is not None else ""
        out = f" {self.outcome!r}" if self.state == ENDED else ""
        return (
            f"<Exchange {head.method.decode()} {head.target[:40]!r}"
            f" {STATE_NAMES[self.state]}{up}{out}>"
        )
