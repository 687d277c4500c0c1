"""Weighted random: each pick draws an endpoint with probability proportional to weight."""

from __future__ import annotations

import random
from bisect import bisect_right
from collections.abc import Sequence
from itertools import accumulate

from proxy.balance.base import Balancer, Endpoint, PickContext
from proxy.balance.slow_start import SlowStartPolicy, ramp

# Redraws before falling back to a scan of the available endpoints. Rejecting an
# unavailable draw and redrawing keeps the distribution exact over the available ones.
_REDRAWS = 4


class WeightedRandom(Balancer):
    """Draws by bisecting cumulative weights computed once per membership change."""

    name = "random"

    def __init__(self, slow_start: SlowStartPolicy | None = None) -> None:
        super().__init__()
        self.slow_start = ramp(slow_start)
        self._ramp_ends = float("-inf")
        self._pool: tuple[Endpoint, ...] = ()
        self._cumulative: list[float] = []
        self._total = 0.0

    def update(self, endpoints: Sequence[Endpoint]) -> None:
        super().update(endpoints)
        self._pool = tuple(ep for ep in self.endpoints if ep.weight > 0)
        self._cumulative = list(accumulate(float(ep.weight) for ep in self._pool))
        self._total = self._cumulative[-1] if self._cumulative else 0.0
        if self.slow_start is not None:
            self._ramp_ends = self.slow_start.ramp_ends(self._pool)

    def pick(self, ctx: PickContext, now: float, rng: random.Random) -> Endpoint | None:
        pool = self._pool
        if not pool:
            return None
        if now >= self._ramp_ends:
            cumulative, total = self._cumulative, self._total
            last = len(pool) - 1
            for _ in range(_REDRAWS):
                # min(): random() * total can round up to total itself.
                ep = pool[min(bisect_right(cumulative, rng.random() * total), last)]
                if ep.available(now):
                    return ep
        return self._scan(now, rng)

    def _scan(self, now: float, rng: random.Random) -> Endpoint | None:
        ramp = self.slow_start if now < self._ramp_ends else None
        candidates = [ep for ep in self._pool if ep.available(now)]
        if not candidates:
            return None
        if ramp is None:
            weights = [float(ep.weight) for ep in candidates]
        else:
            weights = [ramp.weight(ep, now) for ep in candidates]
        return rng.choices(candidates, weights)[0]
