"""Smooth weighted round robin (nginx's algorithm), weighted by `Weights.Passing`."""

from __future__ import annotations

import random
from collections.abc import Sequence

from proxy.balance.base import Balancer, Endpoint, PickContext
from proxy.balance.slow_start import SlowStartPolicy


class WeightedRoundRobin(Balancer):
    """Each pick adds every weight to its endpoint's score and takes the highest.

    Spreads picks evenly (weights 5:1:1 give a,a,b,a,c,a,a rather than five a then b, c).
    With a slow-start policy, an endpoint that joined less than `window` ago counts with
    its ramped weight.
    """

    name = "round_robin"

    def __init__(self, slow_start: SlowStartPolicy | None = None) -> None:
        super().__init__()
        self._current: dict[int, float] = {}
        self.slow_start = slow_start if slow_start is not None and slow_start.enabled else None
        self._ramp_ends = float("-inf")

    def update(self, endpoints: Sequence[Endpoint]) -> None:
        super().update(endpoints)
        keep = {id(ep) for ep in self.endpoints}
        self._current = {k: v for k, v in self._current.items() if k in keep}
        if self.slow_start is not None:
            self._ramp_ends = self.slow_start.ramp_ends(self.endpoints)

    def pick(self, ctx: PickContext, now: float, rng: random.Random) -> Endpoint | None:
        best: Endpoint | None = None
        best_score = 0.0
        total = 0.0
        current = self._current
        ramp = self.slow_start if now < self._ramp_ends else None
        for ep in self.endpoints:
            if not ep.available(now) or ep.weight <= 0:
                continue
            weight = ep.weight if ramp is None else ramp.weight(ep, now)
            key = id(ep)
            score = current.get(key, 0) + weight
            current[key] = score
            total += weight
            if best is None or score > best_score:
                best, best_score = ep, score
        if best is not None:
            current[id(best)] = best_score - total
        return best
