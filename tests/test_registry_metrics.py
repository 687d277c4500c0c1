"""`/v1/agent/metrics`: requests by route and status, blocking queries, store size, writes."""

from __future__ import annotations

import asyncio
import re
from typing import Any

import aiohttp

from registry.server import RegistryServer


def _sample(text: str, name: str, labels: str = "") -> float:
    m = re.search(rf"^{re.escape(name + labels)} (\S+)$", text, re.M)
    assert m is not None, f"{name}{labels} missing"
    return float(m.group(1))


async def test_prometheus_metrics(consul_client: Any, registry: RegistryServer) -> None:
    c = consul_client
    for i in range(5):
        await c.kv.put(f"m/{i}", "v")
    await c.kv.get("m/missing")
    index, _ = await c.kv.get("m/", recurse=True)
    watcher = asyncio.ensure_future(c.kv.get("m/", recurse=True, index=index, wait="5s"))
    url = f"http://127.0.0.1:{registry.port}/v1/agent/metrics"
    async with aiohttp.ClientSession() as s:
        await asyncio.sleep(0.1)
        async with s.get(url, params={"format": "prometheus"}) as r:
            assert r.status == 200
            assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
            text = await r.text()
        put = '{code="200",method="PUT",route="/v1/kv/{key}"}'
        miss = '{code="404",method="GET",route="/v1/kv/{key}"}'
        assert _sample(text, "tether_registry_http_requests_total", put) == 5
        assert _sample(text, "tether_registry_http_requests_total", miss) == 1
        assert _sample(text, "tether_registry_blocking_queries") == 1
        assert _sample(text, "tether_registry_store_objects", '{table="kv"}') == 5
        assert _sample(text, "tether_registry_store_bytes") > 0
        assert _sample(text, "tether_registry_write_seconds_count") >= 5
        assert _sample(text, "tether_registry_write_seconds_bucket", '{le="+Inf"}') >= 5
        assert _sample(text, "tether_registry_process_resident_memory_bytes") > 10e6
        assert "# TYPE tether_registry_write_seconds histogram" in text
        await c.kv.put("m/new", "v")
        await asyncio.wait_for(watcher, 5)
        async with s.get(url) as r:
            doc = await r.json()
        assert set(doc) >= {"Timestamp", "Gauges", "Counters", "Samples", "Points"}
        gauges = {g["Name"]: g["Value"] for g in doc["Gauges"] if not g["Labels"]}
        assert gauges["tether.registry.blocking_queries"] == 0
        puts = [
            x["Count"]
            for x in doc["Counters"]
            if x["Labels"] == {"method": "PUT", "route": "/v1/kv/{key}", "code": "200"}
        ]
        assert puts == [6]
        assert doc["Samples"][0]["Name"] == "tether.registry.write"
