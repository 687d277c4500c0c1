"""Health views and the checks the registry runs itself (TTL, HTTP, TCP), over real sockets."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Awaitable, Callable
from typing import Any

import consul
from aiohttp import web

from registry.checks import http_status
from tests.conftest import serve_app
from tests.polling import until


def check_status(c: Any, check_id: str) -> Callable[[], Awaitable[str | None]]:
    async def probe() -> str | None:
        chk = (await c.agent.checks()).get(check_id)
        return None if chk is None else str(chk["Status"])

    return probe


async def test_http_status_mapping() -> None:
    assert [http_status(c) for c in (200, 204, 299, 429, 300, 404, 500, 503)] == [
        "passing",
        "passing",
        "passing",
        "warning",
        "critical",
        "critical",
        "critical",
        "critical",
    ]


async def test_passing_and_tag_filtering_in_stable_order(consul_client: Any) -> None:
    c = consul_client
    for i, tags in enumerate((["blue"], ["green"], ["blue", "canary"])):
        await c.agent.service.register(
            "web", service_id=f"web{3 - i}", port=8000 + i, tags=tags, check=consul.Check.ttl("60s")
        )
    _, all_ = await c.health.service("web")
    assert [e["Service"]["ID"] for e in all_] == ["web1", "web2", "web3"]
    assert all(e["Node"]["Node"] == "node1" for e in all_)
    assert [ch["CheckID"] for ch in all_[0]["Checks"]] == ["serfHealth", "service:web1"]
    _, healthy = await c.health.service("web", passing=True)
    assert healthy == []  # new TTL checks start critical
    await c.agent.check.ttl_pass("service:web1")
    await c.agent.check.ttl_warn("service:web2")
    await c.agent.check.ttl_pass("service:web3")
    _, healthy = await c.health.service("web", passing=True)
    assert [e["Service"]["ID"] for e in healthy] == ["web1", "web3"]  # warning is not passing
    _, blue = await c.health.service("web", tag="blue")
    assert [e["Service"]["ID"] for e in blue] == ["web1", "web3"]
    _, both = await c.health.service("web", tag=["blue", "canary"])
    assert [e["Service"]["ID"] for e in both] == ["web1"]
    _, filtered = await c.health.service("web", filter_expr="Service.Port == 8001")
    assert [e["Service"]["ID"] for e in filtered] == ["web2"]
    _, crit = await c.health.service("web", filter_expr="Checks.Status == warning")
    assert [e["Service"]["ID"] for e in crit] == ["web2"]


async def test_node_check_failure_drops_instances(consul_client: Any) -> None:
    c = consul_client
    await c.agent.service.register("api", service_id="api1", port=1)
    _, healthy = await c.health.service("api", passing=True)
    assert len(healthy) == 1
    await c.agent.check.register("disk", check=consul.Check.ttl("60s"))  # a node check, critical
    _, healthy = await c.health.service("api", passing=True)
    assert healthy == []
    await c.agent.check.ttl_pass("disk")
    _, healthy = await c.health.service("api", passing=True)
    assert len(healthy) == 1


async def test_checks_state_and_node_views(consul_client: Any) -> None:
    c = consul_client
    await c.agent.service.register("a", service_id="a1", check=consul.Check.ttl("60s"))
    await c.agent.service.register("b", service_id="b1", check=consul.Check.ttl("60s"))
    await c.agent.check.ttl_pass("service:b1")
    _, a_checks = await c.health.checks("a")
    assert [ch["CheckID"] for ch in a_checks] == ["service:a1"]
    _, critical = await c.health.state("critical")
    assert [ch["CheckID"] for ch in critical] == ["service:a1"]
    _, passing = await c.health.state("passing")
    assert [ch["CheckID"] for ch in passing] == ["serfHealth", "service:b1"]
    _, unknown = await c.health.state("unknown")
    assert unknown == []
    _, any_ = await c.health.state("any")
    assert len(any_) == 3
    _, node = await c.health.node("node1")
    assert [ch["CheckID"] for ch in node] == ["serfHealth", "service:a1", "service:b1"]
    _, ghost = await c.health.node("ghost")
    assert ghost == []
    _, filtered = await c.health.state("any", filter_expr="ServiceName == b")
    assert [ch["CheckID"] for ch in filtered] == ["service:b1"]


async def test_ttl_expiry_and_reset(consul_client: Any) -> None:
    c = consul_client
    await c.agent.check.register("beat", check=consul.Check.ttl("1s"))
    await c.agent.check.ttl_pass("beat", "alive")
    assert await check_status(c, "beat")() == "passing"
    # Passing again within the TTL keeps it passing past the first deadline.
    for _ in range(5):
        await asyncio.sleep(0.3)
        await c.agent.check.ttl_pass("beat", "alive")
    assert await check_status(c, "beat")() == "passing"
    assert await until(check_status(c, "beat"), want="critical") == "critical"
    chk = (await c.agent.checks())["beat"]
    assert chk["Output"].startswith("TTL expired")
    await c.agent.check.ttl_pass("beat")
    assert await check_status(c, "beat")() == "passing"


async def _health_server(state: dict[str, int]) -> tuple[web.AppRunner, int]:
    async def health(request: web.Request) -> web.Response:
        return web.Response(status=state["code"], text=f"code {state['code']}")

    app = web.Application()
    app.router.add_get("/health", health)
    return await serve_app(app)


async def test_http_check_follows_a_real_server(consul_client: Any) -> None:
    c = consul_client
    state = {"code": 200}
    runner, port = await _health_server(state)
    try:
        await c.agent.service.register(
            "app",
            service_id="app1",
            port=port,
            check=consul.Check.http(f"http://127.0.0.1:{port}/health", "1s", timeout="2s"),
        )
        probe = check_status(c, "service:app1")
        assert await until(probe, want="passing") == "passing"
        out = (await c.agent.checks())["service:app1"]["Output"]
        assert "200" in out and "code 200" in out
        state["code"] = 429
        assert await until(probe, want="warning") == "warning"
        state["code"] = 200
        assert await until(probe, want="passing") == "passing"
    finally:
        await runner.cleanup()
    # The server is gone: the next probe fails.
    assert await until(check_status(c, "service:app1"), want="critical") == "critical"
    _, healthy = await c.health.service("app", passing=True)
    assert healthy == []


async def test_tcp_check(consul_client: Any) -> None:
    c = consul_client

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        await c.agent.check.register("tcp", check=consul.Check.tcp("127.0.0.1", port, "1s"))
        assert await until(check_status(c, "tcp"), want="passing") == "passing"
    finally:
        server.close()
        await server.wait_closed()
    assert await until(check_status(c, "tcp"), want="critical") == "critical"
    assert "dial tcp" in (await c.agent.checks())["tcp"]["Output"]


async def test_deregister_critical_service_after(consul_client: Any) -> None:
    c = consul_client
    check = consul.Check.ttl("200ms")
    check["DeregisterCriticalServiceAfter"] = "1s"
    await c.agent.service.register("doomed", service_id="d1", check=check)

    async def present() -> bool:
        return "d1" in await c.agent.services()

    assert await present()
    assert await until(present, 15.0, want=False) is False
    assert "service:d1" not in await c.agent.checks()


async def test_http_check_honours_interval_and_timeout(consul_client: Any) -> None:
    c = consul_client
    hits: list[float] = []
    slow = {"on": False}

    async def health(request: web.Request) -> web.Response:
        hits.append(time.monotonic())
        if slow["on"]:
            await asyncio.sleep(5)
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/h", health)
    runner, port = await serve_app(app, shutdown_timeout=0.1)
    try:
        await c.agent.check.register(
            "h", check=consul.Check.http(f"http://127.0.0.1:{port}/h", "1s", timeout="300ms")
        )
        assert await until(check_status(c, "h"), want="passing") == "passing"
        first = len(hits)
        await asyncio.sleep(2.5)
        # One probe a second: 2 or 3 more in 2.5 s (allowing for a loaded machine).
        assert 1 <= len(hits) - first <= 4, hits
        gaps = [b - a for a, b in itertools.pairwise(hits)]
        assert all(g > 0.8 for g in gaps), gaps
        slow["on"] = True
        assert await until(check_status(c, "h"), want="critical") == "critical"
        assert "timed out after 0.3s" in (await c.agent.checks())["h"]["Output"]
    finally:
        await c.agent.check.deregister("h")
        await runner.cleanup()


async def test_http_check_opens_a_new_connection_per_probe(consul_client: Any) -> None:
    """Consul probes without keep-alive: an app that stops accepting must fail its check."""
    peers: list[int] = []

    async def health(request: web.Request) -> web.Response:
        transport = request.transport
        assert transport is not None
        peers.append(transport.get_extra_info("peername")[1])
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/health", health)
    runner, port = await serve_app(app)
    try:
        await consul_client.agent.service.register(
            "ka",
            service_id="ka1",
            port=port,
            check=consul.Check.http(f"http://127.0.0.1:{port}/health", "1s"),
        )
        deadline = asyncio.get_running_loop().time() + 10
        while len(peers) < 3 and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.1)
        assert len(peers) >= 3
        # Every probe came from a different client port: no connection was reused.
        assert len(set(peers)) == len(peers)
    finally:
        await runner.cleanup()
