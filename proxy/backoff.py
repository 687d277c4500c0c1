"""Exponential backoff with jitter, for retrying calls to the registry.

Pure: the random source is an argument, so a test replays the same delays. "Equal
jitter": half of the exponential step is fixed and half random, so a fleet of sidecars
spreads its retries without ever retrying in a tight loop.
"""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class BackoffPolicy:
    """Delays grow from `base` by `factor` per failed attempt, up to `cap` seconds."""

    base: float = 0.1
    factor: float = 2.0
    cap: float = 5.0

    def delay(self, attempt: int, rng: random.Random) -> float:
        """Seconds to wait before retry number `attempt` (0 for the first retry)."""
        step = min(self.cap, self.base * self.factor ** min(attempt, 64))
        return step / 2 + rng.uniform(0, step / 2)
