"""Load balancers: one `Balancer` contract, several algorithms, a locality layer."""

from proxy.balance.base import Balancer, Endpoint, PickContext
from proxy.balance.round_robin import WeightedRoundRobin

__all__ = ["Balancer", "Endpoint", "PickContext", "WeightedRoundRobin"]
