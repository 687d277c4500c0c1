"""The attempts of one HTTP/2 stream: retries, per-try timeouts, breakers, outlier outcomes.

An `H2Exchange` (proxy/h2_exchange.py) whose route has a resilience policy
(`RouteResult.resilience`: proxy/resilience.py) gets an `H2Retry`, which does for the
stream what proxy/attempts.py does for an HTTP/1 request, with the same pure decisions
(proxy/retry.py's `RetrySpec.retriable`, `may_retry`, `backoff` and the destination's
`RetryBudget`; the breakers' request and retry slots; `classify` and the outlier
detector). It is a part the exchange holds, not a base class: the HTTP/1 `Attempts` is
compiled (mypyc), and an interpreted class cannot derive from it.

- At the route: a request slot in the service's (and the rule's) breakers, or a local
  reply `overflow` (gRPC: 8 RESOURCE_EXHAUSTED); the request counts in the retry
  budget; its body is kept for a replay up to the policy's `bufferLimit` (past it, the
  stream is not retried).
- A failed attempt (connect failure, upstream reset or REFUSED_STREAM, per-try timeout,
  a response head the policy retries, or for a gRPC call a retried `grpc-status`) is
  retried when `retryOn` covers it and `may_retry` allows: after a full-jitter backoff,
  on an endpoint the router picks among those not tried (`retry_route`), with
  `x-tether-attempt: n` and the kept body and trailers sent again. When only the budget
  is spent the caller gets `retry_budget_exhausted` (a gRPC caller: the status its
  upstream gave).
- Nothing of a failed attempt reaches the caller: the response is relayed only once
  the stream decided not to retry it. A gRPC call whose policy names gRPC statuses
  holds its response HEADERS until the first DATA frame or the trailers: a status in
  trailers that came before any message is retried like a Trailers-Only one; once a
  message was relayed, the call is not retried.
- Every attempt ends at the balancer's tracker and the outlier detector with its own
  outcome; a gRPC call's status counts as the HTTP status it stands for (UNAVAILABLE as
  503, as Envoy's outlier detection reads gRPC).

Retries of a gRPC call by `grpc-status` go ahead whatever the method (gRPC calls are
all POST): naming the status in `retryOn` says the call may be repeated, as gRPC's own
retry policy (`retryableStatusCodes`) does. Resets and timeouts of a POST still need
`retryNonIdempotent`.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from proxy import grpc, h2_replies, local_reply
from proxy import outcome as outcomes
from proxy import retry as retries
from proxy.balance.outlier import classify
from proxy.outcome import Outcome

if TYPE_CHECKING:
    from proxy.balance import Endpoint
    from proxy.h2_exchange import H2Exchange
    from proxy.h2_link import Fields
    from proxy.resilience import Resilience
    from proxy.route_result import RouteResult


class H2Retry:
    """The resilience state of one stream (see the module's docstring)."""

    __slots__ = (
        "admitted",
        "attempt",
        "attempt_start",
        "credited",
        "ex",
        "headers",
        "replay",
        "replay_size",
        "res",
        "retry_slot",
        "sent",
        "spec",
        "timer",
        "tried",
    )

    def __init__(self, ex: H2Exchange, res: Resilience) -> None:
        self.ex = ex
        self.res = res
        self.spec: retries.RetrySpec | None = None
        self.attempt = 1
        self.attempt_start = ex.start
        self.admitted = False
        self.retry_slot = False
        # Body bytes kept to send again (None: past the buffer limit, never retried).
        self.replay: list[bytes] | None = None
        self.replay_size = 0
        self.tried: list[Endpoint] = []
        self.timer: asyncio.TimerHandle | None = None
        # Request bytes framed out on this attempt's stream, and the most ever framed
        # out on any attempt: only bytes beyond it open the caller's window again.
        self.sent = 0
        self.credited = 0
        # The first attempt's request fields (a retry adds x-tether-attempt).
        self.headers: Fields | None = None

    # -- the route ------------------------------------------------------------------------

    def admit(self) -> bool:
        """Take the breakers' request slots (False: refused, answered `overflow`) and
        count the request in the retry budget."""
        res, ex = self.res, self.ex
        if res.breaker is not None or res.rule_breaker is not None:
            refused = res.admit()
            if refused is not None:
                ex.local_reply(
                    local_reply.OVERFLOW,
                    f"circuit breaker {refused.name}: "
                    f"{refused.spec.max_active_requests} requests in flight",
                )
                return False
            self.admitted = True
        spec = res.retry
        if spec is not None and res.budget is not None:
            if spec.header_override:
                spec = retries.overridden(spec, ex.head.headers)
            self.spec = spec
            res.budget.request(ex.start)
            self.replay = []
            for piece in ex.body:
                self.keep(piece)
        return True

    def keep(self, data: bytes) -> None:
        """A request body piece: kept for a replay while within the buffer limit."""
        replay, spec = self.replay, self.spec
        if replay is None or spec is None:
            return
        size = self.replay_size + len(data)
        if size > spec.buffer_limit:
            self.replay = None  # too long to send again: never retried
            return
        self.replay_size = size
        replay.append(data)

    def on_sent(self, size: int) -> int:
        """`size` request bytes were framed out on this attempt: how many of them the
        caller had not been credited for (a replay's are, already)."""
        self.sent += size
        extra = self.sent - self.credited
        if extra <= 0:
            return 0
        self.credited = self.sent
        return extra

    def arm_try(self) -> None:
        spec = self.spec
        if spec is not None and spec.per_try_timeout:
            loop = asyncio.get_running_loop()
            self.timer = loop.call_later(spec.per_try_timeout, self.on_try_timeout)

    def cancel_timer(self) -> None:
        timer = self.timer
        if timer is not None:
            self.timer = None
            timer.cancel()

    # -- failed attempts ------------------------------------------------------------------

    def on_try_timeout(self) -> None:
        """The per-try timeout fired before the attempt's response head."""
        self.timer = None
        ex = self.ex
        if not ex.waiting_for_head():
            return
        ex._drop_upstream()
        reason = local_reply.PER_TRY_TIMEOUT
        status = local_reply.REPLIES[reason][0]
        failed = outcomes.timeout("per_try", reason, status)
        spec = self.spec
        message = f"no response within the per-try timeout ({spec.per_try_timeout if spec else 0}s)"
        if not self.retry(retries.F_TIMEOUT, failed, message):
            ex.upstream = None
            code = h2_replies.render(ex, reason, message, status)
            ex.end(failed if code is None else outcomes.with_grpc(failed, code))
        ex.flush_all()

    def response_failure(self, headers: Fields, status: int, end: bool) -> int:
        """What a response head means to the policy: a failure kind it retries, or 0."""
        spec = self.spec
        if spec is None:
            return 0
        if self.ex.grpc and end:
            # Trailers-Only: the call's status is in the head.
            code = grpc.status_of(headers)
            if code > 0 and spec.retriable_grpc(code):
                return retries.F_GRPC
            # A remote sidecar's own gRPC error that says the app was never reached.
            failure = retries.remote(503, headers) if code == grpc.UNAVAILABLE else 0
            if failure and spec.retriable(failure):
                return failure
        if status >= 500 or spec.any_status:
            names = None
            if spec.reads_headers:
                names = frozenset(n for n, _ in headers)
            if spec.retriable(retries.F_STATUS, status, names):
                return retries.F_STATUS
            failure = retries.remote(status, headers)
            if failure and spec.retriable(failure):
                return failure
        return 0

    def retry(self, failure: int, failed: Outcome, message: str) -> bool:
        """An attempt failed before anything of its response was relayed: send the
        request again (True) after a backoff, to another endpoint where there is one,
        if the policy covers the failure and allows another attempt; else False (the
        exchange ends the stream with the failure), or, when only the budget is spent,
        answer `retry_budget_exhausted` (True)."""
        spec, res, ex = self.spec, self.res, self.ex
        budget = res.budget
        if spec is None or budget is None:
            return False
        if failure not in (retries.F_STATUS, retries.F_GRPC) and not spec.retriable(failure):
            return False
        now = ex.conn.front.clock()
        # A connect failure, a refusal, or a gRPC status the policy names: any method.
        refused = failure in (retries.F_CONNECT, retries.F_REFUSED, retries.F_GRPC)
        route = ex.route
        assert route is not None
        why = res.retry_refusal(
            spec, self.attempt, ex.head.method, self.replay is not None, now, refused,
            failed.reason, route, self.tried,
        )  # fmt: skip
        ds = route.dstats
        if why:
            if why != retries.BUDGET_EXHAUSTED:
                return False
            ex.abandon()
            self.attempt_end(failed, now)
            text = f"{message}; not retried: the retry budget of {res.name} is spent"
            h2_replies.budget_reply(ex, failed, text)
            return True
        budget.spend(now)
        if ds is not None:
            ds.retries += 1
        ex.abandon()
        self.attempt_end(failed, now)
        trace = ex.trace
        if trace is not None:  # its client span ends (the next attempt gets its own)
            code = failed.grpc_status
            why = f"grpc-status {code}" if code > 0 else f"status {failed.status}"
            trace.attempt_end(ex, failed.reason or why)
        self.retry_slot = True
        if route.endpoint is not None:
            self.tried.append(route.endpoint)
        ex.await_retry()
        delay = retries.backoff(spec, self.attempt, retries.RNG)
        self.timer = asyncio.get_running_loop().call_later(delay, self.send_retry)
        return True

    def send_retry(self) -> None:
        """The backoff is over: the next attempt, on the endpoint the router picks."""
        self.timer = None
        ex = self.ex
        if not ex.waiting_for_retry():
            return
        route = ex.route
        assert route is not None
        front = ex.conn.front
        nxt = front.router.retry_route(ex.head, ex.conn.peer, route, self.tried)
        if nxt.pool is None:
            nxt = route  # nowhere else: the same one again
        self.attempt += 1
        self.sent = 0
        ex.start_attempt(nxt, front.clock())
        ex.flush_all()

    def attempt_started(self, route: RouteResult, now: float) -> None:
        self.attempt_start = now
        ep, tracker = route.endpoint, route.tracker
        if ep is not None and tracker is not None:
            tracker.on_start(ep, now)
        ds = route.dstats
        if ds is not None:
            ds.attempts += 1

    def attempt_end(self, outcome: Outcome, now: float) -> None:
        """An attempt is over: its tracker and the outlier detector hear its outcome."""
        self.cancel_timer()
        route = self.ex.route
        assert route is not None
        ep, tracker = route.endpoint, route.tracker
        ok = outcome.ok
        status = outcome.status
        if outcome.grpc_status > 0 and outcome.kind == "Completed":
            status = grpc.http_status(outcome.grpc_status)
            ok = status < 500
        if ep is not None and tracker is not None:
            tracker.on_end(ep, now, now - self.attempt_start, ok)
        res = self.res
        if self.retry_slot:
            self.retry_slot = False
            res.retry_done()
        detector, cluster = res.outlier, res.cluster
        if detector is not None and ep is not None and cluster is not None:
            detector.observe(ep, classify(outcome.kind, status), now, cluster.endpoints)

    def release(self, outcome: Outcome, now: float, attempt_open: bool) -> None:
        """At the stream's end: its open attempt ends with the stream's outcome; the
        breakers' slots are given back."""
        if attempt_open:
            self.attempt_end(outcome, now)
        self.cancel_timer()
        res = self.res
        if self.retry_slot:
            self.retry_slot = False
            res.retry_done()  # ended while a retry waited out its backoff
        if self.admitted:
            self.admitted = False
            res.release()
