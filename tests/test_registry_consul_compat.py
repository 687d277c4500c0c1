"""The registry answers as a Consul server does (issue 19), through py-consul, sync and aio.

Shapes are compared with the key sets of Consul's own structs (`tests/consul_shapes.py`);
status codes with what Consul's HTTP handlers answer. The sync client (`consul.Consul`,
on requests) runs in a thread, since the registry serves from this test's event loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import aiohttp
import consul
import consul.aio
import pytest

from registry.server import RegistryServer
from registry.unsupported import ENDPOINTS
from tests import consul_shapes as shapes
from tests.conftest import MANAGEMENT_TOKEN

T = TypeVar("T")
MGMT = MANAGEMENT_TOKEN
UNKNOWN = "0d9c1a44-7c1e-4a4f-8f1e-6c3b2a190000"


async def sync(call: Callable[[], T]) -> T:
    """Run a sync py-consul call off the loop the registry serves from."""
    return await asyncio.to_thread(call)


@pytest.fixture
def sync_client(registry: RegistryServer) -> consul.Consul:
    return consul.Consul(host="127.0.0.1", port=registry.port)


@pytest.fixture
async def http(registry: RegistryServer) -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(f"http://127.0.0.1:{registry.port}") as s:
        yield s


# -- the consul service ------------------------------------------------------------------


async def test_the_consul_service_is_in_the_catalog_and_health_not_the_agent(
    consul_client: Any, sync_client: consul.Consul
) -> None:
    c = consul_client
    _, services = await c.catalog.services()
    assert services == {"consul": []}
    assert (await sync(sync_client.catalog.services))[1] == {"consul": []}

    _, nodes = await c.catalog.service("consul")
    assert len(nodes) == 1
    entry = nodes[0]
    assert set(entry) == shapes.SERVICE_NODE
    assert (entry["Node"], entry["ServiceID"], entry["ServiceName"]) == (
        "node1",
        "consul",
        "consul",
    )
    assert entry["ServicePort"] == shapes.CONSUL_SERVICE_PORT
    assert entry["ServiceTags"] == []
    assert set(entry["ServiceMeta"]) == shapes.CONSUL_SERVICE_META
    self_ = await c.agent.self()
    assert entry["ServiceMeta"]["version"] == self_["Config"]["Version"]

    _, health = await c.health.service("consul")
    assert len(health) == 1
    assert set(health[0]) == shapes.HEALTH_ENTRY
    assert set(health[0]["Node"]) == shapes.NODE
    assert [ch["CheckID"] for ch in health[0]["Checks"]] == ["serfHealth"]
    assert set(health[0]["Checks"][0]) == shapes.HEALTH_CHECK
    _, passing = await sync(lambda: sync_client.health.service("consul", passing=True))
    assert len(passing) == 1

    assert await c.agent.services() == {}
    assert await sync(sync_client.agent.services) == {}
    # Not an agent service: the agent does not know it by ID either.
    assert await c.agent.service_definition("consul") is None


async def test_the_consul_service_id_is_not_the_agents_to_register(consul_client: Any) -> None:
    with pytest.raises(consul.ConsulException, match="reserved"):
        await consul_client.agent.service.register("mine", service_id="consul", port=1)
    _, nodes = await consul_client.catalog.service("consul")
    assert nodes[0]["ServicePort"] == shapes.CONSUL_SERVICE_PORT


async def test_the_consul_service_comes_back_with_the_node(consul_client: Any) -> None:
    """Deregistering the agent's node takes its services; the next agent write restores
    the node, serfHealth and the consul service, as Consul's anti-entropy does."""
    c = consul_client
    assert await c.catalog.deregister("node1") is True
    assert (await c.catalog.services())[1] == {}
    await c.agent.service.register("web", service_id="web1", port=80)
    assert (await c.catalog.services())[1] == {"consul": [], "web": []}


# -- agent checks and services -----------------------------------------------------------


async def test_agent_checks_are_the_agents_only(
    consul_client: Any, sync_client: consul.Consul
) -> None:
    c = consul_client
    assert await c.agent.checks() == {}
    await c.agent.check.register("disk", check=consul.Check.ttl("30s"))
    await c.agent.maintenance(True, "upgrade")
    checks = await sync(sync_client.agent.checks)
    assert set(checks) == {"disk", "_node_maintenance"}
    assert all(set(ch) == shapes.HEALTH_CHECK for ch in checks.values())
    _, node_checks = await c.health.node("node1")
    assert {ch["CheckID"] for ch in node_checks} == {"serfHealth", "disk", "_node_maintenance"}
    # serfHealth is not the agent's to update or remove: 404, as for any unknown check.
    assert await c.agent.check.ttl_pass("serfHealth") is False
    assert await c.agent.check.deregister("serfHealth") is False
    with pytest.raises(consul.ConsulException, match="reserved"):
        await c.agent.check.register("serfHealth", check=consul.Check.ttl("5s"))


async def test_agent_services_have_the_agent_service_shape(
    consul_client: Any, sync_client: consul.Consul
) -> None:
    c = consul_client
    await c.agent.service.register("bare")
    await sync(lambda: sync_client.agent.service.register("bare-sync", port=9))
    await c.agent.service.register(
        "full",
        service_id="full1",
        port=81,
        address="127.0.0.3",
        tags=["a"],
        meta={"k": "v"},
        weights={"Passing": 3, "Warning": 2},
        extra_checks=[],
    )
    await c.http.put(
        consul.callback.CB.boolean(),
        "/v1/agent/service/register",
        data='{"Name": "tagged", "Port": 1,'
        ' "TaggedAddresses": {"lan": {"Address": "10.0.0.1", "Port": 1}}}',
    )
    svcs = await sync(sync_client.agent.services)
    assert svcs == await c.agent.services()
    assert set(svcs["bare"]) == shapes.AGENT_SERVICE_BARE
    assert svcs["bare"] == {
        "ID": "bare",
        "Service": "bare",
        "Tags": [],
        "Meta": {},
        "Port": 0,
        "Address": "",
        "Weights": {"Passing": 1, "Warning": 1},
        "EnableTagOverride": False,
        "Datacenter": "dc1",
    }
    assert set(svcs["bare-sync"]) == shapes.AGENT_SERVICE_BARE
    assert set(svcs["full1"]) == shapes.AGENT_SERVICE_BARE
    assert svcs["full1"]["Weights"] == {"Passing": 3, "Warning": 2}
    assert set(svcs["tagged"]) == shapes.AGENT_SERVICE_BARE | {"TaggedAddresses"}
    one = await c.agent.service_definition("bare")
    assert set(one) == shapes.AGENT_SERVICE_BARE | shapes.AGENT_SERVICE_ONE_EXTRA
    # The catalog's view of the same instance is a ServiceNode.
    _, nodes = await c.catalog.service("bare")
    assert set(nodes[0]) == shapes.SERVICE_NODE
    _, tagged = await c.catalog.service("tagged")
    assert set(tagged[0]) == shapes.SERVICE_NODE | {"ServiceTaggedAddresses"}


async def test_agent_version(consul_client: Any) -> None:
    got = await consul_client.http.get(consul.callback.CB.json(), "/v1/agent/version")
    assert set(got) == {"SHA", "BuildDate", "HumanVersion", "FIPS"}
    assert got["HumanVersion"] == (await consul_client.agent.self())["Config"]["Version"]


async def test_members_lan_and_wan(consul_client: Any, sync_client: consul.Consul) -> None:
    lan = await consul_client.agent.members()
    wan = await sync(lambda: sync_client.agent.members(wan=True))
    assert [m["Name"] for m in lan] == ["node1"]
    assert [m["Name"] for m in wan] == ["node1.dc1"]
    assert set(lan[0]) == set(wan[0]) == shapes.AGENT_MEMBER


# -- status codes ------------------------------------------------------------------------


async def test_check_for_an_unknown_service_is_404(
    consul_client: Any, sync_client: consul.Consul, http: aiohttp.ClientSession
) -> None:
    ttl = consul.Check.ttl("10s")
    assert await consul_client.agent.check.register("c", check=ttl, service_id="ghost") is False
    assert await sync(lambda: sync_client.agent.check.register("c", check=ttl))
    assert not await sync(
        lambda: sync_client.agent.check.register("c", check=ttl, service_id="ghost")
    )
    body = '{"Name": "c", "TTL": "10s", "ServiceID": "ghost"}'
    async with http.put("/v1/agent/check/register", data=body) as r:
        assert r.status == 404
        assert "ghost" in await r.text()
    assert set(await consul_client.agent.checks()) == {"c"}  # the one registered without


@pytest.mark.parametrize("client_kind", ["aio", "sync"])
async def test_missing_acl_tokens_and_policies_are_403_acl_not_found(
    secured_registry: RegistryServer, client_kind: str
) -> None:
    if client_kind == "aio":
        c: Any = consul.aio.Consul(port=secured_registry.port, token=MGMT)

        async def call(fn: Callable[[], Any]) -> Any:
            return await fn()
    else:
        c = consul.Consul(port=secured_registry.port, token=MGMT)

        async def call(fn: Callable[[], Any]) -> Any:
            return await sync(fn)

    try:
        for fn in (
            lambda: c.acl.token.read(UNKNOWN),
            lambda: c.acl.token.update(UNKNOWN, description="x"),
            lambda: c.acl.token.clone(UNKNOWN),
            lambda: c.acl.token.delete(UNKNOWN),
            lambda: c.acl.policy.read(UNKNOWN),
            lambda: c.acl.policy.update(UNKNOWN, "p"),
            lambda: c.acl.policy.delete(UNKNOWN),
        ):
            with pytest.raises(consul.ACLPermissionDenied, match="ACL not found"):
                await call(fn)
        # ... and a real one still reads back.
        pol = await call(lambda: c.acl.policy.create("p1", rules='key "a" { policy = "read" }'))
        assert (await call(lambda: c.acl.policy.read(pol["ID"])))["Name"] == "p1"
        with pytest.raises(consul.ACLPermissionDenied, match="bootstrap no longer allowed"):
            await call(c.acl.bootstrap)
    finally:
        if client_kind == "aio":
            await c.close()


async def test_acl_endpoints_without_acls_are_401(
    consul_client: Any, sync_client: consul.Consul, http: aiohttp.ClientSession
) -> None:
    for fn in (
        consul_client.acl.token.list,
        consul_client.acl.policy.list,
        consul_client.acl.bootstrap,
        lambda: consul_client.acl.token.read(UNKNOWN),
        lambda: consul_client.agent.token.set_default("x"),
    ):
        with pytest.raises(consul.ACLDisabled, match="ACL support disabled"):
            await fn()
    with pytest.raises(consul.ACLDisabled):
        await sync(lambda: sync_client.agent.token.set_agent("x"))
    for kind in ("default", "agent", "agent_recovery", "replication"):
        async with http.put(f"/v1/agent/token/{kind}", data='{"Token": "x"}') as r:
            assert (r.status, await r.text()) == (401, "ACL support disabled")


async def test_agent_token_with_acls_needs_acl_write_then_says_unsupported(
    secured_registry: RegistryServer,
) -> None:
    async with consul.aio.Consul(port=secured_registry.port) as anon:
        with pytest.raises(consul.ACLPermissionDenied):
            await anon.agent.token.set_default("x")
    async with consul.aio.Consul(port=secured_registry.port, token=MGMT) as admin:
        with pytest.raises(consul.ConsulException, match=r"501 .* not supported"):
            await admin.agent.token.set_default("x")


# -- datacenters -------------------------------------------------------------------------


async def test_another_datacenter_has_no_path(
    consul_client: Any, sync_client: consul.Consul, http: aiohttp.ClientSession
) -> None:
    c = consul_client
    calls: list[Callable[[], Any]] = [
        lambda: c.catalog.nodes(dc="dc2"),
        lambda: c.catalog.services(dc="dc2"),
        lambda: c.catalog.service("consul", dc="dc2"),
        lambda: c.catalog.register("n2", "10.0.0.2", dc="dc2"),
        lambda: c.health.service("consul", dc="dc2"),
        lambda: c.health.state("any", dc="dc2"),
        lambda: c.kv.put("k", "v", dc="dc2"),
        lambda: c.kv.get("k", dc="dc2"),
        lambda: c.kv.delete("k", dc="dc2"),
        lambda: c.session.create(dc="dc2"),
        lambda: c.session.list(dc="dc2"),
        lambda: c.event.fire("deploy", dc="dc2"),
    ]
    for call in calls:
        with pytest.raises(consul.ConsulException, match="500 No path to datacenter"):
            await call()
    with pytest.raises(consul.ConsulException, match="No path to datacenter"):
        await sync(lambda: sync_client.kv.put("k", "v", dc="dc2"))
    for path in ("/v1/status/leader?dc=dc2", "/v1/acl/tokens?dc=dc2", "/v1/session/info/x?dc=dc2"):
        async with http.get(path) as r:
            assert (r.status, await r.text()) == (500, "No path to datacenter"), path
    body = '{"Datacenter": "dc2", "Node": "n3", "Address": "10.0.0.3"}'
    async with http.put("/v1/catalog/register", data=body) as r:
        assert (r.status, await r.text()) == (500, "No path to datacenter")
    txn = '[{"KV": {"Verb": "set", "Key": "t", "Value": "eA=="}}]'
    async with http.put("/v1/txn?dc=dc2", data=txn) as r:
        assert (r.status, await r.text()) == (500, "No path to datacenter")
    # Nothing was written anywhere.
    assert (await c.kv.get("k"))[1] is None
    assert (await c.kv.get("t"))[1] is None
    _, nodes = await c.catalog.nodes()
    assert [n["Node"] for n in nodes] == ["node1"]
    # Its own datacenter by name is fine; the agent endpoints take no `dc` (as Consul's).
    assert await c.kv.put("k", "v", dc="dc1") is True
    async with http.get("/v1/agent/services?dc=dc2") as r:
        assert r.status == 200


# -- sessions ----------------------------------------------------------------------------


async def test_sessions_need_a_registered_node_and_existing_checks(
    consul_client: Any, sync_client: consul.Consul
) -> None:
    c = consul_client
    with pytest.raises(consul.ConsulException, match="Missing node registration"):
        await c.session.create(node="ghost")
    with pytest.raises(consul.ConsulException, match="Missing node registration"):
        await sync(lambda: sync_client.session.create(node="ghost"))
    with pytest.raises(consul.ConsulException, match="Missing check 'nope' registration"):
        await c.session.create(checks=["serfHealth", "nope"])
    await c.catalog.register("n2", "10.0.0.2")
    sid = await c.session.create(node="n2", checks=[])
    _, info = await c.session.info(sid)
    assert info["Node"] == "n2"


async def test_a_session_without_node_is_on_the_agents_node_which_always_exists(
    consul_client: Any, sync_client: consul.Consul
) -> None:
    c = consul_client
    sid = await c.session.create(name="lock")
    _, info = await c.session.info(sid)
    assert info["Node"] == "node1"
    # Even with the agent's node deregistered from the catalog (the control plane's
    # locks must not depend on the catalog's contents).
    await c.catalog.deregister("node1")
    sid2 = await sync(lambda: sync_client.session.create(name="lock2"))
    _, mine = await c.session.node("node1")
    assert sid2 in {s["ID"] for s in mine}


# -- endpoints a single node does not have -----------------------------------------------


def _sample(pattern: str) -> str:
    """A concrete path for a route pattern ({x} and {tail:.*} filled in)."""
    out = pattern.replace("{tail:.*}", "s/x")
    while "{" in out:
        start = out.index("{")
        out = out[:start] + "x" + out[out.index("}") + 1 :]
    return out


async def test_unsupported_endpoints_say_so_with_an_error_status(
    http: aiohttp.ClientSession,
) -> None:
    for pattern, what, _why, _instead in ENDPOINTS:
        path = _sample(pattern)
        for method in ("GET", "PUT", "DELETE"):
            async with http.request(method, path) as r:
                text = await r.text()
                assert r.status == 501, (method, path, r.status, text)
                assert f"{what} is not supported by this registry" in text, text
                assert "\n" not in text


async def test_unsupported_endpoints_are_errors_to_py_consul(
    consul_client: Any, sync_client: consul.Consul
) -> None:
    c = consul_client
    for call in (
        lambda: c.agent.join("10.0.0.9"),
        lambda: c.agent.force_leave("n9"),
        c.operator.raft_config,
        c.query.list,
        lambda: c.config.list("service-defaults"),
        c.snapshot.save,
    ):
        with pytest.raises(consul.ConsulException, match="not supported by this registry"):
            await call()
    with pytest.raises(consul.ConsulException, match="cluster join is not supported"):
        await sync(lambda: sync_client.agent.join("10.0.0.9"))
