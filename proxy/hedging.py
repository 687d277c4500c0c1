"""Hedged requests: a second attempt to another endpoint when the first is slow to answer.

A destination's (or a Route rule's) `hedging` gives an idempotent request (GET, HEAD,
OPTIONS; every method where the policy says the requests are idempotent) a `Hedge` at
the route (proxy/attempts.py's `_resilient`). When the delay passes without a response
head (`delay`, or with `delayPercentile` that percentile of the latest requests'
latencies kept by `Hedging`, computed by the pure `percentile_delay`), and `may_hedge`
allows it (the request whole and replayable, the retry budget not spent, a retry slot
free in the breakers, another endpoint available), the hedge sends the same request,
with `x-tether-attempt: N`, to an endpoint the request has not tried. Both attempts
race for their response head:

- the hedge's head first: the exchange gives up its own attempt (its connection aborted,
  never pooled mid-response; its end told to the tracker with an outcome the outlier
  detector ignores) and adopts the hedge's connection, route and attempt, then relays
  its head as its own;
- the exchange's head first (or the request ends any other way): the hedge is cancelled
  at the exchange's end (its connection aborted, its attempt ended).

If the exchange's own attempt fails while the hedge is in flight, the request waits for
the hedge instead of retrying; if the hedge fails, the exchange goes on alone (or, when
its own attempt had failed, takes the hedge's attempt and failure over as its own, to
retry or answer). A hedge counts as an attempt and as
a retry in the budget and in the breakers' retry slots; `Hedging` counts the hedges sent,
won and not sent, by reason.

`may_hedge` is the pure decision (the clock is an argument); `Hedge` is the second
attempt's sink and pool waiter (proxy/upstream.py, proxy/pool.py), driving the exchange
only through its attempts' methods.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from proxy import local_reply
from proxy import outcome as outcomes
from proxy.balance.outlier import classify
from proxy.exchange_states import CONNECTING, ENDED, SENDING
from proxy.pool import PoolOverflowError
from proxy.retry import BUDGET_EXHAUSTED, NO_OTHER_ENDPOINT, NOT_REPLAYABLE, OVERFLOW

if TYPE_CHECKING:
    from proxy.attempts import Attempts
    from proxy.balance import Endpoint
    from proxy.exchange_states import TimerHandle
    from proxy.heads import Fields, ResponseHead
    from proxy.outcome import Outcome
    from proxy.resilience import Resilience
    from proxy.retry import RetryBudget
    from proxy.route_result import RouteResult
    from proxy.upstream import UpstreamConnection
    from wire import resources as schema

HEDGE_METHODS: Final = frozenset({b"GET", b"HEAD", b"OPTIONS"})

# Why a hedge was not sent (the `reason` label of tether_hedges_refused_total): the
# reasons a retry is refused for (proxy/retry.py), and two of a hedge's own.
ANSWERED: Final = "answered"  # the head came, or the request ended, first
INCOMPLETE: Final = "request_incomplete"
BUDGET: Final = BUDGET_EXHAUSTED

# What the abandoned attempt of a race ends with: the outlier detector ignores it.
HEDGE_LOST: Final = "hedge_lost"


# Latencies a percentile hedging keeps (the latest ones), and how many new ones make it
# compute its percentile again.
WINDOW: Final = 128
RECOMPUTE_EVERY: Final = 16


@dataclass(frozen=True, slots=True)
class HedgeSpec:
    delay: float
    max_hedges: int = 1
    idempotent: bool = False
    # delayPercentile (0: the static `delay`), its floor and ceiling, and the latencies
    # it needs first (until then: `max_delay`).
    percentile: float = 0.0
    min_delay: float = 0.005
    max_delay: float = 0.25
    min_samples: int = 20

    @classmethod
    def of(cls, p: schema.HedgingPolicy) -> HedgeSpec:
        if p.delay_percentile is None:
            return cls(p.delay or 0.0, p.max_hedges, p.idempotent)
        return cls(
            0.0,
            p.max_hedges,
            p.idempotent,
            p.delay_percentile,
            p.min_delay,
            p.max_delay,
            p.min_samples,
        )

    def applies(self, method: bytes) -> bool:
        return self.idempotent or method in HEDGE_METHODS


def percentile_delay(samples: Sequence[float], spec: HedgeSpec) -> float:
    """The hedge delay of a percentile hedging: the `percentile` (nearest rank) of
    `samples` (latencies, seconds) within [min_delay, max_delay]; `max_delay` while
    fewer than `min_samples` are in."""
    n = len(samples)
    if n < spec.min_samples or n == 0:
        return spec.max_delay
    rank = max(math.ceil(spec.percentile / 100.0 * n), 1)
    value = sorted(samples)[rank - 1]
    return min(max(value, spec.min_delay), spec.max_delay)


def may_hedge(
    waiting: bool, req_done: bool, replayable: bool, budget: RetryBudget | None, now: float
) -> str:
    """ "" when a hedge may go out now, else why not. `waiting`: the exchange has no
    response head yet; `req_done`: the whole request arrived; `replayable`: its body
    (if any) is kept. The budget is asked last and charged by the caller."""
    if not waiting:
        return ANSWERED
    if not req_done:
        return INCOMPLETE
    if not replayable:
        return NOT_REPLAYABLE
    if budget is not None and not budget.allows(now):
        return BUDGET
    return ""


class Hedging:
    """A destination's (or rule's) hedging: its spec and counters, kept across snapshots."""

    __slots__ = (
        "_delay",
        "_delay_of",
        "_fresh",
        "_next",
        "name",
        "refused",
        "samples",
        "sent",
        "spec",
        "won",
    )

    def __init__(self, spec: HedgeSpec, name: str) -> None:
        self.spec = spec
        self.name = name
        self.sent = 0
        self.won = 0
        self.refused: dict[str, int] = {}
        # A percentile hedging's latest request latencies (at most WINDOW, a ring once
        # full), and the delay computed from them for `_delay_of` (the spec then).
        self.samples: list[float] = []
        self._next = 0
        self._fresh = 0
        self._delay = spec.max_delay if spec.percentile else spec.delay
        self._delay_of = spec

    def delay(self) -> float:
        """How long a request waits before its hedge goes."""
        spec = self.spec
        if not spec.percentile:
            return spec.delay
        if self._delay_of is not spec:  # a new snapshot changed the policy
            self._delay_of = spec
            self._delay = percentile_delay(self.samples, spec)
        return self._delay

    def observe(self, latency: float) -> None:
        """A request's latency (to its end, or to a winning hedge's head): kept by a
        percentile hedging, its delay computed again every RECOMPUTE_EVERY of them."""
        spec = self.spec
        if not spec.percentile:
            return
        samples = self.samples
        if len(samples) < WINDOW:
            samples.append(latency)
        else:
            samples[self._next] = latency
            self._next = (self._next + 1) % WINDOW
        self._fresh += 1
        if self._fresh >= RECOMPUTE_EVERY or len(samples) == spec.min_samples:
            self._fresh = 0
            self._delay_of = spec
            self._delay = percentile_delay(samples, spec)

    def refuse(self, why: str) -> None:
        self.refused[why] = self.refused.get(why, 0) + 1

    def __repr__(self) -> str:
        return f"<Hedging {self.name} after {self.delay()}s sent={self.sent} won={self.won}>"


def render_metrics(hedgings: dict[tuple[str, ...], Hedging]) -> list[str]:
    """Hedges sent, won and not sent per destination (rules add into theirs)."""
    sent: dict[str, int] = {}
    won: dict[str, int] = {}
    refused: dict[tuple[str, str], int] = {}
    for key, h in hedgings.items():
        dest = f"{key[1]}.{key[0]}"
        sent[dest] = sent.get(dest, 0) + h.sent
        won[dest] = won.get(dest, 0) + h.won
        for why, n in h.refused.items():
            refused[(dest, why)] = refused.get((dest, why), 0) + n
    out = [
        "# HELP tether_hedges_total Hedged attempts sent.",
        "# TYPE tether_hedges_total counter",
    ]
    out += [f'tether_hedges_total{{destination="{d}"}} {n}' for d, n in sorted(sent.items())]
    out += [
        "# HELP tether_hedges_won_total Hedged attempts whose response head came first.",
        "# TYPE tether_hedges_won_total counter",
    ]
    out += [f'tether_hedges_won_total{{destination="{d}"}} {n}' for d, n in sorted(won.items())]
    out += [
        "# HELP tether_hedges_refused_total Hedges the policy allowed but not sent, by reason.",
        "# TYPE tether_hedges_refused_total counter",
    ]
    out += [
        f'tether_hedges_refused_total{{destination="{d}",reason="{why}"}} {n}'
        for (d, why), n in sorted(refused.items())
    ]
    return out


# Hedge states.
ARMED: Final = 0  # waiting out the delay
PENDING: Final = 1  # waiting for a connection
SENT: Final = 2  # request written, waiting for the head
DONE: Final = 3  # won, failed or cancelled


def _trace_of(ex: Attempts) -> Any:
    """The request's trace (proxy/tracing.py's SampledTrace or trace_context's
    Propagation; None when tracing is off): the exchange's, which `Attempts` leaves to it."""
    return ex.trace  # type: ignore[attr-defined]


class Hedge:
    """One request's hedged attempt (see the module's docstring)."""

    __slots__ = (
        "avoid",
        "data",
        "ex",
        "hedging",
        "progress",
        "res",
        "route",
        "sole",
        "span",
        "start",
        "state",
        "timer",
        "up",
        "won",
    )

    def __init__(self, ex: Attempts, res: Resilience, hedging: Hedging) -> None:
        self.ex = ex
        self.res = res
        self.hedging = hedging
        self.state = ARMED
        self.route: RouteResult | None = None
        self.up: UpstreamConnection | None = None
        self.data: list[bytes] = []
        self.start = 0.0
        self.progress = 0
        self.sole = False  # the exchange's own attempt failed: only this one is left
        self.won = False
        self.avoid: list[Endpoint] = []  # where a hedge could not connect
        self.span: Any = None  # its client span when the request is traced
        self.timer: TimerHandle | None = ex.server.call_later(hedging.delay(), self.fire)

    @property
    def in_flight(self) -> bool:
        return self.state in (PENDING, SENT)

    def fire(self) -> None:
        """The delay is over: send the hedge if the request still waits and may."""
        self.timer = None
        ex = self.ex
        if self.state != ARMED or ex.state == ENDED:
            return
        server = ex.server
        now = server.clock()
        res = self.res
        route = ex.route
        why = may_hedge(
            ex.state in (CONNECTING, SENDING),
            ex.req_done,
            not ex.head.has_body or ex.replay is not None,
            res.budget,
            now,
        )
        nxt = None
        if not why and route is not None:
            tried = [*(ex.tried or ()), *((route.endpoint,) if route.endpoint else ())]
            tried += self.avoid
            nxt = server.router.retry_route(ex.head, ex.conn.peer, route, tried)
            if nxt.pool is None or nxt.endpoint is None or nxt.endpoint in tried:
                why = NO_OTHER_ENDPOINT
        if not why and not res.admit_retry():
            why = OVERFLOW
        if why or nxt is None:
            self.state = DONE
            self.hedging.refuse(why or ANSWERED)
            return
        if res.budget is not None:
            res.budget.spend(now)
        self.hedging.sent += 1
        ex.attempt += 1
        self.route = nxt
        self.start = now
        ep, tracker = nxt.endpoint, nxt.tracker
        if ep is not None and tracker is not None:
            tracker.on_start(ep, now)
        ds = nxt.dstats
        if ds is not None:
            ds.attempts += 1
        head = ex.request_bytes
        self.data = [b"%sx-tether-attempt: %d\r\n\r\n" % (head[:-2], ex.attempt)]
        trace = _trace_of(ex)
        if trace is not None:  # its own client span; its context goes into its head
            self.data[0], self.span = trace.hedge_start(ex, self.data[0], nxt)
        if ex.replay:
            self.data.extend(ex.replay)
        pool = nxt.pool
        assert pool is not None
        self.state = PENDING
        try:
            up = pool.acquire(self)
        except PoolOverflowError as e:
            self._failed(outcomes.local(outcomes.LocalReply, local_reply.OVERFLOW, 503), str(e))
            return
        if up is not None:
            self._attach(up)

    def _attach(self, up: UpstreamConnection) -> None:
        self.state = SENT
        self.up = up
        up.bind(self, self.ex.head.method == b"HEAD")
        up.transport.writelines(self.data)
        self.data = []

    # -- the pool's answers ------------------------------------------------------------

    def on_upstream_ready(self, up: UpstreamConnection) -> None:
        if self.state != PENDING:
            up.pool.release(up, self.ex.server.clock())
            return
        self._attach(up)

    def on_upstream_failed(self, reason: str, message: str) -> None:
        if self.state != PENDING:
            return
        code = local_reply.REPLIES.get(reason, (502, ""))[0]
        failed = outcomes.local(outcomes.ConnectFailure, reason, code)
        route = self.route
        if not self.sole and not self.avoid and route is not None and route.endpoint is not None:
            # Nothing reached an application (a dead instance the registry still lists):
            # the hedge goes once more, elsewhere, while the first attempt waits.
            self._end_attempt(failed, self.ex.server.clock())
            self.avoid.append(route.endpoint)
            self.route = None
            self.state = ARMED
            self.fire()
            return
        self._failed(failed, message)

    # -- the connection's events (its codec's sink until the race is decided) ------------

    def on_response_head(self, rhead: ResponseHead) -> None:
        if self.won:
            self.ex.on_response_head(rhead)  # type: ignore[attr-defined]
            return
        ex = self.ex
        up = self.up
        if self.state != SENT or up is None:
            return
        if ex.state not in (CONNECTING, SENDING):
            self.cancel()  # the exchange's own head came first
            return
        self._win(up)
        ex.on_response_head(rhead)  # type: ignore[attr-defined]

    def on_informational(self, rhead: ResponseHead) -> None:
        if self.won:
            self.ex.on_informational(rhead)  # type: ignore[attr-defined]

    def on_response_body(self, data: bytes) -> None:
        if self.won:  # the rest of the chunk that carried the winning head
            self.ex.on_response_body(data)  # type: ignore[attr-defined]

    def on_response_end(self, trailers: Fields | None) -> None:
        if self.won:
            self.ex.on_response_end(trailers)  # type: ignore[attr-defined]

    def on_upstream_switched(self, up: UpstreamConnection, rest: bytes) -> None:
        if self.won:
            self.ex.on_upstream_switched(up, rest)  # type: ignore[attr-defined]
        else:
            up.abort()

    def on_upstream_lost(self, up: UpstreamConnection, reason: str, message: str) -> None:
        if self.won:
            self.ex.on_upstream_lost(up, reason, message)  # type: ignore[attr-defined]
            return
        if self.state == SENT and up is self.up:
            self.up = None
            up.unbind()
            self._failed(outcomes.local(outcomes.Reset, reason, 502), message)

    def flush(self) -> None:
        if self.won or self.sole:
            self.ex.flush()  # type: ignore[attr-defined]

    def set_pause(self, bit: int) -> None:
        if self.won:
            self.ex.set_pause(bit)  # type: ignore[attr-defined]

    def clear_pause(self, bit: int) -> None:
        if self.won:
            self.ex.clear_pause(bit)  # type: ignore[attr-defined]

    # -- the race's ends -------------------------------------------------------------------

    def _win(self, up: UpstreamConnection) -> None:
        """The hedge's head came first: the exchange takes over its attempt."""
        ex = self.ex
        now = ex.server.clock()
        self.won = True
        self.state = DONE
        self.hedging.won += 1
        self.hedging.observe(now - ex.start)
        route = self.route
        assert route is not None
        ex._hedge_won(route, up, self.start, now)
        self._adopt_span()

    def _adopt_span(self) -> None:
        """The exchange takes this attempt over: its span too."""
        span, trace = self.span, _trace_of(self.ex)
        self.span = None
        if span is not None and trace is not None:
            trace.hedge_adopt(span)

    def _failed(self, failed: Outcome, message: str) -> None:
        """The hedged attempt failed: its end is told and the exchange goes on alone;
        if its own attempt had already failed, the exchange takes this failure over as
        its own attempt's (retried as one, or the request's answer)."""
        self.state = DONE
        ex = self.ex
        ex._hedge_done(self)
        route = self.route
        if self.sole and ex.state != ENDED and route is not None:
            self._adopt_span()
            ex._hedge_failed_alone(route, self.start, failed, message)
            ex.conn.flush()
            return
        self._end_attempt(failed, ex.server.clock())

    def _end_attempt(self, outcome: Outcome, now: float) -> None:
        span, trace = self.span, _trace_of(self.ex)
        if span is not None and trace is not None:
            self.span = None
            trace.hedge_end(span, outcome.reason)
        route = self.route
        if route is None:
            return
        ep, tracker = route.endpoint, route.tracker
        if ep is not None and tracker is not None:
            tracker.on_end(ep, now, now - self.start, outcome.ok)
        res = self.res
        res.retry_done()
        detector, cluster = res.outlier, res.cluster
        if detector is not None and ep is not None and cluster is not None:
            detector.observe(ep, classify(outcome.kind, outcome.status), now, cluster.endpoints)

    def cancel(self) -> None:
        """The exchange answered or ended first: stop the hedge where it is."""
        state = self.state
        if state == DONE:
            return
        self.state = DONE
        ex = self.ex
        if self.hedging.spec.percentile:  # a static delay keeps no latencies
            self.hedging.observe(ex.server.clock() - ex.start)
        timer = self.timer
        if timer is not None:
            self.timer = None
            timer.cancel()
        if state == ARMED:
            return
        if state == PENDING and self.route is not None and self.route.pool is not None:
            self.route.pool.cancel(self)
        up = self.up
        if up is not None:
            self.up = None
            up.unbind()
            up.abort()  # never pooled mid-response
        self._end_attempt(
            outcomes.local(outcomes.LocalReply, HEDGE_LOST, 0), self.ex.server.clock()
        )

    def __repr__(self) -> str:
        state = ("armed", "pending", "sent", "done")[self.state]
        return f"<Hedge {state} won={self.won}>"
