"""Registration: the instance, its two checks, the TTL heartbeat and deregistration."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web

from proxy.backoff import BackoffPolicy
from proxy.registration import Registration, RegistrationSpec, probe_app
from tests.conftest import free_port
from tests.polling import until


def test_payload_is_consuls_register_body() -> None:
    spec = RegistrationSpec(
        service="orders",
        address="127.0.0.1",
        port=15006,
        app_port=8080,
        app_health_path="healthz",
        namespace="shop",
        zone="z1",
        version="v2",
        meta={"team": "a", "zone": "ignored"},
    )
    body = spec.payload("passing")
    assert body["ID"] == "orders-127.0.0.1-15006"
    assert (body["Name"], body["Address"], body["Port"]) == ("orders", "127.0.0.1", 15006)
    assert body["Tags"] == ["v2"]
    assert body["Meta"] == {
        "team": "a",
        "namespace": "shop",
        "zone": "z1",
        "version": "v2",
        "app_port": "8080",
        "protocol": "http",
    }
    app, ttl = body["Checks"]
    assert app["HTTP"] == "http://127.0.0.1:8080/healthz" and app["Status"] == "passing"
    assert app["Interval"] == "5s" and app["Timeout"] == "2s"
    assert ttl["TTL"] == "10s" and ttl["DeregisterCriticalServiceAfter"] == "60s"
    tcp = RegistrationSpec(service="x", address="h", port=1, app_port=2, check_interval=0.5)
    check = tcp.payload()["Checks"][0]
    assert check["TCP"] == "127.0.0.1:2" and "HTTP" not in check and "Status" not in check
    assert check["Interval"] == "500ms"


@pytest.fixture
async def app() -> AsyncIterator[dict[str, Any]]:
    """A small app with a health path whose answer the test controls."""
    state: dict[str, Any] = {"status": 200}

    async def health(request: web.Request) -> web.Response:
        return web.Response(status=state["status"], text="ok")

    webapp = web.Application()
    webapp.router.add_get("/healthz", health)
    runner = web.AppRunner(webapp, access_log=None)
    await runner.setup()
    port = free_port()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    state["port"] = port
    try:
        yield state
    finally:
        await runner.cleanup()


async def test_probe_app(app: dict[str, Any]) -> None:
    spec = RegistrationSpec(
        service="a", address="127.0.0.1", port=1, app_port=app["port"], app_health_path="/healthz"
    )
    assert await probe_app(spec)
    app["status"] = 503
    assert not await probe_app(spec)
    spec.app_health_path = None
    assert await probe_app(spec)  # TCP: the port accepts
    spec.app_port = free_port()
    assert not await probe_app(spec)


async def test_register_heartbeat_deregister(app: dict[str, Any], consul_client: Any) -> None:
    spec = RegistrationSpec(
        service="orders",
        address="127.0.0.1",
        port=free_port(),
        app_port=app["port"],
        app_health_path="/healthz",
        zone="z1",
        version="v1",
        meta={"team": "t"},
        ttl=1.0,
        check_interval=1.0,
    )
    reg = Registration(consul_client, spec, rng=random.Random(1))
    reg.start()
    try:
        await reg.wait_registered(5)
        _, nodes = await consul_client.health.service("orders", passing=True)
        # Passing at once: the sidecar saw the app healthy before registering.
        (entry,) = nodes
        svc = entry["Service"]
        assert svc["ID"] == spec.instance_id and svc["Port"] == spec.port
        assert svc["Tags"] == ["v1"]
        assert svc["Meta"]["zone"] == "z1" and svc["Meta"]["team"] == "t"
        assert svc["Meta"]["app_port"] == str(app["port"])
        checks = {c["CheckID"]: c for c in entry["Checks"]}
        assert {spec.app_check_id, spec.ttl_check_id} <= set(checks)
        # The TTL check stays passing past several TTLs because the sidecar heartbeats.
        await asyncio.sleep(2.5)
        _, checks_now = await consul_client.health.checks("orders")
        status = {c["CheckID"]: c["Status"] for c in checks_now}
        assert status[spec.ttl_check_id] == "passing"

        # If the registry forgets the instance, the heartbeat registers it again.
        await consul_client.agent.service.deregister(spec.instance_id)

        async def back() -> bool:
            _, n = await consul_client.health.service("orders")
            return len(n) == 1

        await until(back, 5)
        assert reg.registrations >= 2
    finally:
        assert await reg.deregister()
    _, nodes = await consul_client.health.service("orders")
    assert nodes == []


async def test_registration_retries_until_registry_is_up(app: dict[str, Any]) -> None:
    import consul.aio

    from registry.http import RegistrySpec
    from registry.server import RegistryServer

    port = free_port()
    client = consul.aio.Consul(host="127.0.0.1", port=port)
    spec = RegistrationSpec(service="late", address="127.0.0.1", port=1234, app_port=app["port"])
    reg = Registration(client, spec, backoff=BackoffPolicy(0.05, 2, 0.2), rng=random.Random(2))
    reg.start()
    server = None
    try:
        await asyncio.sleep(0.3)
        assert not reg.registered and reg.last_error
        server = RegistryServer(RegistrySpec(port=port, node="n1"))
        await server.start()
        await reg.wait_registered(5)
        _, services = await client.catalog.services()
        assert "late" in services
    finally:
        await reg.deregister()
        await client.close()
        if server is not None:
            await server.aclose()


async def test_registration_carries_the_acl_token(app: dict[str, Any]) -> None:
    import consul.aio

    from registry.http import RegistrySpec
    from registry.server import RegistryServer

    server = RegistryServer(RegistrySpec(port=0, node="n1", management_token="s3cret"))
    await server.start()
    spec = RegistrationSpec(service="acl", address="127.0.0.1", port=4321, app_port=app["port"])
    anonymous = consul.aio.Consul(host="127.0.0.1", port=server.port, token="")
    with_token = consul.aio.Consul(host="127.0.0.1", port=server.port, token="s3cret")
    denied = Registration(anonymous, spec, backoff=BackoffPolicy(0.05, 2, 0.1))
    allowed = Registration(with_token, spec)
    try:
        denied.start()
        await until(lambda: denied.last_error is not None, 5)
        assert not denied.registered and "ermission" in (denied.last_error or "")
        await denied.deregister()
        allowed.start()
        await allowed.wait_registered(5)
        _, nodes = await with_token.health.service("acl")
        assert [n["Service"]["ID"] for n in nodes] == [spec.instance_id]
        assert await allowed.deregister()
    finally:
        await anonymous.close()
        await with_token.close()
        await server.aclose()
