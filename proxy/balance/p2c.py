"""Power of two choices over a load metric: the skeleton of the load-aware balancers.

A pick draws two distinct available endpoints at random and takes the one with the
lower cost (ties go to the first drawn, so equal costs split evenly). That avoids the
herd a full scan for the minimum causes when many callers share stale views, and costs
two cost evaluations instead of n (Mitzenmacher; tower's p2c, Envoy's least request).

Weights: while every endpoint has the same effective weight, P2C as above. When weights
differ (configured weights, or an endpoint in slow start), P2C cannot honour them (the
heavier endpoint of a pair would win every tie), so, as Envoy's least-request balancer
does, picks go through an EDF scheduler over `weight / cost ** bias`: proportional to
weight when costs are equal, shifted away from costlier endpoints.

Subclasses define `cost(ep, now)` (>= 0; lower is better).
"""

from __future__ import annotations

import math
import random
from abc import abstractmethod
from collections.abc import Sequence

from proxy.balance.base import Balancer, Endpoint, PickContext
from proxy.balance.edf import EdfScheduler
from proxy.balance.slow_start import SlowStartPolicy, ramp

# Random draws before falling back to scanning for the available endpoints.
_DRAWS = 4


class P2cBalancer(Balancer):
    def __init__(
        self,
        slow_start: SlowStartPolicy | None = None,
        choice_count: int = 2,
        bias: float = 1.0,
    ) -> None:
        super().__init__()
        self.slow_start = ramp(slow_start)
        self.choice_count = max(2, choice_count)
        self.bias = bias
        self._pool: tuple[Endpoint, ...] = ()
        self._weighted = False
        self._ramp_ends = float("-inf")
        self._draw_from = float("inf")
        self._edf = EdfScheduler()
        self._edf_now = 0.0
        self._edf_stale = True

    @abstractmethod
    def cost(self, ep: Endpoint, now: float) -> float: ...

    def update(self, endpoints: Sequence[Endpoint]) -> None:
        super().update(endpoints)
        self._pool = tuple(ep for ep in self.endpoints if ep.weight > 0)
        self._weighted = len({ep.weight for ep in self._pool}) > 1
        if self.slow_start is not None:
            self._ramp_ends = self.slow_start.ramp_ends(self._pool)
        # From when a pick may take the plain two-choice draw (a subclass's fast path
        # tests this one number): never while weights differ or with fewer than two.
        plain = not self._weighted and len(self._pool) >= 2 and self.choice_count == 2
        self._draw_from = self._ramp_ends if plain else float("inf")
        # Rebuilt at the next weighted pick, which knows the time the costs need.
        self._edf_stale = True

    def pick(self, ctx: PickContext, now: float, rng: random.Random) -> Endpoint | None:
        if self._weighted or now < self._ramp_ends:
            return self._pick_weighted(now)
        return self._pick_drawn(now, rng, _DRAWS)

    def _pick_drawn(self, now: float, rng: random.Random, draws: int) -> Endpoint | None:
        """Up to `draws` random pairs, the cheaper available one of the first pair with
        one available; then (or with fewer than two endpoints) `_pick_scan`."""
        pool = self._pool
        n = len(pool)
        if n >= 2 and self.choice_count == 2:
            rand = rng.random
            for _ in range(draws):
                # random() * n rather than randrange(n): a third of the cost, and the
                # bias (n / 2**53) is far below anything a balancer could notice.
                i = int(rand() * n)
                j = int(rand() * (n - 1))
                if j >= i:
                    j += 1
                a, b = pool[i], pool[j]
                # Endpoint.available inlined: this is the per-request path.
                if a.healthy and not a.draining and now >= a.ejected_until:
                    if b.healthy and not b.draining and now >= b.ejected_until:
                        return b if self.cost(b, now) < self.cost(a, now) else a
                    return a
                if b.healthy and not b.draining and now >= b.ejected_until:
                    return b
        return self._pick_scan(now, rng)

    def _pick_weighted(self, now: float) -> Endpoint | None:
        """The EDF pick over `weight / cost ** bias` (weights differ or slow start)."""
        # The scheduler's weight callback reads the clock through this attribute,
        # which keeps its signature free of per-pick closures.
        self._edf_now = now
        if self._edf_stale:
            self._edf.reset(self._pool, self._edf_weight)
            self._edf_stale = False
        return self._edf.pick(self._edf_weight, lambda ep: ep.available(now))

    def _pick_scan(self, now: float, rng: random.Random) -> Endpoint | None:
        """The pick when the random draws found nothing: sample the available ones."""
        candidates = [ep for ep in self._pool if ep.available(now)]
        if len(candidates) <= 1:
            return candidates[0] if candidates else None
        drawn = rng.sample(candidates, min(self.choice_count, len(candidates)))
        best = drawn[0]
        best_cost = self.cost(best, now)
        for ep in drawn[1:]:
            c = self.cost(ep, now)
            if c < best_cost:
                best, best_cost = ep, c
        return best

    def _edf_weight(self, ep: Endpoint) -> float:
        now = self._edf_now
        ramp = self.slow_start
        weight = ramp.weight(ep, now) if ramp is not None else float(ep.weight)
        if self.bias == 0:
            return weight
        cost = max(self.cost(ep, now), 1e-9)
        return weight / (cost if self.bias == 1.0 else math.pow(cost, self.bias))
