"""The balancers on the real outbound path: registry, discovery, outbound listener, apps.

Six real HTTP apps registered in the real registry (three in the caller's zone, three in
another), discovered through `consul.aio` blocking queries, reached through the real
outbound listener with the default policy (peak-EWMA under the locality layer), given
to the directory through its `balancer_factory` argument as the sidecar does (the same
through real sidecar processes: tests/test_locality_e2e.py).
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import consul.aio
import pytest
from aiohttp import web

from proxy.balance import LoadBalancerPolicy, build_balancer
from proxy.discovery import ConsulDirectory
from proxy.listener import Listener, start_outbound
from registry.server import RegistryServer
from tests.conftest import serve_app
from tests.polling import until

LOCAL = "zone-a"
INSTANCES = {f"a-{i}": LOCAL for i in (1, 2, 3)} | {f"b-{i}": "zone-b" for i in (1, 2, 3)}


@dataclass
class Mesh:
    consul: Any
    directory: ConsulDirectory
    outbound: Listener
    http: aiohttp.ClientSession
    delays: dict[str, float] = field(default_factory=dict)

    async def call(self, n: int, concurrency: int = 8) -> Counter[str]:
        """`n` requests to service `web` through the outbound listener; who answered."""
        answered: Counter[str] = Counter()
        todo = iter(range(n))

        async def worker() -> None:
            for _ in todo:
                async with self.http.get(
                    f"http://127.0.0.1:{self.outbound.port}/", headers={"Host": "web"}
                ) as resp:
                    body = await resp.text()
                    answered[body if resp.status == 200 else f"<{resp.status}>"] += 1

        await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(concurrency))), 60)
        return answered

    def healthy(self) -> int:
        cluster = self.directory.lookup("default", "web")
        return sum(ep.healthy for ep in cluster.endpoints) if cluster else 0

    def zones(self) -> set[str]:
        cluster = self.directory.lookup("default", "web")
        # Zones with an endpoint in rotation (failing instances stay members, unhealthy).
        return {ep.zone for ep in cluster.endpoints if ep.healthy} if cluster else set()


async def start_app(instance: str, delays: dict[str, float]) -> tuple[web.AppRunner, int]:
    async def handle(request: web.Request) -> web.Response:
        delay = delays.get(instance, 0.0)
        if delay:
            await asyncio.sleep(delay)
        return web.Response(text=instance)

    app = web.Application()
    app.router.add_get("/", handle)
    return await serve_app(app)


@pytest.fixture
async def mesh(registry: RegistryServer) -> AsyncIterator[Mesh]:
    client = consul.aio.Consul(host="127.0.0.1", port=registry.port)
    delays: dict[str, float] = {}
    apps = {name: await start_app(name, delays) for name in INSTANCES}
    for name, zone in INSTANCES.items():
        assert await client.agent.service.register(
            "web",
            service_id=name,
            address="127.0.0.1",
            port=apps[name][1],
            meta={"zone": zone},
            check={"CheckID": f"ttl:{name}", "Name": "ttl", "TTL": "600s", "Status": "passing"},
        )
    directory = ConsulDirectory(
        client,
        wait=5.0,
        rng=random.Random(1),
        balancer_factory=lambda: build_balancer(LoadBalancerPolicy(), local_zone=LOCAL),
    )
    directory.start()
    outbound = await start_outbound(directory, host="127.0.0.1", port=0)
    http = aiohttp.ClientSession()
    try:
        yield Mesh(client, directory, outbound, http, delays)
    finally:
        await http.close()
        await outbound.aclose()
        await directory.aclose()
        for runner, _ in apps.values():
            await runner.cleanup()
        await client.close()


async def test_calls_stay_in_zone_fail_over_and_come_back(mesh: Mesh) -> None:
    answered = await mesh.call(300)
    assert sum(answered.values()) == 300
    local = sum(n for who, n in answered.items() if who.startswith("a-"))
    assert local >= 0.95 * 300, answered
    assert len([who for who in answered if who.startswith("a-")]) == 3  # spread in-zone

    # The whole local zone fails its checks: discovery drops it, calls fail over.
    for name in ("a-1", "a-2", "a-3"):
        await mesh.consul.agent.check.ttl_fail(f"ttl:{name}")
    await until(lambda: mesh.zones() == {"zone-b"})
    answered = await mesh.call(200)
    assert set(answered) <= {"b-1", "b-2", "b-3"} and sum(answered.values()) == 200, answered

    # The zone recovers: calls come home.
    for name in ("a-1", "a-2", "a-3"):
        await mesh.consul.agent.check.ttl_pass(f"ttl:{name}")
    # Every local instance back (with one of three, the zone would rightly spill over).
    await until(lambda: mesh.healthy() == 6)
    answered = await mesh.call(200)
    local = sum(n for who, n in answered.items() if who.startswith("a-"))
    assert local >= 0.95 * 200, answered


async def test_peak_ewma_avoids_a_slow_instance(mesh: Mesh) -> None:
    # 150 ms rather than the suite's 50: real clocks on a loaded 2-core machine jitter
    # by tens of milliseconds, and the property must not depend on that.
    mesh.delays["a-3"] = 0.150
    answered = await mesh.call(400)
    assert sum(answered.values()) == 400 and not any(w.startswith("<") for w in answered)
    assert answered["a-3"] < 0.10 * 400, answered
    assert answered["a-1"] > 100 and answered["a-2"] > 100, answered
