"""Earliest-deadline-first scheduling over changing weights (Envoy's EdfScheduler).

Each entry waits for a virtual deadline; a pick takes the earliest, advances the
virtual clock to it, and re-queues the entry `1 / weight` later, its weight read afresh.
Over time each entry is picked in proportion to its weight, deterministically, in
O(log n) per pick. Weights that change between picks (in-flight requests, slow start,
latency) take effect at the entry's next turn, as in Envoy.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Sequence

from proxy.balance.base import Endpoint


class EdfScheduler:
    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Endpoint]] = []

    def reset(
        self,
        entries: Sequence[Endpoint],
        weight: Callable[[Endpoint], float],
        half_period: bool = False,
    ) -> None:
        """Start over with `entries`; those whose weight is not > 0 are left out.

        `half_period` puts each entry's first turn half its period in, which spreads
        the heavy entries' turns around the light ones' (round robin wants that).
        """
        first = 0.5 if half_period else 1.0
        heap: list[tuple[float, int, Endpoint]] = []
        for seq, ep in enumerate(entries):
            w = weight(ep)
            if w > 0:
                heap.append((first / w, seq, ep))
        heapq.heapify(heap)
        self._heap = heap

    def pick(
        self, weight: Callable[[Endpoint], float], accept: Callable[[Endpoint], bool]
    ) -> Endpoint | None:
        """The earliest entry that `accept`s, or None when none does."""
        heap = self._heap
        refused: list[tuple[float, int, Endpoint]] = []
        found: Endpoint | None = None
        now = 0.0
        while heap:
            deadline, seq, ep = heapq.heappop(heap)
            now = deadline
            if accept(ep):
                found = ep
                heapq.heappush(heap, (deadline + _period(weight(ep)), seq, ep))
                break
            refused.append((deadline, seq, ep))
        # A refused (unavailable) entry waits a full period from the virtual time of
        # this pick: it earns no credit while out, so it cannot burst when it is back.
        for deadline, seq, ep in refused:
            heapq.heappush(heap, (max(deadline, now) + _period(weight(ep)), seq, ep))
        return found

    def __len__(self) -> int:
        return len(self._heap)


def _period(weight: float) -> float:
    return 1.0 / weight if weight > 0 else 1e9
