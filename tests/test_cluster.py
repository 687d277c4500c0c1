"""Cluster membership: state kept across updates, and slow start's `added_at` stamps."""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from typing import Any

from proxy.balance import (
    Endpoint,
    LoadBalancerPolicy,
    PickContext,
    SlowStartPolicy,
    build_balancer,
)
from proxy.cluster import Cluster
from proxy.discovery import ConsulDirectory


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


async def test_an_instance_registered_later_ramps_up_through_discovery(consul_client: Any) -> None:
    policy = LoadBalancerPolicy(policy="round_robin", slow_start=SlowStartPolicy(window=60.0))
    directory = ConsulDirectory(
        consul_client,
        wait=5.0,
        rng=random.Random(6),
        balancer_factory=lambda: build_balancer(policy),
    )
    try:
        for i in (1, 2):
            await register(consul_client, f"web-{i}", 9400 + i)
        cluster = await directory.resolve("default", "web")
        assert cluster is not None and len(cluster.endpoints) == 2
        await register(consul_client, "web-3", 9403)
        deadline = time.monotonic() + 5
        while len(cluster.endpoints) < 3:
            assert time.monotonic() < deadline, "web-3 not discovered"
            await asyncio.sleep(0.01)
        added = {ep.id: ep.added_at for ep in cluster.endpoints}
        assert added["web-1"] == added["web-2"] == 0.0 and added["web-3"] > 0
        # Seconds into a 60 s window: the 10% floor, about 0.1 / 2.1 of the picks.
        now = time.monotonic()
        rng = random.Random(7)
        picks = Counter(cluster.balancer.pick(PickContext(), now, rng).id for _ in range(2000))
        assert picks["web-3"] < 0.10 * 2000, picks
        assert picks["web-1"] > 0.4 * 2000 and picks["web-2"] > 0.4 * 2000, picks
        # After the window it has its full share.
        later = Counter(cluster.balancer.pick(PickContext(), now + 61, rng).id for _ in range(3000))
        assert 900 <= later["web-3"] <= 1100, later
    finally:
        await directory.aclose()


async def register(c: Any, sid: str, port: int) -> None:
    check = {"CheckID": f"ttl:{sid}", "Name": "ttl", "TTL": "600s", "Status": "passing"}
    assert await c.agent.service.register(
        "web", service_id=sid, address="127.0.0.1", port=port, check=check
    )
