"""The load-balancer policy of a cluster, and `build_balancer`, which turns it into one.

The policy is the schema's own `LoadBalancerPolicy` (`ServiceDefaults.spec.loadBalancer`,
wire/resources.py), validated there (`check_resource`, run by the control plane before
storing and by the sidecar before applying a snapshot); `build_balancer(policy,
local_zone)` builds the balancer, under the locality layer when the caller's zone is
known.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from proxy.balance.base import Balancer
from proxy.balance.errors import PolicyError
from proxy.balance.least_request import LeastRequest
from proxy.balance.locality import LocalityBalancer
from proxy.balance.maglev import Maglev
from proxy.balance.peak_ewma import PeakEwma
from proxy.balance.ring_hash import RingHash
from proxy.balance.round_robin import WeightedRoundRobin
from proxy.balance.weighted_random import WeightedRandom
from wire.resources import LoadBalancerPolicy

__all__ = [
    "HASHING",
    "POLICIES",
    "LoadBalancerPolicy",
    "Tuning",
    "balancer_maker",
    "build_balancer",
]

POLICIES = ("peak_ewma", "round_robin", "random", "least_request", "ring_hash", "maglev")
HASHING = ("ring_hash", "maglev")


@dataclass(frozen=True)
class Tuning:
    """Constants of the balancers that the policy does not expose (tests and benchmarks
    vary them)."""

    # least_request: how much active requests weigh against an endpoint's weight.
    active_request_bias: float = 1.0
    # peak_ewma: time constant of the RTT average (s), and a new endpoint's estimate (s).
    ewma_decay: float = 3.0
    ewma_default_rtt: float = 0.030


TUNING = Tuning()


def balancer_maker(policy: LoadBalancerPolicy, tuning: Tuning = TUNING) -> Callable[[], Balancer]:
    """A constructor of the bare balancer the policy names (no locality layer)."""
    ss = policy.slow_start
    name = policy.policy
    if name == "peak_ewma":
        return lambda: PeakEwma(tuning.ewma_decay, tuning.ewma_default_rtt, ss)
    if name == "round_robin":
        return lambda: WeightedRoundRobin(ss)
    if name == "random":
        return lambda: WeightedRandom(ss)
    if name == "least_request":
        return lambda: LeastRequest(policy.choice_count, tuning.active_request_bias, ss)
    if name == "ring_hash":
        return lambda: RingHash(policy.hash_policies, policy.ring_size, policy.max_ring_size)
    if name == "maglev":
        return lambda: Maglev(policy.hash_policies, policy.table_size)
    raise PolicyError("policy", f"must be one of {', '.join(POLICIES)}")


def build_balancer(
    policy: LoadBalancerPolicy | None = None, local_zone: str = "", tuning: Tuning = TUNING
) -> Balancer:
    """The balancer for a cluster; `local_zone` is the sidecar's own zone ("" = unknown)."""
    policy = policy or LoadBalancerPolicy()
    make = balancer_maker(policy, tuning)
    if policy.locality and local_zone:
        return LocalityBalancer(make, local_zone, policy.locality_threshold)
    return make()
