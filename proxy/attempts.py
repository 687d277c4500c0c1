"""The attempts of one exchange: retries, per-try timeouts, breakers, outlier detection.

A request has one attempt, or more when its route's retry policy (proxy/retry.py) sends
it again. `Attempts` is the exchange's base class (proxy/exchange.py) holding this
mechanism apart from the state machine it drives: an attempt starts at `_attempt_start`
(the pick's tracker hears of it) and ends at `_attempt_end` with its own typed outcome
(the tracker and the outlier detector read it; spans per attempt hang here too). A failed
attempt (connect failure, reset, per-try timeout, or a response head the policy
retries) reaches `_retry`, which asks the pure decisions (retryOn, attempts left, the
method, the replay buffer, the budget, the breakers' retry slots) and either sends the
request again after a full-jitter backoff, to an endpoint the router picks among those
not tried yet (`retry_route`), or lets the failure stand. Nothing of a failed attempt
reaches the client: the response head is relayed only once the exchange decided not to
retry it.

Whatever the policy, a request without a body and with an idempotent method is sent
once more on a fresh connection when a reused keep-alive connection was closed under it
(`_resend_stale`, RFC 9110 9.2.2).

Requests without a resilience policy (`RouteResult.resilience` None) pay one attribute
test at the route and one at the end.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

from proxy import local_reply
from proxy import outcome as outcomes
from proxy import retry as retries
from proxy.balance.outlier import classify
from proxy.exchange_states import (
    CLOSE,
    CONNECTING,
    ENDED,
    KEEP,
    PAUSE_CONNECTING,
    RESPONDING,
    SENDING,
)
from proxy.heads import chunk_prefix
from proxy.hedging import HEDGE_LOST, Hedge
from proxy.outcome import Outcome

if TYPE_CHECKING:
    from proxy.balance import Endpoint
    from proxy.exchange_states import Downstream, Server, TimerHandle
    from proxy.heads import RequestHead, ResponseHead
    from proxy.pool import Pool
    from proxy.resilience import Resilience
    from proxy.route_result import RouteResult
    from proxy.upstream import UpstreamConnection

# `rflags`: an attempt is open (the tracker owes it an on_end); the request holds a
# slot of its breakers; its retry holds a retry slot. (Final: the compiled build reads
# them as constants, not from the module's dict.)
_ATTEMPT: Final = 1
_ADMITTED: Final = 2
_RETRY_SLOT: Final = 4
# A hedge (proxy/hedging.py) is armed or in flight: the end goes through `_release`.
_HEDGE: Final = 8
# The exchange's `flags` bit for a request sent again on a fresh connection after a
# reused one was closed under it (`_resend_stale`).
_RETRIED: Final = 2
# The replay buffer of a request without a body (`replay` is not None: it may be sent
# again), shared: nothing is ever added to it (`_keep_for_replay` swaps it for a list).
_NO_BODY: Final[list[bytes]] = []


class Attempts:
    """The exchange's attempts (a base class: the slots are the exchange's)."""

    # The attempts' own state, and the exchange's state, route and upstream
    # connection, which they change (the exchange's other slots are its own).
    __slots__ = (
        "abandoned",
        "attempt",
        "attempt_start",
        "flags",
        "hedge",
        "replay",
        "replay_size",
        "res",
        "rflags",
        "route",
        "rspec",
        "state",
        "status",
        "timer_handle",
        "tried",
        "upstream",
    )

    # What this part reads and writes of the exchange (its slots).
    state: int
    conn: Downstream
    server: Server
    head: RequestHead
    route: RouteResult | None
    upstream: UpstreamConnection | None
    flags: int
    req_done: bool
    keep_alive: bool
    status: int
    request_bytes: bytes
    start: float
    attempt: int
    attempt_start: float
    rflags: int
    res: Resilience | None
    rspec: retries.RetrySpec | None
    replay: list[bytes] | None
    replay_size: int
    tried: list[Endpoint] | None
    abandoned: UpstreamConnection | None
    timer_handle: TimerHandle | None
    hedge: Hedge | None

    # The state machine's own actions (proxy/exchange.py).
    def end(self, outcome: Outcome, after: int = CLOSE, now: float = 0.0) -> None:
        raise NotImplementedError

    def local_reply(
        self, reason: str, message: str | None = None, *, status: int | None = None,
        close: bool = False,
    ) -> None:  # fmt: skip
        raise NotImplementedError

    def _reply(
        self, kind: type[Outcome], reason: str, message: str | None, *,
        status: int | None = None, close: bool = False,
    ) -> None:  # fmt: skip
        raise NotImplementedError

    def _render(self, reason: str, message: str | None, code: int, close: bool) -> None:
        raise NotImplementedError

    def _acquire(self, pool: Pool) -> None:
        raise NotImplementedError

    def _drop_upstream(self) -> None:
        raise NotImplementedError

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

    def _attempt_failed(self, reason: str) -> None:
        """An attempt failed and the request is sent again: the exchange ends the
        attempt's span here (proxy/exchange.py)."""

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
            detector = res.outlier
            if detector is not None and ep is not None:
                cluster = res.cluster
                if cluster is not None:
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
            if self.rflags & _RETRY_SLOT:
                res.retry_done()  # ended while a retry waited out its backoff
            if self.rflags & _ADMITTED:
                res.release()
            hedge = self.hedge if self.rflags & _HEDGE else None
            if hedge is not None:
                self.hedge = None
                hedge.cancel()  # the other attempt of a race (or its timer)
        self.rflags = 0

    @property
    def retried(self) -> bool:
        """Whether the request was sent again once, after a reused connection's reset."""
        return bool(self.flags & _RETRIED)

    def _resend_stale(self, up: UpstreamConnection, reason: str) -> bool:
        """A reused keep-alive connection the server closed as we sent (its idle timeout
        raced our request): the request goes again once on another connection, for
        idempotent methods without a body only (RFC 9110 9.2.2); True when it did. The
        balancer hears of the failed attempt; the request stays with its endpoint (the
        same pool). Any retry policy or none."""
        head = self.head
        route = self.route
        if (
            reason != local_reply.UPSTREAM_RESET
            or up.requests <= 1
            or self.flags & _RETRIED
            or head.has_body
            or head.method not in retries.IDEMPOTENT_METHODS
            or route is None
            or route.pool is None
        ):
            return False
        ep, tracker = route.endpoint, route.tracker
        if ep is not None and tracker is not None:
            now = self.server.clock()
            tracker.on_end(ep, now, now - self.start, False)
            tracker.on_start(ep, now)
        self.flags |= _RETRIED
        self._attempt_failed(reason)
        ubuf = self.conn.ubuf
        ubuf.clear()
        ubuf.append(self.request_bytes)
        self._acquire(route.pool)
        return True

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
        answered 503 overflow), count the request in the retry budget, keep its body.

        Per request, whatever the policy, and nothing failing: the default policy (no
        breaker, no hedging) costs the tests below, the budget's count and, for a
        request with a body, its replay buffer; nothing is allocated for a request
        without one (`_NO_BODY`)."""
        self.res = res
        self.tried = None
        self.abandoned = None
        self.hedge = None
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
                spec = retries.overridden(spec, self.head.headers)
            self.rspec = spec
            res.budget.request(self.start)
            self.replay_size = 0
            if not self.head.has_body:
                self.replay = _NO_BODY
            else:
                # Body bytes that came before the route (the head goes first, apart).
                ubuf = self.conn.ubuf
                if ubuf:
                    self.replay = pieces = list(ubuf)
                    for piece in pieces:
                        self._keep_for_replay([], piece)
                else:
                    self.replay = []
        hedging = res.hedging
        if hedging is not None and hedging.spec.applies(self.head.method):
            self.hedge = Hedge(self, res, hedging)
            self.rflags |= _HEDGE
        return False

    def _keep_for_replay(self, replay: list[bytes], data: bytes) -> None:
        size = self.replay_size + len(data)
        spec = self.rspec
        if spec is None or size > spec.buffer_limit:
            self.replay = None  # too long to send again: never retried
            return
        self.replay_size = size
        if replay is self.replay:
            if replay is _NO_BODY:
                replay = self.replay = []  # (a body after all: never shared)
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
        if status < 200:
            return False  # a 101: switching, not an answer to retry
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
        if self.rflags & _HEDGE and self._yield_to_hedge(failed):
            return True
        spec, res = self.rspec, self.res
        if spec is None or res is None or res.budget is None:
            return False
        if failure != retries.F_STATUS and not spec.retriable(failure):
            return False
        now = self.server.clock()
        refused = failure == retries.F_CONNECT or failure == retries.F_REFUSED
        route = self.route
        assert route is not None
        why = res.retry_refusal(
            spec, self.attempt, self.head.method, self.replay is not None, now, refused,
            failed.reason, route, self.tried or (),
        )  # fmt: skip
        ds = route.dstats
        if why:
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
        self._attempt_failed(failed.reason or f"status {failed.status}")
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

    # -- hedging (proxy/hedging.py) ---------------------------------------------------------

    def _yield_to_hedge(self, failed: Outcome) -> bool:
        """This attempt failed while a hedge is in flight: wait for the hedge (True)."""
        hedge = self.hedge
        if hedge is None or not hedge.in_flight:
            return False
        self._abandon()
        self._attempt_end(failed, self.server.clock())
        self._attempt_failed(failed.reason or f"status {failed.status}")
        route = self.route
        if route is not None and route.endpoint is not None:
            tried = self.tried
            if tried is None:
                tried = self.tried = []
            tried.append(route.endpoint)  # it failed: a later retry goes elsewhere
        self.state = CONNECTING
        self.status = 0
        self.conn.ubuf.clear()
        hedge.sole = True
        return True

    def _hedge_failed_alone(
        self, route: RouteResult, start: float, failed: Outcome, message: str
    ) -> None:
        """The hedge failed after this exchange's own attempt had: its attempt becomes
        the exchange's, whose failure is retried as any (or answers the request)."""
        self.route = route
        self.attempt_start = start
        self.rflags |= _ATTEMPT | _RETRY_SLOT  # the hedge's end and retry slot, owed
        kind = failed.kind
        failure = (
            retries.F_CONNECT
            if kind == "ConnectFailure"
            else retries.F_RESET
            if kind == "Reset"
            else 0
        )
        if failure and self._retry(failure, failed, message):
            return
        self.conn.clear_pause(PAUSE_CONNECTING)
        self._reply(type(failed), failed.reason, message, status=failed.status or 502)

    def _hedge_won(
        self, route: RouteResult, up: UpstreamConnection, start: float, now: float
    ) -> None:
        """The hedge's response head came first: give up this attempt (its connection
        aborted, its end told with an outcome the outlier detector ignores) and take over
        the hedge's connection, route and attempt."""
        if self.upstream is not None or self.state == CONNECTING:
            self._drop_upstream()
        elif self.timer_handle is not None:
            self._cancel_timer()
        if self.rflags & _ATTEMPT:
            self._attempt_end(outcomes.local(outcomes.LocalReply, HEDGE_LOST, 0), now)
            self._attempt_failed(HEDGE_LOST)
        # The first attempt's endpoint is not counted as tried: it was only slow, and a
        # retry of the hedge's answer may need it.
        self.hedge = None
        self.rflags = (self.rflags & ~_HEDGE) | _ATTEMPT | _RETRY_SLOT
        self.route = route
        self.attempt_start = start
        self.conn.ubuf.clear()
        self.state = SENDING
        self.upstream = up
        up.bind(self, self.head.method == b"HEAD")  # type: ignore[arg-type]
        self.conn.clear_pause(PAUSE_CONNECTING)

    def _hedge_done(self, hedge: Hedge) -> None:
        """The hedge failed: this exchange goes on alone."""
        if self.rflags & _HEDGE and self.hedge is hedge:
            self.hedge = None
            self.rflags &= ~_HEDGE

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
