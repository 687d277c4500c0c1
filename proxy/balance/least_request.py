"""Least request (Envoy's LEAST_REQUEST): fewest requests in flight, by two random choices.

Equal weights: of two distinct random endpoints, the one with fewer active requests.
Unequal weights: EDF over `weight / (active + 1) ** active_request_bias`, as Envoy does
(bias 0 is plain weighted round robin; 1.0, the default, divides by the load).
"""

from __future__ import annotations

from proxy.balance.base import Endpoint
from proxy.balance.p2c import P2cBalancer
from proxy.balance.slow_start import SlowStartPolicy


class LeastRequest(P2cBalancer):
    name = "least_request"

    def __init__(
        self,
        choice_count: int = 2,
        active_request_bias: float = 1.0,
        slow_start: SlowStartPolicy | None = None,
    ) -> None:
        super().__init__(slow_start, choice_count, active_request_bias)

    def cost(self, ep: Endpoint, now: float) -> float:
        return ep.active + 1.0
