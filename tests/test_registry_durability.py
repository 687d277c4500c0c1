"""Every acknowledged write survives `kill -9` of a real `tether registry` process."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import consul
import consul.aio
from aiohttp import web

from tests.conftest import serve_app


async def _app() -> tuple[web.AppRunner, int]:
    async def health(request: web.Request) -> web.Response:
        return web.Response(text="fine")

    app = web.Application()
    app.router.add_get("/health", health)
    return await serve_app(app)


async def _status(c: Any, check_id: str, want: str) -> str:
    end = time.monotonic() + 10
    status = ""
    while time.monotonic() < end:
        status = (await c.agent.checks())[check_id]["Status"]
        if status == want:
            break
        await asyncio.sleep(0.05)
    return status


async def test_writes_survive_kill_9_and_checks_restart_critical(
    registry_process: Callable[..., Any],
) -> None:
    rp = registry_process()
    app, app_port = await _app()
    try:
        await _scenario(rp, app_port)
    finally:
        await app.cleanup()


async def _scenario(rp: Any, app_port: int) -> None:
    async with consul.aio.Consul(host="127.0.0.1", port=rp.port) as c:
        await c.agent.check.register(
            "app-http",
            check=consul.Check.http(f"http://127.0.0.1:{app_port}/health", "1s"),
            check_id="app-http",
        )
        assert await _status(c, "app-http", "passing") == "passing"
        await c.agent.service.register(
            "orders",
            service_id="orders-1",
            port=8080,
            tags=["v1"],
            meta={"zone": "a"},
            check=consul.Check.ttl("60s"),
        )
        await c.agent.check.ttl_pass("service:orders-1", "fine")
        await c.agent.check.register("disk", check=consul.Check.ttl("60s"), check_id="disk")
        await c.agent.check.ttl_pass("disk")
        await c.catalog.register(
            "n2",
            "10.0.0.2",
            service={"Service": "db", "ID": "db1", "Port": 5432},
            check={"CheckID": "db-ok", "Name": "db", "Status": "passing", "ServiceID": "db1"},
        )
        await c.agent.service.register("gone", service_id="gone1")
        await c.agent.service.deregister("gone1")
        before, _ = await c.catalog.services()
        _, healthy = await c.health.service("orders", passing=True)
        assert len(healthy) == 1

    await asyncio.to_thread(rp.kill9)
    await asyncio.to_thread(rp.start)

    async with consul.aio.Consul(host="127.0.0.1", port=rp.port) as c:
        svcs = await c.agent.services()
        assert set(svcs) == {"orders-1"}
        assert svcs["orders-1"]["Tags"] == ["v1"] and svcs["orders-1"]["Meta"] == {"zone": "a"}
        _, services = await c.catalog.services()
        assert services == {"consul": [], "db": [], "orders": ["v1"]}
        after, _ = await c.catalog.services()
        assert int(after) >= int(before)  # indexes never go backwards
        checks = await c.agent.checks()
        # TTL checks are critical again until someone vouches for them.
        assert checks["service:orders-1"]["Status"] == "critical"
        assert checks["disk"]["Status"] == "critical"
        _, node_checks = await c.health.node("node1")
        serf = [ch for ch in node_checks if ch["CheckID"] == "serfHealth"]
        assert serf[0]["Status"] == "passing"
        _, healthy = await c.health.service("orders", passing=True)
        assert healthy == []
        # A catalog check is not run by the agent: its stored status stands.
        _, db = await c.health.service("db", passing=True)
        assert [e["Service"]["ID"] for e in db] == ["db1"]
        # The agent identity is stable across restarts.
        me = await c.agent.self()
        assert me["Config"]["NodeName"] == "node1"
        # The HTTP check is run again after the restart, and passes again.
        assert await _status(c, "app-http", "passing") == "passing"
        # Writes go on at higher indexes, and TTL checks run again.
        await c.agent.check.ttl_pass("service:orders-1")
        await c.agent.check.ttl_pass("disk")  # a node check: it gates every instance
        index, healthy = await c.health.service("orders", passing=True)
        assert len(healthy) == 1
        assert int(index) > int(after)


async def test_index_never_goes_backwards_across_restarts(
    registry_process: Callable[..., Any],
) -> None:
    rp = registry_process()
    seen = []
    for round_ in range(2):
        async with consul.aio.Consul(host="127.0.0.1", port=rp.port) as c:
            await c.agent.service.register("s", service_id=f"s{round_}", port=round_ + 1)
            index, _ = await c.health.service("s")
            seen.append(int(index))
            idle, _ = await c.health.service("never-seen")
            assert int(idle) >= 1
        await asyncio.to_thread(rp.kill9)
        await asyncio.to_thread(rp.start)
    async with consul.aio.Consul(host="127.0.0.1", port=rp.port) as c:
        index, insts = await c.health.service("s")
        assert [i["Service"]["ID"] for i in insts] == ["s0", "s1"]
        seen.append(int(index))
    assert seen == sorted(seen) and seen[1] > seen[0]
