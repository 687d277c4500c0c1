"""Load balancers: one `Balancer` contract, several algorithms, a locality layer."""

from proxy.balance.base import Balancer, Endpoint, PickContext
from proxy.balance.errors import PolicyError
from proxy.balance.hashing import HashPolicy
from proxy.balance.least_request import LeastRequest
from proxy.balance.locality import LocalityBalancer
from proxy.balance.maglev import Maglev
from proxy.balance.peak_ewma import PeakEwma
from proxy.balance.policy import POLICIES, LoadBalancerPolicy, Tuning, build_balancer
from proxy.balance.ring_hash import RingHash
from proxy.balance.round_robin import WeightedRoundRobin
from proxy.balance.slow_start import SlowStartPolicy
from proxy.balance.weighted_random import WeightedRandom

__all__ = [
    "POLICIES",
    "Balancer",
    "Endpoint",
    "HashPolicy",
    "LeastRequest",
    "LoadBalancerPolicy",
    "LocalityBalancer",
    "Maglev",
    "PeakEwma",
    "PickContext",
    "PolicyError",
    "RingHash",
    "SlowStartPolicy",
    "Tuning",
    "WeightedRandom",
    "WeightedRoundRobin",
    "build_balancer",
]
