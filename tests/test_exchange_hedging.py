"""Hedged requests in the exchange without sockets (tests/test_exchange_retry.py's fake
transports, fake clock and hand-fired timers): which head wins, what happens to the
other attempt's connection, and the balancer's, breakers' and budget's accounting."""

from __future__ import annotations

import pytest

from proxy import outcome as outcomes
from proxy.circuit_breaker import CircuitBreakerSpec
from proxy.exchange_states import ENDED, SENDING
from proxy.hedging import HedgeSpec, Hedging
from proxy.retry import RetrySpec
from tests.test_exchange_retry import GET, RetryWorld

pytestmark = pytest.mark.filterwarnings("error")

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"
POST = b"POST /items HTTP/1.1\r\nHost: svc\r\nContent-Length: 2\r\n\r\n"


def world(request: bytes = GET, breaker: CircuitBreakerSpec | None = None) -> RetryWorld:
    w = RetryWorld(request, RetrySpec(on=8, attempts=3), breaker)
    assert w.res is not None
    w.res.hedging = Hedging(HedgeSpec(0.05), "svc.default")
    return w


def test_the_hedges_head_wins_and_the_first_attempts_connection_is_aborted() -> None:
    w = world()
    w.ex.on_routed(w.routes[0])
    w.ex.on_request_end(None)
    w.down.flush()
    first = w.ex.upstream
    assert first is not None and w.server.timers[-1].delay == 0.05
    w.server.fire()  # the hedge's delay: sent to the other endpoint
    assert w.eps[1].active == 1 and w.dstats.attempts == 2
    assert w.pools[1].idle == []  # its idle connection carries the hedge
    assert w.ex.hedge is not None and w.ex.hedge.up is not None
    hedge_up = w.ex.hedge.up
    sent = hedge_up.transport.data
    assert sent.startswith(b"GET /items HTTP/1.1\r\n") and b"x-tether-attempt: 2\r\n" in sent
    # Head and body in one read: the exchange takes over the hedge's connection.
    hedge_up.data_received(OK)
    assert w.ex.state == ENDED and w.ex.outcome == outcomes.completed(200)
    assert first.transport.aborted and first.closed  # never pooled mid-response
    assert hedge_up in w.pools[1].idle  # the winner's connection goes back to its pool
    w.down.flush()
    assert w.down.client.data.endswith(b"hello") and w.down.client.data.count(b"HTTP/") == 1
    assert [ep.active for ep in w.eps] == [0, 0]
    assert w.res is not None and w.res.hedging is not None
    assert (w.res.hedging.sent, w.res.hedging.won) == (1, 1)
    assert w.res.budget is not None and w.res.budget.counts(w.clock.now) == (1, 1)


def test_the_first_head_wins_and_the_hedge_is_cancelled_at_the_end() -> None:
    w = world(breaker=CircuitBreakerSpec(max_active_requests=5))
    w.ex.on_routed(w.routes[0])
    w.ex.on_request_end(None)
    w.down.flush()
    first = w.ex.upstream
    assert first is not None
    w.server.fire()
    hedge = w.ex.hedge
    assert hedge is not None and hedge.up is not None
    hedge_up = hedge.up
    assert w.res is not None and w.res.breaker is not None
    assert w.res.breaker.retries == 1  # the hedge holds a retry slot
    first.data_received(OK)
    assert w.ex.state == ENDED and w.ex.outcome == outcomes.completed(200)
    assert hedge_up.transport.aborted and hedge_up not in w.pools[1].idle
    assert first in w.pools[0].idle
    assert [ep.active for ep in w.eps] == [0, 0]
    assert (w.res.breaker.active, w.res.breaker.retries) == (0, 0)
    assert w.res.hedging is not None and (w.res.hedging.sent, w.res.hedging.won) == (1, 0)
    # A late answer on the aborted connection reaches nobody.
    w.down.flush()
    assert w.down.client.data.count(b"HTTP/") == 1


def test_a_first_attempt_reset_waits_for_the_hedge() -> None:
    w = world()
    w.ex.on_routed(w.routes[0])
    w.ex.on_request_end(None)
    w.down.flush()
    first = w.ex.upstream
    assert first is not None
    w.server.fire()
    hedge = w.ex.hedge
    assert hedge is not None and hedge.up is not None
    hedge_up = hedge.up
    first.connection_lost(ConnectionResetError("reset"))
    assert w.ex.state != ENDED and not [t for t in w.server.timers if not t.cancelled]
    assert w.dstats.retries == 0  # no retry while the hedge is in flight
    hedge_up.data_received(OK)
    assert w.ex.state == ENDED and w.ex.outcome == outcomes.completed(200)
    assert [ep.active for ep in w.eps] == [0, 0]


def test_when_both_fail_the_hedges_failure_is_retried_or_answered() -> None:
    for attempts in (3, 2):
        w = RetryWorld(GET, RetrySpec(on=8, attempts=attempts))
        assert w.res is not None
        w.res.hedging = Hedging(HedgeSpec(0.05), "svc.default")
        w.ex.on_routed(w.routes[0])
        w.ex.on_request_end(None)
        w.down.flush()
        first = w.ex.upstream
        assert first is not None
        w.server.fire()
        hedge = w.ex.hedge
        assert hedge is not None and hedge.up is not None
        first.connection_lost(ConnectionResetError("reset"))
        hedge.up.connection_lost(ConnectionResetError("reset"))
        if attempts == 3:
            # The hedge's failure is the exchange's attempt's: retried (after a backoff).
            assert w.ex.state != ENDED and w.dstats.retries == 1
            assert [t for t in w.server.timers if not t.cancelled]
            w.ex.on_client_gone()
        else:
            # No attempt left: the hedge's failure is the answer.
            assert w.ex.state == ENDED and w.ex.outcome.kind == "Reset"
            w.down.flush()
            assert w.down.client.data.startswith(b"HTTP/1.1 502 ")
            assert w.dstats.retries_refused == {"attempts": 1}
        assert [ep.active for ep in w.eps] == [0, 0]


def test_a_response_before_the_delay_disarms_the_hedge_and_posts_get_none() -> None:
    w = world()
    w.ex.on_routed(w.routes[0])
    w.ex.on_request_end(None)
    w.down.flush()
    timer = w.server.timers[-1]
    up = w.ex.upstream
    assert up is not None
    up.data_received(OK)
    assert w.ex.state == ENDED and timer.cancelled
    assert w.dstats.attempts == 1
    p = world(POST)
    p.ex.on_routed(p.routes[0])
    assert p.server.timers == [] and p.ex.state == SENDING
