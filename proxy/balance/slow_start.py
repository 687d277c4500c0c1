"""Slow start: a new endpoint's weight ramps up over a window (Envoy's slow_start_config).

A freshly started instance has cold caches, JIT and connection pools; sending it its
full share at once makes its first seconds slow for everyone. For `window` seconds
after `Endpoint.added_at` its weight is scaled by

    max(min_weight_percent / 100, (elapsed / window) ** (1 / aggression))

exactly as Envoy computes it. Endpoints present when a cluster is first built carry
`added_at = 0.0`, which means "from the start": they never ramp. Discovery stamps
`added_at` (the monotonic clock the proxy passes as `now`) only on instances that join
later.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from proxy.balance.base import Endpoint
from wire.resources import SlowStartPolicy

__all__ = ["SlowStart", "SlowStartPolicy", "ramp"]


def ramp(policy: SlowStartPolicy | None) -> SlowStart | None:
    """The ramp for a balancer, or None when the policy does not ramp."""
    return SlowStart(policy) if policy is not None and policy.window > 0 else None


class SlowStart:
    """The ramp of one balancer, made from the schema's `SlowStartPolicy` (validated by
    the schema's checks) by `ramp()`."""

    __slots__ = ("aggression", "min_weight_percent", "window")

    def __init__(self, policy: SlowStartPolicy) -> None:
        self.window = float(policy.window)
        self.aggression = float(policy.aggression)
        self.min_weight_percent = float(policy.min_weight_percent)

    def factor(self, added_at: float, now: float) -> float:
        """The weight multiplier in (0, 1] of an endpoint added at `added_at`."""
        elapsed = now - added_at
        if self.window <= 0 or elapsed >= self.window:
            return 1.0
        # Envoy counts at least 1 ms, so a just-added endpoint is not weightless.
        ramp = math.pow(max(elapsed, 0.001) / self.window, 1.0 / self.aggression)
        return max(self.min_weight_percent / 100.0, ramp)

    def weight(self, ep: Endpoint, now: float) -> float:
        if ep.added_at <= 0 or now - ep.added_at >= self.window:
            return float(ep.weight)
        return ep.weight * self.factor(ep.added_at, now)

    def ramp_ends(self, endpoints: Iterable[Endpoint]) -> float:
        """When the last endpoint leaves slow start (-inf when none is ramping)."""
        if self.window <= 0:
            return float("-inf")
        return max(
            (ep.added_at + self.window for ep in endpoints if ep.added_at > 0),
            default=float("-inf"),
        )
