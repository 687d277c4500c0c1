"""Bad input over raw HTTP: clear errors naming the field, and nothing changes.

Also the management token: without it, every write is a 403 and changes nothing.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import consul
import consul.aio
import pytest

from registry.server import RegistryServer
from tests.conftest import serving_registry


@pytest.fixture
async def http(registry: RegistryServer) -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(f"http://127.0.0.1:{registry.port}") as s:
        yield s


async def _put(s: aiohttp.ClientSession, path: str, body: Any) -> tuple[int, str]:
    data = body if isinstance(body, bytes | str) else json.dumps(body)
    async with s.put(path, data=data) as r:
        return r.status, await r.text()


def _state(registry: RegistryServer) -> tuple[int, Any]:
    store = registry.store
    return store.index, {t: dict(store.table(t)) for t in ("nodes", "services", "checks")}


BAD_REGISTRATIONS: list[tuple[str, Any, str]] = [
    ("/v1/agent/service/register", b"{not json", "Request decode failed"),
    ("/v1/agent/service/register", b"", "empty body"),
    ("/v1/agent/service/register", [], "expected an object"),
    ("/v1/agent/service/register", {"Port": 80}, "Missing service name"),
    ("/v1/agent/service/register", {"Name": "x", "Port": "eighty"}, "Port"),
    ("/v1/agent/service/register", {"Name": "x", "Port": 70000}, "Port"),
    ("/v1/agent/service/register", {"Name": "x", "Tags": "a"}, "Tags"),
    ("/v1/agent/service/register", {"Name": "x", "Meta": {"a": 1}}, "Meta"),
    ("/v1/agent/service/register", {"Name": "x", "Meta": {"a.b": "1"}}, "Service Meta"),
    ("/v1/agent/service/register", {"Name": "x", "Meta": {"consul-x": "1"}}, "reserved"),
    ("/v1/agent/service/register", {"Name": "x", "Meta": {"k": "v" * 513}}, "too long"),
    ("/v1/catalog/register", {"Node": "n", "Address": "a", "NodeMeta": {"": "v"}}, "blank"),
    ("/v1/agent/service/register", {"Name": 5}, "Name"),
    ("/v1/agent/service/register", {"Name": "x", "Weights": {"Passing": "a"}}, "Weights.Passing"),
    ("/v1/agent/service/register", {"Name": "x", "Weights": {"Passing": 0}}, "Weights.Passing"),
    ("/v1/agent/service/register", {"Name": "x", "Check": {"TTL": "soon"}}, "Check.TTL"),
    ("/v1/agent/service/register", {"Name": "x", "Checks": [{"HTTP": 1}]}, "Checks[0].HTTP"),
    (
        "/v1/agent/service/register",
        {"Name": "x", "Checks": [{"TTL": "5s"}, {"HTTP": "http://127.0.0.1:1/"}]},
        "Checks[1].Interval",
    ),
    ("/v1/agent/service/register", {"Name": "x", "Check": {"Args": ["sh"]}}, "not supported"),
    ("/v1/agent/service/register", {"Name": "x", "Check": {"TTL": "-5s"}}, "Check.TTL"),
    ("/v1/agent/check/register", {"Name": "c", "HTTP": "ftp://x", "Interval": "1s"}, "HTTP"),
    (
        "/v1/agent/check/register",
        {"Name": "c", "HTTP": "http://x/", "Interval": "1s", "Method": "GE T"},
        "Method",
    ),
    (
        "/v1/agent/check/register",
        {"Name": "c", "HTTP": "http://x/", "Interval": "1s", "Header": {"a": ["b\r\nc: d"]}},
        "Header",
    ),
    ("/v1/agent/check/register", {"Name": "c", "TCP": "nohostport", "Interval": "1s"}, "TCP"),
    ("/v1/agent/service/register", {"Name": "x", "Check": {}}, "TTL, HTTP or TCP"),
    ("/v1/agent/check/register", {"TTL": "5s"}, "Missing check name"),
    ("/v1/agent/check/register", {"Name": "c", "TTL": "5s", "Status": "fine"}, "Status"),
    ("/v1/catalog/register", {"Address": "10.0.0.1"}, "Must provide node"),
    ("/v1/catalog/register", {"Node": "n", "Address": 7}, "Address"),
    ("/v1/catalog/register", {"Node": "n"}, "Must provide address"),
    ("/v1/catalog/register", {"Node": "n", "Address": "a", "Service": []}, "Service"),
    (
        "/v1/catalog/register",
        {"Node": "n", "Address": "a", "Check": {"CheckID": "c", "ServiceID": "ghost"}},
        "ghost",
    ),
    ("/v1/catalog/deregister", {}, "Must provide node"),
]


@pytest.mark.parametrize(("path", "body", "says"), BAD_REGISTRATIONS)
async def test_bad_bodies_are_400_naming_the_field_and_change_nothing(
    registry: RegistryServer, http: aiohttp.ClientSession, path: str, body: Any, says: str
) -> None:
    before = _state(registry)
    status, text = await _put(http, path, body)
    assert status == 400, text
    assert says in text
    assert _state(registry) == before
    # ... and the server keeps serving.
    async with http.get("/v1/agent/services") as r:
        assert r.status == 200


async def test_body_over_512_kib_is_413(
    registry: RegistryServer, http: aiohttp.ClientSession
) -> None:
    before = _state(registry)
    big = {"Name": "big", "Meta": {"blob": "x" * (600 * 1024)}}
    status, text = await _put(http, "/v1/agent/service/register", big)
    assert status == 413, text

    async def chunks() -> AsyncIterator[bytes]:
        # Chunked, so no Content-Length warns the server in advance.
        payload = json.dumps(big).encode()
        for i in range(0, len(payload), 64 * 1024):
            yield payload[i : i + 64 * 1024]

    async with http.put("/v1/catalog/register", data=chunks()) as r:
        assert r.status == 413
    assert _state(registry) == before
    status, _ = await _put(http, "/v1/agent/service/register", {"Name": "small"})
    assert status == 200


async def test_raw_socket_garbage_does_not_hurt(registry: RegistryServer) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", registry.port)
    writer.write(
        b"PUT /v1/agent/service/register HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\n{{{{{"
    )
    await writer.drain()
    head = await asyncio.wait_for(reader.readline(), 5)
    assert head.startswith(b"HTTP/1.1 400")
    writer.close()
    async with consul.aio.Consul(port=registry.port) as c:
        assert await c.agent.services() == {}


async def test_wrong_method_is_405_and_unknown_is_404(http: aiohttp.ClientSession) -> None:
    async with http.get("/v1/agent/service/register") as r:
        assert r.status == 405
    async with http.put("/v1/catalog/nodes") as r:
        assert r.status == 405
    async with http.delete("/v1/health/service/web") as r:
        assert r.status == 405
    async with http.get("/v1/no/such/endpoint") as r:
        assert r.status == 404
        assert int(r.headers["X-Consul-Index"]) >= 1
    async with http.get("/v1/agent/service/ghost") as r:
        assert r.status == 404
    for path in (
        "/v1/agent/check/pass/ghost",
        "/v1/agent/check/deregister/ghost",
        "/v1/agent/service/deregister/ghost",
        "/v1/agent/service/maintenance/ghost?enable=true",
    ):
        async with http.put(path) as r:
            assert r.status == 404, path


async def test_bad_query_parameters(http: aiohttp.ClientSession) -> None:
    for path, says in (
        ("/v1/health/service/web?index=abc", "index"),
        ("/v1/health/service/web?filter=Service.Port%20%3D%3D", "1:"),
        ("/v1/health/state/sick", "Invalid state"),
        ("/v1/catalog/nodes?node-meta=novalue", "node-meta"),
    ):
        async with http.get(path) as r:
            assert r.status == 400, path
            assert says in await r.text(), path
    async with http.put("/v1/agent/maintenance") as r:
        assert r.status == 400
        assert "enable" in await r.text()


async def test_ttl_update_of_a_non_ttl_check_is_400(http: aiohttp.ClientSession) -> None:
    body = {"Name": "tcp", "TCP": "127.0.0.1:1", "Interval": "10s"}
    assert (await _put(http, "/v1/agent/check/register", body))[0] == 200
    async with http.put("/v1/agent/check/pass/tcp") as r:
        assert r.status == 400
        assert "TTL" in await r.text()


async def test_catalog_check_claiming_a_kind_without_definition_is_stored_not_run(
    registry: RegistryServer,
) -> None:
    async with consul.aio.Consul(port=registry.port) as c:
        check = {"CheckID": "odd", "Name": "odd", "Type": "ttl", "Status": "passing"}
        assert await c.catalog.register("node1", "127.0.0.1", check=check) is True
        checks = await c.agent.checks()
        assert checks["odd"]["Status"] == "passing"
        assert await c.agent.service.register("after", service_id="after1") is True
    assert "odd" not in registry.ctx.parts["checks"]._running


# -- the management token --------------------------------------------------------------


@pytest.fixture
async def locked(tmp_path: Path) -> AsyncIterator[RegistryServer]:
    async with serving_registry(tmp_path / "locked", management_token="s3") as server:
        yield server


async def test_writes_need_the_management_token(locked: RegistryServer) -> None:
    before = _state(locked)
    async with consul.aio.Consul(port=locked.port) as anon:
        for write in (
            anon.agent.service.register("web", service_id="web1"),
            anon.agent.check.register("c", check=consul.Check.ttl("5s")),
            anon.catalog.register("n2", "10.0.0.2"),
            anon.catalog.deregister("node1"),
            anon.agent.maintenance(True),
        ):
            with pytest.raises(consul.ACLPermissionDenied):
                await write
    async with consul.aio.Consul(port=locked.port, token="wrong") as wrong:
        with pytest.raises(consul.ConsulException):
            await wrong.agent.service.register("web", service_id="web1")
    assert _state(locked) == before

    async with consul.aio.Consul(port=locked.port, token="s3") as admin:
        assert await admin.agent.service.register("web", service_id="web1") is True
        assert set(await admin.agent.services()) == {"web1"}
    async with aiohttp.ClientSession() as s:
        url = f"http://127.0.0.1:{locked.port}/v1/agent/service/deregister/web1?token=s3"
        async with s.put(url) as r:
            assert r.status == 200
    assert locked.ctx.catalog.get_service("node1", "web1") is None


async def test_acl_filters_catalog_and_health_lists(locked: RegistryServer) -> None:
    async with consul.aio.Consul(port=locked.port, token="s3") as admin:
        for name in ("web", "db"):
            await admin.agent.service.register(name, service_id=f"{name}1", port=1)
        await admin.acl.policy.create(
            "web-reader",
            rules={"service": {"web": {"policy": "read"}}, "node_prefix": {"": {"policy": "read"}}},
        )
        tok = await admin.acl.token.create(policies_name=["web-reader"])
    async with consul.aio.Consul(port=locked.port, token=tok["SecretID"]) as reader:
        assert set(await reader.agent.services()) == {"web1"}
        _, names = await reader.catalog.services()
        assert set(names) == {"web"}
        _, web = await reader.health.service("web")
        assert [e["Service"]["ID"] for e in web] == ["web1"]
        with pytest.raises(consul.ACLPermissionDenied):
            await reader.health.service("db")
        _, checks = await reader.health.state("any")
        assert [c["CheckID"] for c in checks] == ["serfHealth"]
        with pytest.raises(consul.ACLPermissionDenied):
            await reader.agent.service.register("web", service_id="web2")
    async with consul.aio.Consul(port=locked.port, token="no-such-token") as unknown:
        with pytest.raises(consul.ACLPermissionDenied):
            await unknown.catalog.services()
