"""The resilience of one destination: its retry policy and budget, breakers and detector.

`Resilience` is what a `RouteResult` carries for the exchange (proxy/exchange.py) to
drive retries, circuit breaking and outlier detection for one request: the compiled
retry policy (proxy/retry.py) and the destination's retry budget, the service's breaker
and a Route rule's own (proxy/circuit_breaker.py), and the cluster's outlier detector
(proxy/balance/outlier.py). None of it is looked up per request: the router makes one
`Resilience` per (service, spec) and per (rule, spec) when a snapshot's specs first
reach it, and shares it between requests.

`ResilienceState` keeps the runtime halves (budgets, breakers, detectors) across
snapshots, so an unrelated policy change does not reset a budget or forget an ejection.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import TYPE_CHECKING

from proxy import retry as retries
from proxy.balance.outlier import OutlierDetector, OutlierSpec
from proxy.circuit_breaker import Breaker, Breakers, CircuitBreakerSpec
from proxy.hedging import HedgeSpec, Hedging
from proxy.local_reply import UPSTREAM_CONNECT_TIMEOUT
from proxy.retry import DEFAULT as DEFAULT_RETRY
from proxy.retry import RetryBudget, RetrySpec

if TYPE_CHECKING:
    from proxy.balance import Endpoint
    from proxy.cluster import Cluster
    from proxy.route_result import RouteResult


class Resilience:
    __slots__ = (
        "breaker",
        "budget",
        "cluster",
        "hedging",
        "name",
        "outlier",
        "retry",
        "rule_breaker",
    )

    def __init__(
        self,
        name: str,
        cluster: Cluster | None,
        retry: RetrySpec | None = None,
        budget: RetryBudget | None = None,
        breaker: Breaker | None = None,
        rule_breaker: Breaker | None = None,
        outlier: OutlierDetector | None = None,
        hedging: Hedging | None = None,
    ) -> None:
        self.name = name
        # Where a retry picks another endpoint (and the detector's endpoint set).
        self.cluster = cluster
        self.retry = retry
        self.budget = budget
        self.breaker = breaker
        self.rule_breaker = rule_breaker
        self.outlier = outlier
        # Hedged requests (proxy/hedging.py); None: none.
        self.hedging = hedging

    def admit(self) -> Breaker | None:
        """Take a request slot in every breaker; the breaker that refused, or None."""
        b = self.breaker
        if b is not None and not b.admit():
            return b
        rb = self.rule_breaker
        if rb is not None and not rb.admit():
            if b is not None:
                b.done()
            return rb
        return None

    def release(self) -> None:
        b = self.breaker
        if b is not None:
            b.done()
        rb = self.rule_breaker
        if rb is not None:
            rb.done()

    def admit_retry(self) -> bool:
        b = self.breaker
        if b is not None and not b.admit_retry():
            return False
        rb = self.rule_breaker
        if rb is not None and not rb.admit_retry():
            if b is not None:
                b.retry_done()
            return False
        return True

    def retry_refusal(
        self,
        spec: RetrySpec,
        attempt: int,
        method: bytes,
        replayable: bool,
        now: float,
        refused: bool,
        reason: str,
        route: RouteResult,
        tried: Collection[Endpoint],
    ) -> str:
        """Why the failed attempt `attempt` (its local-reply `reason`) is not sent again,
        counted on the route's stats; "" when it may be, its retry slot taken. One
        decision for the HTTP/1 exchange and HTTP/2 streams."""
        budget = self.budget
        assert budget is not None
        why = retries.may_retry(spec, attempt, method, replayable, budget, now, refused)
        if not why and reason == UPSTREAM_CONNECT_TIMEOUT and not self.untried(route, tried, now):
            why = retries.NO_OTHER_ENDPOINT  # a second timeout on the same endpoint is likely
        if not why and not self.admit_retry():
            why = retries.OVERFLOW
        ds = route.dstats
        if why and ds is not None:
            ds.retries_refused[why] = ds.retries_refused.get(why, 0) + 1
        return why

    def untried(self, route: RouteResult, tried: Collection[Endpoint], now: float) -> bool:
        """Whether the cluster has an available endpoint the request has not tried."""
        cluster = self.cluster
        if cluster is None:
            return False
        return any(
            ep is not route.endpoint and ep not in tried and ep.available(now)
            for ep in cluster.endpoints
        )

    def retry_done(self) -> None:
        b = self.breaker
        if b is not None:
            b.retry_done()
        rb = self.rule_breaker
        if rb is not None:
            rb.retry_done()

    def __repr__(self) -> str:
        return (
            f"<Resilience {self.name} retry={self.retry is not None} "
            f"breaker={self.breaker!r} outlier={self.outlier is not None}>"
        )


class ResilienceState:
    """Budgets, breakers and detectors by owner, kept across snapshots."""

    def __init__(self) -> None:
        self.breakers = Breakers()
        self._budgets: dict[tuple[str, ...], RetryBudget] = {}
        self._detectors: dict[tuple[str, str], OutlierDetector] = {}
        self._hedgings: dict[tuple[str, ...], Hedging] = {}

    def budget(self, key: tuple[str, ...], spec: RetrySpec) -> RetryBudget:
        b = self._budgets.get(key)
        if b is None or (b.ratio, b.window, b.min_per_second) != (
            spec.budget_ratio,
            spec.budget_window,
            spec.budget_min_per_second,
        ):
            b = self._budgets[key] = RetryBudget.of(spec)
        return b

    def detector(self, key: tuple[str, str], spec: OutlierSpec, name: str) -> OutlierDetector:
        d = self._detectors.get(key)
        if d is None:
            d = self._detectors[key] = OutlierDetector(spec, name)
        else:
            d.spec = spec
        return d

    def detectors(self) -> dict[tuple[str, str], OutlierDetector]:
        return self._detectors

    def hedging(self, key: tuple[str, ...], spec: HedgeSpec, name: str) -> Hedging:
        h = self._hedgings.get(key)
        if h is None:
            h = self._hedgings[key] = Hedging(spec, name)
        else:
            h.spec = spec
        return h

    def hedgings(self) -> dict[tuple[str, ...], Hedging]:
        return self._hedgings

    def make(
        self,
        key: tuple[str, str],
        cluster: Cluster,
        retry: RetrySpec | None,
        breaker: CircuitBreakerSpec | None,
        outlier: OutlierSpec | None,
        hedge: HedgeSpec | None = None,
    ) -> Resilience | None:
        """A service's Resilience (None when it has none of the four)."""
        if retry is not None and retry.attempts <= 1 and not retry.per_try_timeout:
            retry = None  # retries off: nothing kept per request for them
        if retry is None and breaker is None and outlier is None and hedge is None:
            return None
        budget = retry or (DEFAULT_RETRY if hedge is not None else None)
        return Resilience(
            cluster.name,
            cluster,
            retry,
            # Hedges spend the retry budget (the default one when retries are off).
            self.budget(key, budget) if budget is not None else None,
            self.breakers.get(key, breaker) if breaker is not None else None,
            None,
            self.detector(key, outlier, cluster.name) if outlier is not None else None,
            self.hedging(key, hedge, cluster.name) if hedge is not None else None,
        )

    def for_rule(
        self,
        base: Resilience | None,
        cluster: Cluster,
        rule_key: tuple[str, ...],
        retry: RetrySpec | None,
        breaker: CircuitBreakerSpec | None,
        hedge: HedgeSpec | None = None,
    ) -> Resilience:
        """A Route rule's: its own retries (and budget) over the service's, its own
        breaker beside the service's, its own hedging over the service's."""
        r = Resilience(cluster.name, cluster)
        if base is not None:
            r.retry, r.budget = base.retry, base.budget
            r.breaker, r.outlier = base.breaker, base.outlier
            r.hedging = base.hedging
        if retry is not None:
            r.retry, r.budget = retry, self.budget(rule_key, retry)
        if breaker is not None:
            r.rule_breaker = self.breakers.get(rule_key, breaker)
        if hedge is not None:
            r.hedging = self.hedging(rule_key, hedge, cluster.name)
            if r.budget is None:
                r.budget = self.budget(rule_key, DEFAULT_RETRY)
        return r
