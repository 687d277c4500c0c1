"""Consul's intentions API on the control plane (controlplane/intentions.py), called with
py-consul's `connect.intentions` (aio and sync), over a real registry: one source of
truth with the Intention resources of the REST API, Consul's JSON shapes, precedence
order, check and match, validation with field paths, ACLs, and authorize."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import consul
import consul.aio
import pytest

from controlplane.ca.tokens import create_service_token
from controlplane.server import ControlPlane
from registry.server import RegistryServer
from tests.test_ca_api import MakeCP, acl_registry, call, http, make_cp, root_client

__all__ = ["acl_registry", "http", "make_cp", "root_client"]  # fixtures shared from there

INTENTION_FIELDS = {
    "ID", "Description", "SourceNS", "SourceName", "DestinationNS", "DestinationName",
    "SourceType", "Action", "Precedence", "CreateIndex", "ModifyIndex",
}  # fmt: skip


@pytest.fixture
async def open_cp(make_cp: MakeCP, registry: RegistryServer) -> ControlPlane:
    """A control plane over a registry with ACLs off (a dev setup)."""
    return await make_cp(registry, token=None)


@pytest.fixture
async def ixn(open_cp: ControlPlane) -> AsyncIterator[Any]:
    c = consul.aio.Consul(host="127.0.0.1", port=open_cp.port)
    try:
        yield c.connect.intentions
    finally:
        await c.close()


async def apply(
    http: aiohttp.ClientSession, cp: ControlPlane, doc: dict[str, Any], **kw: Any
) -> tuple[int, Any]:
    doc = {"apiVersion": "tether.dev/v1alpha1", **doc}
    return await call(
        http, "POST", f"{cp.url}/api/v1/apply", data=json.dumps(doc),
        headers={"Content-Type": "application/json", **kw.pop("headers", {})},
    )  # fmt: skip


async def test_upsert_read_list_delete_and_one_source_of_truth(
    open_cp: ControlPlane, ixn: Any, http: aiohttp.ClientSession
) -> None:
    assert await ixn.upsert("web", "api", action="allow", description="the shop") is True
    got = await ixn.read("web", "api")
    assert set(got) == INTENTION_FIELDS
    assert got["SourceName"] == "web" and got["DestinationName"] == "api"
    assert got["SourceNS"] == got["DestinationNS"] == "default"
    assert (got["Action"], got["Precedence"], got["SourceType"]) == ("allow", 9, "consul")
    assert got["Description"] == "the shop"
    # The same intention is an Intention resource, as `tether get intention` reads it.
    status, res = await call(http, "GET", f"{open_cp.url}/api/v1/resources/intention/default/api")
    assert status == 200, res
    assert res["spec"]["sources"] == [{"name": "web", "action": "allow", "description": "the shop"}]
    # An upsert of the same pair replaces it; another source is added beside it.
    assert await ixn.upsert("web", "api", action="deny") is True
    assert await ixn.upsert("*", "api", action="allow") is True
    assert (await ixn.read("web", "api"))["Action"] == "deny"
    # An Intention applied through the REST API (L7) shows in Consul's API.
    status, out = await apply(http, open_cp, {
        "kind": "Intention", "metadata": {"name": "orders", "namespace": "default"},
        "spec": {"sources": [{"name": "web", "permissions": [
            {"action": "allow", "http": {"path": {"prefix": "/v1/"}, "methods": ["GET"],
                                         "headers": [{"name": "x-role", "suffix": "min"}]}},
        ]}]},
    })  # fmt: skip
    assert status == 200, out
    l7 = await ixn.read("web", "orders")
    assert l7["Action"] == ""
    assert l7["Permissions"] == [
        {"Action": "allow", "HTTP": {"PathPrefix": "/v1/", "Methods": ["GET"],
                                     "Header": [{"Name": "x-role", "Suffix": "min"}]}}
    ]  # fmt: skip
    everything = await ixn.list()
    assert [(i["SourceName"], i["DestinationName"], i["Precedence"]) for i in everything] == [
        ("web", "api", 9), ("web", "orders", 9), ("*", "api", 8),
    ]  # fmt: skip
    only = await ixn.list(filter_expr='DestinationName == "orders"')
    assert [i["DestinationName"] for i in only] == ["orders"]
    with pytest.raises(consul.ConsulException, match="boolean expression"):
        await ixn.list(filter_expr="DestinationName ==")
    # Delete one source: the Intention keeps the other; delete the last: it goes.
    assert await ixn.delete("web", "api") is True
    assert await ixn.read("web", "api") is None  # 404: py-consul answers None
    assert [s["name"] for s in (await call(
        http, "GET", f"{open_cp.url}/api/v1/resources/intention/default/api"))[1]["spec"]["sources"]
    ] == ["*"]  # fmt: skip
    assert await ixn.delete("*", "api") is True
    status, _ = await call(http, "GET", f"{open_cp.url}/api/v1/resources/intention/default/api")
    assert status == 404
    assert await ixn.delete("*", "api") is True  # deleting what is gone is no error


async def test_l7_upsert_round_trips_consuls_permissions(ixn: Any) -> None:
    perms = [
        {
            "Action": "deny",
            "HTTP": {
                "PathExact": "/admin",
                "Header": [{"Name": "x-debug", "Present": True, "Invert": True}],
            },
        },
        {"Action": "allow", "HTTP": {"PathRegex": "/v[0-9]+/.*", "Methods": ["GET", "HEAD"]}},
    ]
    assert await ixn.upsert("web", "api", permissions=perms) is True
    got = await ixn.read("web", "api")
    assert got["Permissions"] == perms and got["Action"] == ""


async def test_namespaces_and_wildcards(ixn: Any, http: aiohttp.ClientSession,
                                        open_cp: ControlPlane) -> None:  # fmt: skip
    assert await ixn.upsert("payments/web", "shop/api", action="allow") is True
    assert await ixn.upsert("*/*", "*/*", action="deny") is True
    assert await ixn.upsert("payments/*", "shop/*", action="allow") is True
    got = await ixn.read("payments/web", "shop/api")
    assert (got["SourceNS"], got["DestinationNS"]) == ("payments", "shop")
    status, res = await call(http, "GET", f"{open_cp.url}/api/v1/resources/intention/shop/api")
    assert res["spec"]["sources"] == [{"name": "web", "namespace": "payments", "action": "allow"}]
    status, res = await call(http, "GET", f"{open_cp.url}/api/v1/resources/intention/*/*")
    assert status == 200 and (res["metadata"]["name"], res["metadata"]["namespace"]) == ("*", "*")
    assert [i["Precedence"] for i in await ixn.list()] == [9, 5, 1]


async def test_check_and_match_follow_precedence_and_default(
    ixn: Any, http: aiohttp.ClientSession, open_cp: ControlPlane
) -> None:
    assert await ixn.check("web", "api") is True  # no intention: MeshConfig's default, allow
    status, out = await apply(http, open_cp, {
        "kind": "MeshConfig", "metadata": {"name": "mesh"},
        "spec": {"authorization": {"defaultAction": "deny"}},
    })  # fmt: skip
    assert status == 200, out
    assert await ixn.check("web", "api") is False
    await ixn.upsert("*", "api", action="allow")
    await ixn.upsert("billing", "api", action="deny")
    await ixn.upsert(
        "admin", "api", permissions=[{"Action": "allow", "HTTP": {"Methods": ["GET"]}}]
    )
    await ixn.upsert("web", "*", action="deny")
    assert await ixn.check("web", "api") is True  # default/* → api (8) before web → * (6)
    assert await ixn.check("billing", "api") is False
    assert await ixn.check("admin", "api") is False  # L7: deny for an L4 check, as Consul
    assert await ixn.check("web", "orders") is False
    matched = await ixn.match("destination", "api")
    assert [(i["SourceName"], i["DestinationName"]) for i in matched["api"]] == [
        ("admin", "api"), ("billing", "api"), ("*", "api"), ("web", "*"),
    ]  # fmt: skip
    by_source = await ixn.match("source", "web")
    assert [(i["SourceName"], i["DestinationName"]) for i in by_source["web"]] == [
        ("*", "api"), ("web", "*"),
    ]  # fmt: skip


async def test_invalid_intentions_refused_naming_the_field(ixn: Any) -> None:
    with pytest.raises(consul.ConsulException, match=r"spec\.sources\[0\]\.action"):
        await ixn.upsert("web", "api", action="maybe")
    with pytest.raises(consul.ConsulException, match="exactly one of action, permissions"):
        await ixn.upsert("web", "api")
    bad = [{"Action": "allow", "HTTP": {"PathRegex": "(a)\\1"}}]
    with pytest.raises(consul.ConsulException, match=r"permissions\[0\]\.http\.path\.regex"):
        await ixn.upsert("web", "api", permissions=bad)
    with pytest.raises(consul.ConsulException, match="Meta is not supported"):
        await ixn.upsert("web", "api", action="allow", meta={"a": "b"})
    with pytest.raises(consul.ConsulException, match="invalid service name"):
        await ixn.upsert("Web!", "api", action="allow")
    with pytest.raises(consul.ConsulException, match=r"is invalid"):
        await ixn.read("a/b/c", "api")
    assert await ixn.list() == []  # nothing was stored


async def test_sync_client(open_cp: ControlPlane) -> None:
    """py-consul's blocking client (in a thread: the control plane runs on this loop)."""
    c = consul.Consul(host="127.0.0.1", port=open_cp.port)
    ixn = c.connect.intentions
    assert await asyncio.to_thread(ixn.upsert, "web", "api", action="deny") is True
    got = await asyncio.to_thread(ixn.read, "web", "api")
    assert got["Action"] == "deny"
    assert await asyncio.to_thread(ixn.check, "web", "api") is False
    assert [i["SourceName"] for i in await asyncio.to_thread(ixn.list)] == ["web"]
    assert await asyncio.to_thread(ixn.delete, "web", "api") is True
    assert await asyncio.to_thread(ixn.check, "web", "api") is True


async def test_acls_writes_need_service_write_and_policy_write(
    make_cp: MakeCP, acl_registry: RegistryServer, root_client: Any, http: aiohttp.ClientSession
) -> None:
    cp = await make_cp(acl_registry)
    anon = consul.aio.Consul(host="127.0.0.1", port=cp.port)
    root = consul.aio.Consul(host="127.0.0.1", port=cp.port, token="root")
    web_secret = await create_service_token(root_client, "web")
    api_secret = await create_service_token(root_client, "api")
    web = consul.aio.Consul(host="127.0.0.1", port=cp.port, token=web_secret)
    api = consul.aio.Consul(host="127.0.0.1", port=cp.port, token=api_secret)
    try:
        with pytest.raises(consul.ACLPermissionDenied):
            await anon.connect.intentions.upsert("web", "api", action="allow")
        # web's token may not write intentions for api ...
        with pytest.raises(consul.ACLPermissionDenied):
            await web.connect.intentions.upsert("web", "api", action="allow")
        # ... api's may (service:write on the destination), but the registry's ACLs on
        # the policy prefix refuse the store's write made with that same token.
        with pytest.raises(consul.ACLPermissionDenied):
            await api.connect.intentions.upsert("web", "api", action="allow")
        assert await root.connect.intentions.upsert("web", "api", action="allow") is True
        # Reads: service:read on the destination; the list needs policy read.
        assert (await api.connect.intentions.read("web", "api"))["Action"] == "allow"
        assert await api.connect.intentions.check("web", "api") is True
        with pytest.raises(consul.ACLPermissionDenied):
            await anon.connect.intentions.read("web", "api")
        with pytest.raises(consul.ACLPermissionDenied):
            await api.connect.intentions.list()
        assert len(await root.connect.intentions.list()) == 1
        with pytest.raises(consul.ACLPermissionDenied):
            await web.connect.intentions.delete("web", "api")
        assert await root.connect.intentions.delete("web", "api") is True
    finally:
        for c in (anon, root, web, api):
            await c.close()


async def test_authorize_decides_by_intentions(
    make_cp: MakeCP, acl_registry: RegistryServer, root_client: Any
) -> None:
    cp = await make_cp(acl_registry)
    c = consul.aio.Consul(host="127.0.0.1", port=cp.port, token="root")
    try:
        roots = await c.agent.connect.ca.roots()
        td = roots["TrustDomain"]
        web = f"spiffe://{td}/ns/default/dc/dc1/svc/web"
        other = f"spiffe://{td}/ns/shop/dc/dc1/svc/web"
        got = await c.agent.connect.authorize("db", web, "01")
        assert got == {"Authorized": True,
                       "Reason": "Default behavior configured by MeshConfig (allow)"}  # fmt: skip
        await c.connect.intentions.upsert("web", "db", action="deny")
        got = await c.agent.connect.authorize("db", web, "01")
        assert got["Authorized"] is False
        assert got["Reason"] == "Matched L4 intention: default/web => default/db (Precedence: 9)"
        assert (await c.agent.connect.authorize("db", other, "01"))["Authorized"] is True
        await c.connect.intentions.upsert(
            "web", "db", permissions=[{"Action": "allow", "HTTP": {"Methods": ["GET"]}}]
        )
        got = await c.agent.connect.authorize("db", web, "01")
        assert got["Authorized"] is False and got["Reason"].startswith("Matched L7 intention")
    finally:
        await c.close()
