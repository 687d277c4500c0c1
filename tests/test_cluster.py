"""Cluster membership: state kept across updates, and slow start's `added_at` stamps."""

from __future__ import annotations

import random
from collections import Counter

from proxy.balance import (
    Endpoint,
    LoadBalancerPolicy,
    PickContext,
    SlowStartPolicy,
    build_balancer,
)
from proxy.cluster import Cluster


class Clock:
    def __init__(self, now: float = 100.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def eps(*ids: str, healthy: bool = True) -> list[Endpoint]:
    return [Endpoint(i, "127.0.0.1", 9000 + n, healthy=healthy) for n, i in enumerate(ids)]


def test_first_membership_is_not_stamped_later_joins_are() -> None:
    clock = Clock()
    cluster = Cluster("web", "default", clock=clock)
    cluster.set_endpoints(eps("a", "b"))
    assert [ep.added_at for ep in cluster.endpoints] == [0.0, 0.0]
    clock.now = 150.0
    cluster.set_endpoints(eps("a", "b", "c"))
    added = {ep.id: ep.added_at for ep in cluster.endpoints}
    assert added == {"a": 0.0, "b": 0.0, "c": 150.0}
    # A member coming back to health ramps again (Envoy does the same); one that stays
    # healthy keeps its stamp.
    clock.now = 160.0
    cluster.set_endpoints([*eps("a"), *eps("b", healthy=False), *eps("c")])
    clock.now = 170.0
    cluster.set_endpoints(eps("a", "b", "c"))
    added = {ep.id: ep.added_at for ep in cluster.endpoints}
    assert added == {"a": 0.0, "b": 170.0, "c": 150.0}


def test_a_joining_endpoint_ramps_under_slow_start() -> None:
    clock = Clock(1000.0)
    policy = LoadBalancerPolicy(policy="round_robin", slow_start=SlowStartPolicy(window=10.0))
    cluster = Cluster("web", "default", build_balancer(policy), clock=clock)
    cluster.set_endpoints(eps("a", "b"))
    cluster.set_endpoints(eps("a", "b", "new"))
    rng = random.Random(4)

    def share(now: float, n: int = 3000) -> float:
        picks = Counter(cluster.balancer.pick(PickContext(), now, rng).id for _ in range(n))
        return picks["new"] / n

    # Just joined: the 10% floor of its weight, so about 0.1 / 2.1 of the picks.
    assert share(1000.01) < 0.08
    # Half way: about 0.5 / 2.5 = 20%; after the window a full third.
    assert 0.15 < share(1005.0) < 0.25
    assert 0.30 < share(1011.0) < 0.37
