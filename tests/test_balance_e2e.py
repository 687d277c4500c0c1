"""The balancers on the real outbound path: registry, discovery, outbound listener, apps.

Six real HTTP apps registered in the real registry (three in the caller's zone, three in
another), discovered through `consul.aio` blocking queries, reached through the real
outbound listener with the default policy (peak-EWMA under the locality layer), given
to the directory through its `balancer_factory` argument as the sidecar does (the same
through real sidecar processes: tests/test_locality_e2e.py).
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator

import pytest

from proxy.balance import LoadBalancerPolicy, build_balancer
from registry.server import RegistryServer
from tests.polling import until
from tests.sidecar_harness import Mesh

LOCAL = "zone-a"
INSTANCES = {f"a-{i}": LOCAL for i in (1, 2, 3)} | {f"b-{i}": "zone-b" for i in (1, 2, 3)}


@pytest.fixture
async def mesh(registry: RegistryServer) -> AsyncIterator[Mesh]:
    m = await Mesh.with_registry(
        registry.port,
        "web",
        INSTANCES,
        balancer_factory=lambda: build_balancer(LoadBalancerPolicy(), local_zone=LOCAL),
        rng=random.Random(1),
    )
    try:
        yield m
    finally:
        await m.aclose()


async def test_calls_stay_in_zone_fail_over_and_come_back(mesh: Mesh) -> None:
    answered = await mesh.calls(300, "web")
    assert sum(answered.values()) == 300
    local = sum(n for who, n in answered.items() if who.startswith("a-"))
    assert local >= 0.95 * 300, answered
    assert len([who for who in answered if who.startswith("a-")]) == 3  # spread in-zone

    # The whole local zone fails its checks: discovery drops it, calls fail over.
    for name in ("a-1", "a-2", "a-3"):
        await mesh.consul.agent.check.ttl_fail(f"ttl:{name}")
    await until(lambda: mesh.zones("web") == {"zone-b"})
    answered = await mesh.calls(200, "web")
    assert set(answered) <= {"b-1", "b-2", "b-3"} and sum(answered.values()) == 200, answered

    # The zone recovers: calls come home.
    for name in ("a-1", "a-2", "a-3"):
        await mesh.consul.agent.check.ttl_pass(f"ttl:{name}")
    # Every local instance back (with one of three, the zone would rightly spill over).
    await until(lambda: mesh.healthy("web") == 6)
    answered = await mesh.calls(200, "web")
    local = sum(n for who, n in answered.items() if who.startswith("a-"))
    assert local >= 0.95 * 200, answered


async def test_peak_ewma_avoids_a_slow_instance(mesh: Mesh) -> None:
    # 150 ms rather than the suite's 50: real clocks on a loaded 2-core machine jitter
    # by tens of milliseconds, and the property must not depend on that.
    mesh.delays["a-3"] = 0.150
    answered = await mesh.calls(400, "web")
    assert sum(answered.values()) == 400 and not any(w.startswith("<") for w in answered)
    assert answered["a-3"] < 0.10 * 400, answered
    assert answered["a-1"] > 100 and answered["a-2"] > 100, answered
