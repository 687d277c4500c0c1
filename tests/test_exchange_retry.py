"""The exchange's attempts without sockets: a retry after a retriable response (its body
in the same read: the old connection's codec finishes it into the void), per-try
timeouts, the budget's refusal, replayed bodies and the balancer's accounting, on fake
transports with a fake clock and hand-fired timers."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from proxy import local_reply
from proxy import outcome as outcomes
from proxy.balance import Endpoint, WeightedRoundRobin
from proxy.circuit_breaker import CircuitBreakerSpec
from proxy.cluster import Cluster
from proxy.exchange import Exchange
from proxy.exchange_states import CONNECTING, ENDED, RESPONDING
from proxy.head_cache import HeadCache
from proxy.pool import Pool, PoolPolicy
from proxy.resilience import ResilienceState
from proxy.response_codec import ResponseCodec
from proxy.retry import RetrySpec
from proxy.route_result import Peer, RouteResult
from proxy.upstream import UpstreamConnection
from tests.fakes import FakeTransport, parse_request
from tests.test_exchange import Downstream, Server

pytestmark = pytest.mark.filterwarnings("error")


class Timer:
    def __init__(self, delay: float, fn: Callable[[], None]) -> None:
        self.delay, self.fn, self.cancelled = delay, fn, False

    def cancel(self) -> None:
        self.cancelled = True


class Router:
    """Sends a retry to the other endpoint's route."""

    def __init__(self) -> None:
        self.routes: dict[int, RouteResult] = {}

    def retry_route(
        self, head: Any, peer: Peer, previous: RouteResult, tried: list[Any]
    ) -> RouteResult:
        for route in self.routes.values():
            if route.endpoint not in tried:
                return route
        return previous


class RetryServer(Server):
    def __init__(self, clock: Any) -> None:
        super().__init__(clock)
        self.timers: list[Timer] = []
        self.router = Router()

    def call_later(self, delay: float, fn: Callable[[], None]) -> Timer:
        t = Timer(delay, fn)
        self.timers.append(t)
        return t

    def fire(self) -> Timer:
        live = [t for t in self.timers if not t.cancelled]
        assert live, "no timer armed"
        t = live[0]
        self.timers.remove(t)
        t.fn()
        return t


BUSY = b"HTTP/1.1 503 Busy\r\nContent-Length: 4\r\n\r\nbusy"


class _Sink:
    def on_response_head(self, head: Any) -> None: ...
    def on_informational(self, head: Any) -> None: ...
    def on_response_body(self, data: bytes) -> None: ...
    def on_response_end(self, trailers: Any) -> None: ...


def warm_cache() -> HeadCache:
    """A head cache that has seen BUSY's head: its next parse takes the fast path,
    which hands head and body to the sink it read once, before the head's callback."""
    cache = HeadCache()
    codec = ResponseCodec(_Sink(), cache)  # type: ignore[arg-type]
    codec.feed(BUSY)
    assert cache.responses, "the head was cached"
    return cache


def pool_with_idle(port: int, cache: HeadCache | None = None) -> Pool:
    pool = Pool("127.0.0.1", port, PoolPolicy(max_connections=1), head_cache=cache)
    up = UpstreamConnection(pool)
    up.connection_made(FakeTransport())
    pool.size += 1
    pool.idle.append(up)
    return pool


class RetryWorld:
    def __init__(
        self, request: bytes, spec: RetrySpec, breaker: CircuitBreakerSpec | None = None
    ) -> None:
        from tests.fakes import FakeClock

        self.clock = FakeClock()
        self.server = RetryServer(self.clock)
        self.down = Downstream(self.server)  # type: ignore[arg-type]
        self.eps = [Endpoint(f"e{i}", "127.0.0.1", 20001 + i) for i in range(2)]
        self.balancer = WeightedRoundRobin()
        self.balancer.update(self.eps)
        self.cluster = Cluster("svc", "default", self.balancer)
        self.cluster.set_endpoints(self.eps)
        self.dstats = self.server.stats.destination("outbound", "svc.default")
        state = ResilienceState()
        self.res = state.make(("default", "svc"), self.cluster, spec, breaker, None)
        cache = warm_cache()
        self.pools = [pool_with_idle(20001 + i, cache) for i in range(2)]
        self.routes = [
            RouteResult(
                pool,
                dstats=self.dstats,
                endpoint=ep,
                tracker=self.balancer,
                resilience=self.res,
            )
            for pool, ep in zip(self.pools, self.eps, strict=True)
        ]
        self.server.router.routes = dict(enumerate(self.routes))
        self.ex = Exchange(self.down, parse_request(request))  # type: ignore[arg-type]


GET = b"GET /items HTTP/1.1\r\nHost: svc\r\n\r\n"
PUT = b"PUT /items HTTP/1.1\r\nHost: svc\r\nContent-Length: 5\r\n\r\n"
RETRY_5XX = RetrySpec(on=8, attempts=3)  # 5xx


def test_a_503_with_its_body_in_the_same_read_is_retried_on_the_other_endpoint() -> None:
    w = RetryWorld(GET, RETRY_5XX)
    w.ex.on_routed(w.routes[0])
    w.ex.on_request_end(None)
    first = w.ex.upstream
    assert first is not None and w.eps[0].active == 1
    # Head and body in one read: the codec's fast path hands the body to its sink after
    # the exchange gave the connection up; it is dropped, not an error.
    first.data_received(BUSY)
    assert w.ex.state == CONNECTING and first.closed
    assert w.eps[0].active == 0 and w.dstats.retries == 1
    assert w.down.client.data == b""  # nothing of the failed attempt reached the client
    timer = w.server.fire()  # the backoff
    assert 0 <= timer.delay <= RETRY_5XX.backoff_base
    second = w.ex.upstream
    assert second is not None and second.pool is w.pools[1] and w.eps[1].active == 1
    sent = b"".join(w.down.ubuf) or second.transport.data
    assert b"x-tether-attempt: 2\r\n" in sent and sent.startswith(b"GET /items HTTP/1.1\r\n")
    second.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    assert w.ex.state == ENDED and w.ex.outcome == outcomes.completed(200)
    w.down.flush()
    assert (
        w.down.client.data.startswith(b"HTTP/1.1 200 OK")
        and w.down.client.data.count(b"HTTP/1.1") == 1
    )
    assert w.eps[1].active == 0 and w.dstats.attempts == 2
    assert w.res is not None and w.res.budget is not None
    assert w.res.budget.counts(w.clock.now) == (1, 1)


def test_the_put_body_is_replayed_to_the_second_attempt() -> None:
    w = RetryWorld(PUT, RETRY_5XX)
    w.ex.on_routed(w.routes[0])
    w.ex.on_request_body(b"hello")
    w.ex.on_request_end(None)
    w.down.flush()
    first = w.ex.upstream
    assert first is not None
    first.transport.writelines(w.down.ubuf)
    w.down.ubuf.clear()
    first.data_received(b"HTTP/1.1 500 Oops\r\nContent-Length: 0\r\n\r\n")
    w.server.fire()
    assert w.down.ubuf[-1] == b"hello" and b"x-tether-attempt: 2" in w.down.ubuf[0]


def test_budget_exhausted_answers_with_the_failure_status_and_reason() -> None:
    spec = RetrySpec(on=8, attempts=3, budget_ratio=0.0, budget_min_per_second=0)
    w = RetryWorld(GET, spec)
    w.ex.on_routed(w.routes[0])
    w.ex.on_request_end(None)
    first = w.ex.upstream
    assert first is not None
    first.data_received(b"HTTP/1.1 500 Oops\r\nContent-Length: 3\r\n\r\nabc")
    assert w.ex.state == ENDED
    assert w.ex.outcome == outcomes.local(
        outcomes.LocalReply, local_reply.RETRY_BUDGET_EXHAUSTED, 500
    )
    w.down.flush()
    assert w.down.client.data.startswith(b"HTTP/1.1 500 ")
    assert b"x-tether-error: retry_budget_exhausted" in w.down.client.data
    assert w.dstats.retries_refused == {"budget": 1} and w.eps[0].active == 0


def test_per_try_timeout_retries_and_the_last_one_answers_per_try_timeout() -> None:
    spec = RetrySpec(on=16, attempts=2, per_try_timeout=0.5)  # gateway-error
    w = RetryWorld(GET, spec)
    w.ex.on_routed(w.routes[0])
    w.ex.on_request_end(None)
    assert w.server.timers[-1].delay == 0.5
    w.server.fire()  # per-try timeout of attempt 1
    assert w.ex.state == CONNECTING and w.pools[0].size == 0  # its connection aborted
    w.server.fire()  # backoff
    assert w.ex.upstream is not None and w.ex.upstream.pool is w.pools[1]
    w.server.fire()  # per-try timeout of attempt 2: no attempts left
    assert w.ex.state == ENDED
    assert w.ex.outcome == outcomes.timeout("per_try", local_reply.PER_TRY_TIMEOUT, 504)
    assert [ep.active for ep in w.eps] == [0, 0]
    assert w.dstats.retries_refused == {"attempts": 1}


def test_a_relayed_response_cancels_the_per_try_timer() -> None:
    spec = RetrySpec(on=16, attempts=2, per_try_timeout=0.5)
    w = RetryWorld(GET, spec)
    w.ex.on_routed(w.routes[0])
    w.ex.on_request_end(None)
    timer = w.server.timers[-1]
    up = w.ex.upstream
    assert up is not None
    up.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhel")
    assert w.ex.state == RESPONDING and timer.cancelled


def test_a_client_leaving_during_the_backoff_gives_every_slot_back() -> None:
    w = RetryWorld(GET, RETRY_5XX, CircuitBreakerSpec(max_active_requests=5))
    w.ex.on_routed(w.routes[0])
    w.ex.on_request_end(None)
    up = w.ex.upstream
    assert up is not None
    up.data_received(b"HTTP/1.1 500 Oops\r\nContent-Length: 0\r\n\r\n")
    assert w.res is not None and w.res.breaker is not None
    breaker = w.res.breaker
    assert (breaker.active, breaker.retries) == (1, 1) and w.ex.state == CONNECTING
    timer = w.server.timers[-1]
    w.ex.on_client_gone()
    assert w.ex.state == ENDED and timer.cancelled
    assert (breaker.active, breaker.retries) == (0, 0)
    assert [ep.active for ep in w.eps] == [0, 0]


def test_a_request_without_a_body_keeps_no_replay_buffer_of_its_own() -> None:
    from proxy.attempts import _NO_BODY

    w = RetryWorld(GET, RETRY_5XX)
    w.ex.on_routed(w.routes[0])
    w.ex.on_request_end(None)
    # Replayable (not None), and shared: nothing allocated for it; no per-try timer.
    assert w.ex.replay is _NO_BODY and w.server.timers == []
    up = w.ex.upstream
    assert up is not None
    up.data_received(b"HTTP/1.1 503 Busy\r\nContent-Length: 0\r\n\r\n")
    w.server.fire()  # the backoff: the retry sends the head alone
    assert len(w.down.ubuf) == 1 and b"x-tether-attempt: 2" in w.down.ubuf[0]
    # A request with a body, before and after its route, keeps its own.
    p = RetryWorld(PUT, RETRY_5XX)
    p.ex.on_request_body(b"he")
    p.ex.on_routed(p.routes[0])
    p.ex.on_request_body(b"llo")
    assert p.ex.replay == [b"he", b"llo"] and p.ex.replay is not _NO_BODY
    assert _NO_BODY == []
