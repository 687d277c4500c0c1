"""The exchange's state table, walked cell by cell, without sockets or an event loop.

Each test puts a real `Exchange` into one state (through the events that lead there:
a real request codec's head, real pools and upstream connections on fake transports, a
fake clock) and fires one event: a cell of `proxy.exchange.TABLE` must do its action
and reach the expected state; any other cell must raise `ExchangeStateError`, except
events that may come late to an ended exchange, which are dropped.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from proxy import local_reply
from proxy import outcome as outcomes
from proxy.balance import Endpoint, WeightedRoundRobin
from proxy.errors import BadMessageError
from proxy.exchange import Exchange, ExchangeStateError
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
    STATE_NAMES,
    SWITCHING,
    TABLE,
    TUNNEL,
)
from proxy.forwarding import ResponseMemo
from proxy.heads import ResponseHead
from proxy.pool import Pool, PoolPolicy
from proxy.route_result import Peer, RouteResult
from proxy.stats import ProxyStats
from proxy.upstream import UpstreamConnection
from tests.fakes import FakeClock, FakeTransport, parse_request

pytestmark = pytest.mark.filterwarnings("error")


class Timeouts:
    header_read = 10.0
    idle = 60.0
    request = 15.0
    connect = 2.0


class Server:
    """The listener settings an exchange reads (as proxy/downstream.py's ProxyServer)."""

    def __init__(self, clock: FakeClock) -> None:
        self.timeouts = Timeouts()
        self.stats = ProxyStats()
        self.draining = False
        self.xfp = (b"X-Forwarded-Proto", b"http")
        self.xfp_line = b"X-Forwarded-Proto: http\r\n"
        self.clock = clock
        self._seq = 0

    def new_request_id(self) -> bytes:
        self._seq += 1
        return b"rid-%d" % self._seq


class Downstream:
    """The exchange's connection: its buffers and the actions it was asked for."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.peer = Peer(b"10.0.0.9")
        self.memo = ResponseMemo()
        self.closed = False
        self.wbuf: list[bytes] = []
        self.ubuf: list[bytes] = []
        self.client = FakeTransport()
        self.pause_mask = 0
        self.dials: list[tuple[str, int]] = []
        self.done: list[Exchange] = []
        self.upstreams: dict[int, Any] = {}

    def flush(self) -> None:
        if self.wbuf:
            self.client.writelines(self.wbuf)
            self.wbuf.clear()

    def set_pause(self, bit: int) -> None:
        self.pause_mask |= bit

    def clear_pause(self, bit: int) -> None:
        self.pause_mask &= ~bit

    def dial(self, exchange: Exchange, host: str, port: int) -> None:
        self.dials.append((host, port))

    def exchange_done(self, exchange: Exchange, now: float) -> None:
        self.done.append(exchange)


GET = b"GET /items HTTP/1.1\r\nHost: svc\r\n\r\n"
POST = b"POST /items HTTP/1.1\r\nHost: svc\r\nContent-Length: 5\r\n\r\n"
UPGRADE = b"GET /ws HTTP/1.1\r\nHost: svc\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n"
CONNECT = b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n"


class World:
    """One exchange and everything around it."""

    def __init__(self, request: bytes = POST) -> None:
        self.clock = FakeClock()
        self.server = Server(self.clock)
        self.down = Downstream(self.server)
        self.endpoint = Endpoint("svc-1", "127.0.0.1", 20001)
        self.balancer = WeightedRoundRobin()
        self.balancer.update([self.endpoint])
        self.dstats = self.server.stats.destination("outbound", "svc.default")
        self.ex = Exchange(self.down, parse_request(request))

    def pool(self, *, idle: int) -> Pool:
        # max_connections=0: a pool without idle connections queues the exchange
        # instead of dialling (no event loop needed).
        pool = Pool("127.0.0.1", 20001, PoolPolicy(max_connections=idle))
        for _ in range(idle):
            up = UpstreamConnection(pool)
            up.connection_made(FakeTransport())
            pool.size += 1
            pool.idle.append(up)
        return pool

    def route(self, pool: Pool) -> None:
        self.ex.on_routed(
            RouteResult(pool, dstats=self.dstats, endpoint=self.endpoint, tracker=self.balancer)
        )

    @property
    def upstream(self) -> UpstreamConnection:
        up = self.ex.upstream
        assert up is not None
        return up


def routing(request: bytes = POST) -> World:
    return World(request)


def connecting() -> World:
    w = World()
    w.route(w.pool(idle=0))
    return w


def dialing() -> World:
    w = World(CONNECT)
    w.ex.on_routed(RouteResult(tunnel=("example.com", 443), dstats=w.dstats))
    return w


def sending() -> World:
    w = World()
    w.route(w.pool(idle=1))
    return w


def responding() -> World:
    w = sending()
    w.ex.on_request_body(b"hello")
    w.ex.on_request_end(None)
    w.upstream.codec.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n")
    return w


def switching() -> World:
    w = World(UPGRADE)
    w.route(w.pool(idle=1))
    w.ex.on_request_end(None)
    w.ex.on_response_head(ResponseHead(status=101, reason=b"Switching Protocols"))
    return w


def ended() -> World:
    w = World()
    w.ex.on_routed(RouteResult.answer(local_reply.UNKNOWN_SERVICE, dstats=w.dstats))
    return w


SETUPS: dict[int, Callable[[], World]] = {
    ROUTING: routing,
    CONNECTING: connecting,
    DIALING: dialing,
    SENDING: sending,
    RESPONDING: responding,
    SWITCHING: switching,
    ENDED: ended,
}


def _stray_upstream(w: World) -> UpstreamConnection:
    up = UpstreamConnection(w.pool(idle=0))
    up.connection_made(FakeTransport())
    return up


def _upstream_or_stray(w: World) -> UpstreamConnection:
    return w.ex.upstream if w.ex.upstream is not None else _stray_upstream(w)


EVENTS: dict[str, Callable[[World], Any]] = {
    "request_body": lambda w: w.ex.on_request_body(b"hello"),
    "request_end": lambda w: w.ex.on_request_end(None),
    "routed": lambda w: w.ex.on_routed(RouteResult(w.pool(idle=1), dstats=w.dstats)),
    "upstream_ready": lambda w: w.ex.on_upstream_ready(_stray_upstream(w)),
    "upstream_failed": lambda w: w.ex.on_upstream_failed(
        local_reply.UPSTREAM_CONNECT_ERROR, "connect to svc timed out"
    ),
    "tunnel_ready": lambda w: w.ex.on_tunnel_ready(FakeTransport(), b"early"),
    "tunnel_failed": lambda w: w.ex.on_tunnel_failed(
        local_reply.UPSTREAM_CONNECT_ERROR, "connect to example.com:443: refused"
    ),
    "informational": lambda w: w.ex.on_informational(ResponseHead(status=100, reason=b"Continue")),
    "response_head": lambda w: w.ex.on_response_head(
        ResponseHead(status=200, reason=b"OK", content_length=5)
    ),
    "response_body": lambda w: w.ex.on_response_body(b"world"),
    "response_end": lambda w: w.ex.on_response_end(None),
    "upstream_switched": lambda w: w.ex.on_upstream_switched(_upstream_or_stray(w), b"ws"),
    "upstream_lost": lambda w: w.ex.on_upstream_lost(
        _upstream_or_stray(w), local_reply.UPSTREAM_RESET, "closed"
    ),
    "deadline": lambda w: w.ex.on_deadline(),
    "client_gone": lambda w: w.ex.on_client_gone(),
    "bad_request": lambda w: w.ex.on_bad_request(BadMessageError("bad chunk size")),
    "last_request": lambda w: w.ex.on_last_request(),
}


def test_the_table_names_every_event_and_every_late_one() -> None:
    assert set(TABLE) == set(EVENTS)
    assert set(TABLE) >= LATE
    assert all(ENDED not in states for states in TABLE.values())


# The state each valid cell leads to (events that end the exchange lead to ENDED).
NEXT: dict[tuple[str, int], int] = {
    **{("last_request", s): s for s in TABLE["last_request"]},
    ("request_body", ROUTING): ROUTING,
    ("request_body", CONNECTING): CONNECTING,
    ("request_body", DIALING): DIALING,
    ("request_body", SENDING): SENDING,
    ("request_body", RESPONDING): RESPONDING,
    ("request_end", ROUTING): ROUTING,
    ("request_end", CONNECTING): CONNECTING,
    ("request_end", DIALING): DIALING,
    ("request_end", SENDING): SENDING,
    ("request_end", RESPONDING): RESPONDING,
    ("routed", ROUTING): SENDING,
    ("upstream_ready", CONNECTING): SENDING,
    ("upstream_failed", CONNECTING): ENDED,
    ("tunnel_ready", DIALING): ENDED,
    ("tunnel_failed", DIALING): ENDED,
    ("informational", SENDING): SENDING,
    ("response_head", SENDING): RESPONDING,
    ("response_body", RESPONDING): RESPONDING,
    ("response_end", RESPONDING): ENDED,
    ("response_end", SWITCHING): SWITCHING,
    ("upstream_switched", SWITCHING): ENDED,
    ("upstream_lost", SENDING): ENDED,
    ("upstream_lost", RESPONDING): ENDED,
    ("upstream_lost", SWITCHING): ENDED,
}
for _state in TABLE["deadline"]:
    for _event in ("deadline", "client_gone", "bad_request"):
        NEXT[(_event, _state)] = ENDED

CELLS = [(event, state) for event in EVENTS for state in SETUPS]


def test_next_states_cover_exactly_the_table() -> None:
    assert set(NEXT) == {(e, s) for e, states in TABLE.items() for s in states}


@pytest.mark.parametrize(
    ("event", "state"), CELLS, ids=[f"{e}-in-{STATE_NAMES[s]}" for e, s in CELLS]
)
def test_cell(event: str, state: int) -> None:
    w = SETUPS[state]()
    assert w.ex.state == state, w.ex
    before = list(w.down.done)
    if state in TABLE[event]:
        EVENTS[event](w)
        assert w.ex.state == NEXT[(event, state)], w.ex
        if NEXT[(event, state)] == ENDED:
            assert w.down.done == [*before, w.ex]  # ended once, here
            assert w.ex.outcome is not None
    elif state == ENDED and event in LATE:
        outcome = w.ex.outcome
        EVENTS[event](w)
        assert w.ex.state == ENDED and w.ex.outcome is outcome
        assert w.down.done == before  # not ended again
    else:
        with pytest.raises(ExchangeStateError, match=f"{event} in state {STATE_NAMES[state]}"):
            EVENTS[event](w)


# -- the actions of the cells that matter most -------------------------------------------


def test_routed_writes_the_rewritten_head_before_buffered_body() -> None:
    w = routing()
    w.ex.on_request_body(b"hello")
    assert w.down.pause_mask & PAUSE_CONNECTING  # no connection yet: reading stops
    w.route(w.pool(idle=1))
    head, body = w.down.ubuf
    assert head.startswith(b"POST /items HTTP/1.1\r\n")
    assert b"X-Forwarded-For: 10.0.0.9\r\n" in head and b"Via: 1.1 tether\r\n" in head
    assert b"X-Request-Id: rid-1\r\n" in head
    assert body == b"hello"
    assert w.endpoint.active == 1  # the tracker heard of the start at the pick


def test_a_completed_response_ends_once_and_returns_the_connection() -> None:
    w = responding()
    up = w.upstream
    pool = up.pool
    w.clock.advance(0.25)
    up.codec.feed(b"world")
    assert w.ex.state == ENDED and w.ex.after == KEEP
    assert w.ex.outcome == outcomes.Completed(200) and w.ex.outcome.ok
    assert pool.idle == [up] and up.sink is None
    assert w.endpoint.active == 0  # on_end, exactly once
    assert w.dstats.by_class[2] == 1 and w.dstats.latency_sum == pytest.approx(0.25)
    out = b"".join(w.down.wbuf)
    assert out.startswith(b"HTTP/1.1 200 OK\r\n") and out.endswith(b"\r\n\r\nworld")


def test_an_early_response_closes_both_connections() -> None:
    w = sending()
    up = w.upstream
    up.codec.feed(b"HTTP/1.1 413 Too Large\r\nContent-Length: 0\r\n\r\n")
    assert w.ex.after == CLOSE and up.closed
    assert w.ex.outcome == outcomes.Completed(413)


def test_a_reset_on_a_reused_connection_is_retried_once_on_another() -> None:
    w = World(GET)
    pool = w.pool(idle=2)
    first, second = pool.idle
    first.requests = 1  # it carried a request before: the server may have closed it idle
    second.requests = 1
    w.route(pool)
    w.ex.on_request_end(None)
    lost = w.upstream
    w.ex.on_upstream_lost(lost, local_reply.UPSTREAM_RESET, "closed")
    assert w.ex.state == SENDING and w.ex.retried and w.ex.upstream is not lost
    assert w.down.ubuf == [w.ex.request_bytes]
    assert w.endpoint.active == 1  # the attempt ended, the request goes on
    w.ex.on_upstream_lost(w.upstream, local_reply.UPSTREAM_RESET, "closed")
    assert w.ex.outcome == outcomes.Reset(502, local_reply.UPSTREAM_RESET)
    assert b"x-tether-error: upstream_reset" in w.down.wbuf[0]
    assert w.endpoint.active == 0


def test_request_timeout_runs_from_the_request_end_and_is_the_routes() -> None:
    w = World(GET)
    w.ex.on_routed(RouteResult(w.pool(idle=1), dstats=w.dstats, request_timeout=3.0))
    w.clock.advance(100)  # before the request's end no request timeout runs
    w.ex.on_request_end(None)
    assert w.ex.deadline == w.clock.now + 3.0
    w.clock.advance(3.0)
    w.ex.on_deadline()
    assert w.ex.outcome == outcomes.Timeout(504, local_reply.REQUEST_TIMEOUT, "request")
    assert w.ex.after == KEEP  # the request was whole: the connection stays
    assert w.ex.upstream is None and w.down.client.data.startswith(b"HTTP/1.1 504 ")


def test_a_timeout_mid_response_aborts() -> None:
    w = responding()
    up = w.upstream
    w.ex.on_deadline()
    assert up.transport.aborted
    assert w.ex.after == ABORT
    assert w.ex.outcome == outcomes.Timeout(0, local_reply.UPSTREAM_TIMEOUT, "idle")
    assert w.server.stats.local_replies == {local_reply.UPSTREAM_TIMEOUT: 1}


def test_client_gone_while_queued_leaves_the_pools_queue() -> None:
    w = connecting()
    pool = w.ex.pool
    assert pool is not None and list(pool.waiters) == [w.ex]
    w.ex.on_client_gone()
    assert not pool.waiters
    assert w.ex.outcome is outcomes.CLIENT_GONE and w.ex.after == GONE
    assert w.endpoint.active == 0
    # The pool's late answer is given back, not used.
    up = _stray_upstream(w)
    up.pool.idle.clear()
    w.ex.on_upstream_ready(up)
    assert up.pool.idle == [up]


def test_connect_failure_is_its_own_outcome() -> None:
    w = connecting()
    w.ex.on_upstream_failed(local_reply.UPSTREAM_CONNECT_ERROR, "refused")
    assert w.ex.outcome == outcomes.ConnectFailure(502, local_reply.UPSTREAM_CONNECT_ERROR)
    assert w.ex.after == CLOSE  # the request body had not all arrived
    assert not w.ex.outcome.ok


def test_connect_tunnel_answers_200_and_hands_over() -> None:
    w = dialing()
    assert w.down.dials == [("example.com", 443)]
    t = FakeTransport()
    w.ex.on_tunnel_ready(t, b"hi")
    assert w.ex.after == TUNNEL and w.ex.tunnel == (t, b"hi")
    assert w.down.wbuf == [b"HTTP/1.1 200 Connection Established\r\n\r\n"]
    assert w.ex.outcome == outcomes.Completed(200)


def test_a_local_reply_is_counted_once() -> None:
    w = ended()
    assert w.ex.outcome == outcomes.LocalReply(404, local_reply.UNKNOWN_SERVICE)
    assert w.server.stats.local_replies == {local_reply.UNKNOWN_SERVICE: 1}
    assert w.dstats.by_class[4] == 1
    with pytest.raises(ExchangeStateError, match="ended twice"):
        w.ex.end(outcomes.CLIENT_GONE)


def test_outcomes_are_shared_and_typed() -> None:
    assert outcomes.completed(200) is outcomes.completed(200)
    assert outcomes.completed(503).ok is False and outcomes.completed(404).ok is True
    r = outcomes.local(outcomes.Reset, "upstream_reset", 502)
    assert r is outcomes.local(outcomes.Reset, "upstream_reset", 502)
    assert isinstance(r, outcomes.Reset) and r.kind == "Reset"
    t = outcomes.timeout("request", "upstream_timeout", 504)
    assert t.which == "request" and t is outcomes.timeout("request", "upstream_timeout", 504)
