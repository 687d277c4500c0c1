"""The admin listener over real HTTP, fed by real discovery state and real stats."""

from __future__ import annotations

import os
import random
from typing import Any

import aiohttp
import consul.aio

from proxy.admin import AdminServer
from proxy.build_info import BUILD
from proxy.discovery import ConsulDirectory
from proxy.stats import ProxyStats
from registry.server import RegistryServer


class Source:
    """A sidecar's admin view, minus the listeners: a directory and stats."""

    def __init__(self, directory: ConsulDirectory, stats: ProxyStats) -> None:
        self.directory = directory
        self.stats = stats
        self.draining = False

    def readiness(self) -> tuple[bool, str]:
        if self.draining:
            return False, "DRAINING"
        return (True, "LIVE") if self.directory.up else (False, "PRE_INITIALIZING")

    def clusters(self) -> list[dict[str, Any]]:
        return self.directory.describe()

    def config_dump(self) -> dict[str, Any]:
        return {"watches": sorted(self.directory.watches)}

    def prometheus(self) -> str:
        return self.stats.render_prometheus()


async def test_admin_routes(registry: RegistryServer, consul_client: Any) -> None:
    await consul_client.agent.service.register(
        "orders", service_id="o1", address="127.0.0.1", port=9001, meta={"zone": "z1"}
    )
    client = consul.aio.Consul(host="127.0.0.1", port=registry.port)
    directory = ConsulDirectory(client, wait=5.0, rng=random.Random(1))
    stats = ProxyStats()
    stats.destination("outbound", "orders.default").record(200, 0.003)
    source = Source(directory, stats)
    admin = AdminServer(source, port=0)
    await admin.start()
    base = f"http://127.0.0.1:{admin.port}"
    try:
        assert admin.port != 0
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{base}/ready") as r:
                assert r.status == 503 and (await r.text()).strip() == "PRE_INITIALIZING"
            async with http.get(f"{base}/") as r:  # the index: each path once
                assert (await r.text()).split() == [
                    "/", "/clusters", "/config_dump", "/live", "/ready", "/server_info",
                    "/stats/prometheus",
                ]  # fmt: skip
            assert await directory.resolve("default", "orders") is not None
            async with http.get(f"{base}/ready") as r:
                assert r.status == 200 and (await r.text()).strip() == "LIVE"
            async with http.get(f"{base}/live") as r:
                assert r.status == 200
            async with http.get(f"{base}/clusters") as r:
                (c,) = (await r.json())["clusters"]
            assert c["name"] == "orders.default" and c["source"] == "live"
            assert c["endpoints"][0] | {"active_requests": 0} == {
                "id": "o1",
                "address": "127.0.0.1",
                "port": 9001,
                "weight": 1,
                "zone": "z1",
                "version": "",
                "health": "passing",
                "active_requests": 0,
                "outlier": {"ejected": False},
                "health_check": None,
            }
            async with http.get(f"{base}/config_dump") as r:
                assert await r.json() == {"watches": ["orders"]}
            async with http.get(f"{base}/server_info") as r:
                info = await r.json()
            # Which build this process runs: the one proxy/build_info.py chose.
            assert info["build"] == BUILD.name and info["detail"] == BUILD.detail
            assert info["build"] in ("compiled", "pure") and info["pid"] == os.getpid()
            assert "proxy.exchange" in info["modules"]
            async with http.get(f"{base}/stats/prometheus") as r:
                assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
                text = await r.text()
            assert (
                'listener="outbound",destination="orders.default",subset="",'
                'status_class="2xx"} 1' in text
            )
            source.draining = True
            async with http.get(f"{base}/ready") as r:
                assert r.status == 503 and (await r.text()).strip() == "DRAINING"
            async with http.get(f"{base}/nope") as r:
                assert r.status == 404
    finally:
        await admin.aclose()
        await directory.aclose()
        await client.close()


def test_latency_buckets_are_bisect_left_of_the_bounds() -> None:
    """`DestinationStats.record`'s own bucket search puts every latency where
    `bisect_left(LATENCY_BOUNDS, latency)` does: each bound is in its own bucket."""
    from bisect import bisect_left

    from proxy.stats import LATENCY_BOUNDS, DestinationStats

    cases = [0.0, 1e-9, 1e9, *LATENCY_BOUNDS]
    cases += [b * (1 + 1e-9) for b in LATENCY_BOUNDS] + [b * (1 - 1e-9) for b in LATENCY_BOUNDS]
    for latency in cases:
        ds = DestinationStats("x")
        ds.record(503, latency)
        expected = [0] * (len(LATENCY_BOUNDS) + 1)
        expected[bisect_left(LATENCY_BOUNDS, latency)] = 1
        assert ds.buckets == expected, latency
        assert ds.by_class == [0, 0, 0, 0, 0, 1] and ds.latency_sum == latency
    ds = DestinationStats("x")
    for status in (0, 99, 100, 204, 399, 404, 599, 600):
        ds.record(status, 0.0)
    assert ds.by_class == [3, 1, 1, 1, 1, 1]  # 0, 99 and 600 have no class
