"""The HTTP/2 exchange: one stream's request and response, routed per stream, with one end.

An `H2Exchange` is what proxy/exchange.py's `Exchange` is for an HTTP/1 request, for
one stream of an HTTP/2 connection (proxy/h2_downstream.py): made by the request's
HEADERS (read by proxy/h2_heads.py), it asks the router for a `RouteResult` (so every
stream is balanced on its own), takes a stream on a pooled HTTP/2 upstream connection
(proxy/h2_pool.py), relays both directions with their trailers, and ends exactly once
in `end(outcome)`, which feeds the balancer's tracker, the destination's stats, the
local-reply counters, the trace and the access log, like the HTTP/1 exchange's. A gRPC
caller's outcome carries the `grpc-status` it received. What the sidecar answers itself,
and what a passed deadline does, are proxy/h2_replies.py's.

Tracing is HTTP/1's (proxy/trace_context.py, proxy/tracing.py): decided when the HEADERS
arrive (`ListenerTracing.decide`); each attempt starts a client span whose context goes
upstream in that attempt's `traceparent` (`tfields`); `end` ends the spans.

States: ROUTING → CONNECTING → SENDING → RESPONDING → ENDED.

| event | valid in | does |
|---|---|---|
| request data/end/trailers | before ENDED | buffered until a stream is open, then relayed |
| routed | ROUTING | local reply (end), or take a stream from the HTTP/2 pool |
| h2_ready | CONNECTING | open the upstream stream, send what is buffered (SENDING) |
| h2_failed | CONNECTING | end: connect failure (502, gRPC 14) |
| response headers | SENDING | relay (RESPONDING); with END_STREAM: end, completed |
| response data | RESPONDING | relay |
| response trailers / end | RESPONDING | relay; end: completed (with grpc-status) |
| upstream reset | SENDING, RESPONDING | no response yet: local reply (502, gRPC 14); else reset |
| client reset, deadline | any but ENDED | reset the upstream stream; end |
| retried failure | CONNECTING, SENDING | new attempt after a backoff (proxy/h2_retry.py) |

A route with a resilience policy gives the stream an `H2Retry` (proxy/h2_retry.py):
connect failures, resets and refusals, per-try timeouts and response heads (or a gRPC
status) its policy retries start a new attempt instead of ending the stream, as long
as nothing of the response was relayed; a gRPC response head may be held (`held`)
until its first message or its status for that.

Back-pressure is the windows': bytes received on one side open the other side's
stream window only once they were framed out (`on_sent`), so each direction of each
stream holds at most one stream window (proxy/h2_link.py's STREAM_WINDOW) in the
sidecar. While no upstream stream is open, the request's bytes wait here, bounded by
the same window, which the client cannot exceed.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any, Final, Protocol

from h2.errors import ErrorCodes

from proxy import grpc, h2_replies, local_reply
from proxy import outcome as outcomes
from proxy import retry as retries
from proxy.h2_heads import request_head, upstream_fields
from proxy.h2_link import Fields, flush_touched
from proxy.h2_pool import H2PoolOverflowError
from proxy.h2_retry import H2Retry
from proxy.outcome import Outcome

if TYPE_CHECKING:
    from proxy.downstream import ProxyServer
    from proxy.h2_downstream import H2DownstreamConnection
    from proxy.route_result import RouteResult
    from proxy.trace_context import Propagation
    from proxy.tracing import SampledTrace


class StreamUpstream(Protocol):
    """Where a stream's request goes: a stream of a pooled HTTP/2 connection
    (proxy/h2_upstream.py), or an HTTP/1 connection bridged (proxy/h2_bridge.py)."""

    def open_stream(self, sink: Any, headers: Fields, end: bool) -> int: ...
    def send_data(self, stream_id: int, data: bytes, end: bool = False) -> None: ...
    def send_trailers(self, stream_id: int, headers: Fields) -> None: ...
    def open_window(self, stream_id: int, size: int) -> None: ...
    def reset(self, stream_id: int, code: int = ...) -> None: ...
    def touch(self) -> None: ...
    def flush(self) -> None: ...
    def finished_receiving(self, stream_id: int) -> None: ...


class StreamPool(Protocol):
    """What gives a stream its upstream (proxy/h2_pool.py, or the bridge)."""

    closed: bool

    def acquire(self, waiter: H2Exchange) -> StreamUpstream | None: ...
    def cancel(self, waiter: H2Exchange) -> None: ...


ROUTING: Final = 0
CONNECTING: Final = 1
SENDING: Final = 3
RESPONDING: Final = 4
ENDED: Final = 6
STATE_NAMES: Final = {0: "routing", 1: "connecting", 3: "sending", 4: "responding", 6: "ended"}

T_IDLE: Final = 0
T_REQUEST: Final = 1
T_CALL: Final = 2  # grpc-timeout: the whole call

_TASKS: set[asyncio.Task[None]] = set()


class _UpstreamSide:
    """The exchange as the sink of its upstream stream."""

    __slots__ = ("ex",)

    def __init__(self, ex: H2Exchange) -> None:
        self.ex = ex

    def on_headers(self, headers: Fields, end: bool) -> None:
        self.ex.on_response_head(headers, end)

    def on_data(self, data: bytes, end: bool) -> None:
        self.ex.on_response_data(data, end)

    def on_trailers(self, headers: Fields) -> None:
        self.ex.on_response_trailers(headers)

    def on_end(self) -> None:
        pass

    def on_reset(self, code: int, message: str) -> None:
        self.ex.on_upstream_reset(code, message)

    def on_sent(self, size: int) -> None:
        # Request bytes went upstream: the client may send as much again (unless its
        # request is complete: no window is owed on a stream that sends no more). A
        # retry's replayed bytes were credited on their first attempt.
        ex = self.ex
        rt = ex.rt
        if rt is not None:
            size = rt.on_sent(size)
        if not ex.req_done and size:
            ex.conn.open_window(ex.sid, size)
            ex.conn.touch()


class H2Exchange:
    """One stream (see the module's docstring)."""

    __slots__ = (
        "attempts",
        "body",
        "bytes_in",
        "bytes_out",
        "call_deadline",
        "conn",
        "deadline",
        "grpc",
        "head",
        "held",
        "mirror",
        "outcome",
        "pool",
        "progress",
        "req_done",
        "req_trailers",
        "retried",
        "route",
        "rt",
        "seen_progress",
        "server",
        "sid",
        "start",
        "state",
        "status",
        "tfields",
        "timer",
        "trace",
        "up_side",
        "upstream",
        "usid",
    )

    outcome: Outcome

    def __init__(self, conn: H2DownstreamConnection, sid: int, headers: Fields, end: bool) -> None:
        self.conn = conn
        self.sid = sid
        self.state = ROUTING
        self.route: RouteResult | None = None
        self.pool: StreamPool | None = None
        self.upstream: StreamUpstream | None = None
        self.usid = 0
        self.up_side = _UpstreamSide(self)
        self.body: list[bytes] = []
        self.req_trailers: Fields | None = None
        self.req_done = end
        self.retried = False
        self.status = 0
        # The route's resilience (proxy/h2_retry.py), when it has a policy.
        self.rt: H2Retry | None = None
        # A gRPC response head held until its first message or its status (retries).
        self.held: Fields | None = None
        self.mirror: Any = None  # the request's copy for a shadow (proxy/mirror.py)
        front = conn.front
        self.start = now = front.clock()
        self.timer = T_IDLE
        self.deadline = now + front.timeouts.idle
        self.call_deadline = 0.0
        self.progress = 0
        self.seen_progress = 0
        request = request_head(headers)
        self.head = request.head
        self.grpc = request.grpc
        if request.timeout is not None:
            self.call_deadline = now + request.timeout
        if self.req_done:
            self._arm_request_timeout()
        # Attempts sent upstream; body bytes received from the client and sent to it.
        self.attempts = self.bytes_in = self.bytes_out = 0
        self.server: ProxyServer = front.server
        # Its trace, and the trace fields of the attempt in flight (its client span's).
        tracer = front.server.tracer
        self.trace: SampledTrace | Propagation | None = (
            tracer.decide(self.head, self) if tracer is not None else None
        )
        self.tfields: Fields = []

    # -- routing --------------------------------------------------------------------------

    def begin(self) -> None:
        head = self.head
        if head.method == b"CONNECT":
            self.local_reply(local_reply.NOT_IMPLEMENTED, "CONNECT over HTTP/2 is not supported")
            return
        if head.host is None:
            self.local_reply(local_reply.BAD_REQUEST, "the request has no :authority")
            return
        result = self.conn.front.router.route(head, self.conn.peer)
        if result.pending is not None:
            task = asyncio.get_running_loop().create_task(self._routed(result.pending))
            _TASKS.add(task)
            task.add_done_callback(_TASKS.discard)
            return
        self.on_routed(result)

    async def _routed(self, pending: Any) -> None:
        result = await pending
        if self.state == ROUTING:
            self.on_routed(result)
            self.conn.flush()
            flush_touched()

    def on_routed(self, result: RouteResult) -> None:
        self.route = result
        reply = result.reply
        if reply is not None:
            self.local_reply(reply.reason, reply.message, status=reply.status, extra=reply.headers)
            return
        pool = result.pool
        if pool is None:
            self.local_reply(local_reply.NOT_IMPLEMENTED, "no HTTP/2 destination")
            return
        if result.tunnel is not None:
            self.local_reply(local_reply.NOT_IMPLEMENTED, "tunnels over HTTP/2")
            return
        res = result.resilience
        rt = None
        if res is not None:
            rt = H2Retry(self, res)
            if not rt.admit():
                return  # a breaker refused it: answered overflow
            self.rt = rt
        if self.timer == T_REQUEST and result.request_timeout:
            self.deadline = self.start + result.request_timeout
        tap = result.mirror
        if tap is not None:
            from proxy.h2_mirror import h2_copy

            self.mirror = h2_copy(self, tap)
        if rt is not None:
            rt.attempt_started(result, self.start)
        else:
            ep, tracker = result.endpoint, result.tracker
            if ep is not None and tracker is not None:
                tracker.on_start(ep, self.start)
            ds = result.dstats
            if ds is not None:
                ds.attempts += 1  # one attempt (a route without a retry policy)
        self._connect(result)
        if rt is not None and self.state in (CONNECTING, SENDING):
            rt.arm_try()

    def _connect(self, result: RouteResult) -> None:
        """One attempt: a stream from the HTTP/2 pool of the route's endpoint."""
        pool = result.pool
        assert pool is not None
        h2pool: StreamPool | None = self.conn.front.pool_for(pool)
        if h2pool is None:
            # That upstream speaks HTTP/1.1 (an app whose protocol is http): the stream
            # goes as one HTTP/1.1 request on the ordinary pool.
            from proxy.h2_bridge import H1Bridge

            h2pool = H1Bridge(self, pool)
        self.pool = h2pool
        self.state = CONNECTING
        self.attempts += 1
        trace = self.trace
        if trace is not None:  # the attempt's client span starts
            self.tfields = trace.attempt_fields(self)
        try:
            up = h2pool.acquire(self)
        except H2PoolOverflowError as e:
            reason = local_reply.DRAINING if h2pool.closed else local_reply.OVERFLOW
            self.local_reply(reason, str(e))
            return
        if up is not None:
            self.on_h2_ready(up)

    # -- retries (proxy/h2_retry.py drives them) ----------------------------------------

    def waiting_for_head(self) -> bool:
        """An attempt is out and no response head came yet (the per-try timeout runs)."""
        return self.state in (CONNECTING, SENDING) and self.held is None and self.pool is not None

    def waiting_for_retry(self) -> bool:
        return self.state == CONNECTING and self.pool is None

    def abandon(self) -> None:
        """Give up the attempt's upstream stream (its response is not relayed)."""
        self.held = None
        up = self.upstream
        if up is None:
            return
        self.upstream = None
        usid = self.usid
        up.finished_receiving(usid)  # when the upstream ended its side already
        up.reset(usid, ErrorCodes.CANCEL)
        up.touch()

    def await_retry(self) -> None:
        """The failed attempt is over; the next goes after the backoff (`start_attempt`)."""
        self.state = CONNECTING
        self.status = 0
        self.pool = None
        self.body = []  # what arrives meanwhile is kept in the replay

    def start_attempt(self, route: RouteResult, now: float) -> None:
        rt = self.rt
        assert rt is not None
        if rt.replay is None:
            # The body outgrew the buffer while the retry waited: it cannot be sent again.
            message = "the request body is too large to send again"
            h2_replies.reply(self, outcomes.Reset, local_reply.UPSTREAM_RESET, message)
            return
        self.route = route
        self.body = list(rt.replay)
        rt.attempt_started(route, now)
        self._connect(route)
        if self.state in (CONNECTING, SENDING):
            rt.arm_try()

    def flush_all(self) -> None:
        self.conn.flush()
        flush_touched()

    # -- the pool's answers ---------------------------------------------------------------

    def on_h2_ready(self, up: StreamUpstream) -> None:
        if self.state != CONNECTING:
            return  # ended meanwhile: the stream was never opened
        self.state = SENDING
        self.upstream = up
        body = self.body
        end_now = self.req_done and not body and self.req_trailers is None
        rt = self.rt
        if rt is None:
            headers = upstream_fields(self.head, self.route, self.conn)
        else:
            rt.sent = 0
            first = rt.headers
            if first is None:
                first = rt.headers = upstream_fields(self.head, self.route, self.conn)
            headers = first
            if rt.attempt > 1:
                headers = [*headers, (b"x-tether-attempt", b"%d" % rt.attempt)]
        if self.tfields:
            headers = [*headers, *self.tfields]
        self.usid = usid = up.open_stream(self.up_side, headers, end_now)
        if body:
            self.body = []
            for i, chunk in enumerate(body):
                last = i == len(body) - 1
                up.send_data(usid, chunk, last and self.req_done and self.req_trailers is None)
        if self.req_trailers is not None:
            up.send_trailers(usid, self.req_trailers)
        up.flush()

    def on_h2_failed(self, reason: str, message: str) -> None:
        if self.state != CONNECTING:
            return
        rt = self.rt
        if rt is not None:
            code = local_reply.REPLIES.get(reason, (502, ""))[0]
            failed = outcomes.local(outcomes.ConnectFailure, reason, code)
            if rt.retry(retries.F_CONNECT, failed, message):
                self.conn.touch()
                return
        h2_replies.reply(self, outcomes.ConnectFailure, reason, message)
        self.conn.touch()

    # -- request events (the downstream stream's sink) ----------------------------------

    def on_headers(self, headers: Fields, end: bool) -> None:
        # h2 reports a second HEADERS block as trailers; anything else is its error.
        self.on_trailers(headers)

    def on_data(self, data: bytes, end: bool) -> None:
        self.progress += 1
        self.bytes_in += len(data)
        if self.state == ENDED:
            # Answered already: the rest is dropped, and keeps flowing until it ends.
            if end:
                self.conn.finished_receiving(self.sid)
            else:
                self.conn.open_window(self.sid, len(data))
            return
        if end:
            self.req_done = True
            self._arm_request_timeout()
        rt = self.rt
        if rt is not None:
            rt.keep(data)
        mirror = self.mirror
        if mirror is not None:
            self.mirror = mirror.feed(data) if data else mirror
            if end and self.mirror is not None:
                self.mirror.send()
                self.mirror = None
        up = self.upstream
        if up is None:
            if data:
                self.body.append(data)
            return
        up.send_data(self.usid, data, end)
        up.touch()

    def on_trailers(self, headers: Fields) -> None:
        if self.state == ENDED:
            self.conn.finished_receiving(self.sid)
            return
        self.req_done = True
        self._arm_request_timeout()
        mirror = self.mirror
        if mirror is not None:
            self.mirror = None
            mirror.send()
        up = self.upstream
        if up is None or self.rt is not None:
            self.req_trailers = headers  # kept for a retry, too
        if up is None:
            return
        up.send_trailers(self.usid, headers)
        up.touch()

    def on_end(self) -> None:
        pass

    def on_reset(self, code: int, message: str) -> None:
        """The client reset its stream, or its connection is gone."""
        if self.state == ENDED:
            return
        self._drop_upstream()
        self.end(outcomes.CLIENT_GONE)

    def on_sent(self, size: int) -> None:
        # Response bytes reached the client's connection: the upstream may send more.
        up = self.upstream
        if up is not None:
            up.open_window(self.usid, size)
            up.touch()

    def _arm_request_timeout(self) -> None:
        if self.state < RESPONDING and self.timer == T_IDLE:
            self.timer = T_REQUEST
            route = self.route
            timeout = route.request_timeout if route is not None else 0.0
            self.deadline = self.conn.front.clock() + (timeout or self.conn.front.timeouts.request)

    # -- response events (the upstream stream's sink) -----------------------------------

    def on_response_head(self, headers: Fields, end: bool) -> None:
        if self.state != SENDING:
            return
        status = 0
        for name, value in headers:
            if name == b":status":
                status = int(value)
                break
        if status < 200:
            return  # 1xx: h2 reports them apart; nothing to relay
        rt = self.rt
        if rt is not None:
            rt.cancel_timer()
            failure = rt.response_failure(headers, status, end)
            if failure:
                failed: Outcome = outcomes.completed(status)
                if self.grpc:
                    failed = outcomes.with_grpc(failed, grpc.status_of(headers))
                if rt.retry(failure, failed, f"the upstream answered {status}"):
                    return
            elif self.grpc and not end and rt.spec is not None and rt.spec.reads_grpc:
                # Held until the first message or the status: a status that comes
                # before any message may still be retried.
                self.held = headers
                self.status = status
                self.timer = T_IDLE
                self.deadline = self.conn.front.clock() + self.conn.front.timeouts.idle
                return
        self._relay_head(headers, status, end)

    def _relay_head(self, headers: Fields, status: int, end: bool) -> None:
        self.held = None
        self.status = status
        self.state = RESPONDING
        self.timer = T_IDLE
        self.deadline = self.conn.front.clock() + self.conn.front.timeouts.idle
        route = self.route
        edit = route.response_edit if route is not None else None
        if edit is not None:
            pseudo = [(n, v) for n, v in headers if n[:1] == b":"]
            fields = [(n, v) for n, v in headers if n[:1] != b":"]
            edit(fields)
            headers = pseudo + [(n.lower(), v) for n, v in fields]  # policy may say X-Y
        conn = self.conn
        conn.send_headers(self.sid, headers, end)
        conn.touch()
        if end:
            self._completed(headers)

    def on_response_data(self, data: bytes, end: bool) -> None:
        if self.state != RESPONDING:
            held = self.held
            if held is None or self.state != SENDING:
                return
            self._relay_head(held, self.status, False)  # a message: the call is committed
        self.progress += 1
        self.bytes_out += len(data)
        conn = self.conn
        if end:
            # No window is owed to an upstream that sends no more (`on_sent`).
            self.upstream, up = None, self.upstream
            conn.send_data(self.sid, data, end)
            self.upstream = up
            conn.touch()
            self._completed(None)
            return
        conn.send_data(self.sid, data, end)
        conn.touch()

    def on_response_trailers(self, headers: Fields) -> None:
        if self.state != RESPONDING:
            held = self.held
            if held is None or self.state != SENDING:
                return
            code = grpc.status_of(headers)
            rt = self.rt
            if rt is not None and rt.spec is not None and code > 0 and rt.spec.retriable_grpc(code):
                failed = outcomes.with_grpc(outcomes.completed(self.status), code)
                # The stream ended upstream: abandon() closes it on our side.
                if rt.retry(retries.F_GRPC, failed, f"the upstream's grpc-status was {code}"):
                    return
            self._relay_head(held, self.status, False)
        self.conn.send_trailers(self.sid, headers)
        self.conn.touch()
        self._completed(headers)

    def _completed(self, fields: Fields | None) -> None:
        up = self.upstream
        self.upstream = None
        if up is not None:
            up.finished_receiving(self.usid)
            if not self.req_done:
                up.reset(self.usid, ErrorCodes.NO_ERROR)
                up.touch()
        out: Outcome = outcomes.completed(self.status)
        if self.grpc:
            code = -1
            for name, value in fields or ():
                if name == b"grpc-status":
                    code = int(value) if value.isdigit() and len(value) < 4 else grpc.UNKNOWN
            out = outcomes.with_grpc(out, code)
        self.end(out)

    def on_upstream_reset(self, code: int, message: str) -> None:
        if self.state == ENDED:
            return
        self.upstream = None
        if self.state < RESPONDING:
            self.held = None
            rt = self.rt
            if rt is not None and self.state == SENDING:
                refused = code == ErrorCodes.REFUSED_STREAM
                failure = retries.F_REFUSED if refused else retries.F_RESET
                failed = outcomes.local(outcomes.Reset, local_reply.UPSTREAM_RESET, 502)
                if rt.retry(failure, failed, message):
                    self.conn.touch()
                    return
            if code == ErrorCodes.REFUSED_STREAM and self.state == SENDING and self._may_retry():
                return
            h2_replies.reply(self, outcomes.Reset, local_reply.UPSTREAM_RESET, message)
        else:
            self.conn.reset(self.sid, ErrorCodes.INTERNAL_ERROR if code < 0 else code)
            self.end(outcomes.local(outcomes.Reset, local_reply.UPSTREAM_RESET, 0))
        self.conn.touch()

    def _may_retry(self) -> bool:
        """REFUSED_STREAM (or a GOAWAY that left the stream unprocessed): the upstream did
        nothing with it (RFC 9113 8.7), so it goes once more on a fresh stream if its
        request had no body (nothing of which is kept)."""
        pool = self.pool
        if pool is None or self.retried or not self.req_done or self.progress:
            return False  # once, and only for a request whose body was not streamed
        self.state = CONNECTING
        self.retried = True
        try:
            up = pool.acquire(self)
        except H2PoolOverflowError:
            self.state = SENDING
            return False
        if up is not None:
            self.on_h2_ready(up)
        return True

    # -- the connection's events ----------------------------------------------------------

    def on_deadline(self, now: float) -> None:
        if self.state != ENDED:
            h2_replies.deadline_passed(self, now)

    def _drop_upstream(self) -> None:
        up = self.upstream
        if up is not None:
            self.upstream = None
            up.reset(self.usid, ErrorCodes.CANCEL)
            up.touch()
        elif self.state == CONNECTING and self.pool is not None:
            self.pool.cancel(self)

    # -- answering ------------------------------------------------------------------------

    def local_reply(
        self,
        reason: str,
        message: str | None = None,
        *,
        status: int | None = None,
        extra: tuple[tuple[bytes, bytes], ...] = (),
    ) -> None:
        h2_replies.reply(self, outcomes.LocalReply, reason, message, status=status, extra=extra)

    # -- the end --------------------------------------------------------------------------

    def end(self, outcome: Outcome) -> None:
        """Where every stream ends, once (as proxy/exchange.py's `Exchange.end`)."""
        if self.state == ENDED:
            raise RuntimeError(f"ended twice: {self.outcome!r}, then {outcome!r}")
        self.state = ENDED
        self.outcome = outcome
        front = self.conn.front
        now = front.clock()
        route = self.route
        ds = None
        self.mirror = None  # a request not received whole is not mirrored
        if route is not None:
            latency = now - self.start
            rt = self.rt
            if rt is not None:
                rt.release(outcome, now, self.pool is not None)
            else:
                ep, tracker = route.endpoint, route.tracker
                if ep is not None and tracker is not None and self.pool is not None:
                    tracker.on_end(ep, now, latency, outcome.ok)
            ds = route.dstats
            if ds is not None:
                ds.record(outcome.status, latency)
        if outcome.reason:
            front.stats.local_reply(outcome.reason, ds)
        trace = self.trace
        if trace is not None:
            trace.end(self, now)
        log = front.server.access_log
        if log is not None:
            log.record(self, now)
        self.conn.exchange_done(self)

    def __repr__(self) -> str:
        out = f" {self.outcome!r}" if self.state == ENDED else ""
        return (
            f"<H2Exchange stream={self.sid} {self.head.method.decode()}"
            f" {self.head.target[:40]!r} {STATE_NAMES[self.state]}{out}>"
        )
