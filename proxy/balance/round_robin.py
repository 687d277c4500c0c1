"""Smooth weighted round robin (nginx's algorithm), weighted by `Weights.Passing`."""

from __future__ import annotations

import random
from collections.abc import Sequence

from proxy.balance.base import Balancer, Endpoint, PickContext


class WeightedRoundRobin(Balancer):
    """Each pick adds every weight to its endpoint's score and takes the highest.

    Spreads picks evenly (weights 5:1:1 give a,a,b,a,c,a,a rather than five a then b, c).
    """

    name = "round_robin"

    def __init__(self) -> None:
        super().__init__()
        self._current: dict[int, int] = {}

    def update(self, endpoints: Sequence[Endpoint]) -> None:
        super().update(endpoints)
        keep = {id(ep) for ep in self.endpoints}
        self._current = {k: v for k, v in self._current.items() if k in keep}

    def pick(self, ctx: PickContext, now: float, rng: random.Random) -> Endpoint | None:
        best: Endpoint | None = None
        best_score = 0
        total = 0
        current = self._current
        for ep in self.endpoints:
            if not ep.available(now) or ep.weight <= 0:
                continue
            key = id(ep)
            score = current.get(key, 0) + ep.weight
            current[key] = score
            total += ep.weight
            if best is None or score > best_score:
                best, best_score = ep, score
        if best is not None:
            current[id(best)] = best_score - total
        return best
