"""The catalog endpoints through py-consul's `consul.aio` client."""

from __future__ import annotations

from typing import Any

import consul
import pytest

from registry.catalog import Catalog
from registry.store import Store


async def _register_fleet(c: Any) -> None:
    await c.catalog.register(
        "n2",
        "10.0.0.2",
        service={"Service": "db", "ID": "db1", "Port": 5432, "Tags": ["primary", "v2"]},
        node_meta={"ignored": "as in Consul"},
    )
    await c.catalog.register(
        "n3",
        "10.0.0.3",
        service={"Service": "db", "ID": "db2", "Port": 5433, "Tags": ["replica", "v2"]},
        check={"CheckID": "db2-alive", "Name": "alive", "Status": "passing", "ServiceID": "db2"},
    )
    await c.catalog.register("n3", "10.0.0.3", service={"Service": "cache", "Port": 6379})


async def test_datacenters(consul_client: Any) -> None:
    assert await consul_client.catalog.datacenters() == ["dc1"]


async def test_register_and_read_back(consul_client: Any) -> None:
    await _register_fleet(consul_client)
    _, nodes = await consul_client.catalog.nodes()
    assert [n["Node"] for n in nodes] == ["n2", "n3", "node1"]
    assert {n["Node"]: n["Address"] for n in nodes}["n3"] == "10.0.0.3"
    _, services = await consul_client.catalog.services()
    assert services == {"cache": [], "consul": [], "db": ["primary", "replica", "v2"]}
    _, dbs = await consul_client.catalog.service("db")
    assert [(d["Node"], d["Address"], d["ServiceID"], d["ServicePort"]) for d in dbs] == [
        ("n2", "10.0.0.2", "db1", 5432),
        ("n3", "10.0.0.3", "db2", 5433),
    ]
    _, primaries = await consul_client.catalog.service("db", tag="primary")
    assert [d["ServiceID"] for d in primaries] == ["db1"]
    _, none = await consul_client.catalog.service("db", tag="nope")
    assert none == []
    _, n3 = await consul_client.catalog.node("n3")
    assert n3["Node"]["Address"] == "10.0.0.3"
    assert set(n3["Services"]) == {"db2", "cache"}
    _, missing = await consul_client.catalog.node("ghost")
    assert missing is None


async def test_catalog_checks_feed_health(consul_client: Any) -> None:
    await _register_fleet(consul_client)
    _, healthy = await consul_client.health.service("db", passing=True)
    # db1 has no checks at all (passing), db2's only check passes.
    assert [e["Service"]["ID"] for e in healthy] == ["db1", "db2"]
    await consul_client.catalog.register(
        "n3",
        "10.0.0.3",
        check={"CheckID": "db2-alive", "Name": "alive", "Status": "critical", "ServiceID": "db2"},
    )
    _, healthy = await consul_client.health.service("db", passing=True)
    assert [e["Service"]["ID"] for e in healthy] == ["db1"]


async def test_deregister_service_check_and_node(consul_client: Any) -> None:
    await _register_fleet(consul_client)
    assert await consul_client.catalog.deregister("n3", check_id="db2-alive") is True
    _, checks = await consul_client.health.checks("db")
    assert checks == []
    assert await consul_client.catalog.deregister("n3", service_id="cache") is True
    _, services = await consul_client.catalog.services()
    assert "cache" not in services
    assert await consul_client.catalog.deregister("n3") is True
    _, nodes = await consul_client.catalog.nodes()
    assert [n["Node"] for n in nodes] == ["n2", "node1"]
    _, dbs = await consul_client.catalog.service("db")
    assert [d["ServiceID"] for d in dbs] == ["db1"]


async def test_reregister_keeps_create_index(consul_client: Any) -> None:
    await consul_client.catalog.register("n2", "10.0.0.2", service={"Service": "x", "Port": 1})
    _, first = await consul_client.catalog.service("x")
    await consul_client.catalog.register("n2", "10.0.0.2", service={"Service": "x", "Port": 2})
    _, second = await consul_client.catalog.service("x")
    assert second[0]["CreateIndex"] == first[0]["CreateIndex"]
    assert second[0]["ModifyIndex"] > first[0]["ModifyIndex"]
    assert second[0]["ServicePort"] == 2


async def test_catalog_filters(consul_client: Any) -> None:
    await _register_fleet(consul_client)
    _, dbs = await consul_client.catalog.service("db", filter_expr="ServicePort == 5433")
    assert [d["ServiceID"] for d in dbs] == ["db2"]
    _, nodes = await consul_client.catalog.nodes(filter_expr='Address matches "^10[.]"')
    assert [n["Node"] for n in nodes] == ["n2", "n3"]
    _, services = await consul_client.catalog.services(filter_expr='"replica" in ServiceTags')
    assert services == {"db": ["replica", "v2"]}
    _, node = await consul_client.catalog.node("n3", filter_expr="Service == cache")
    assert set(node["Services"]) == {"cache"}
    with pytest.raises(consul.ConsulException) as err:
        await consul_client.catalog.nodes(filter_expr="Node ==")
    assert "400" in str(err.value)


async def test_node_meta_query(consul_client: Any) -> None:
    async with consul.aio.Consul(port=consul_client.http.port) as c:
        await c.http.put(
            lambda r: r.code,
            "/v1/catalog/register",
            data='{"Node": "m1", "Address": "10.1.0.1", "NodeMeta": {"rack": "r1"}}',
        )
        _, nodes = await c.catalog.nodes(node_meta={"rack": "r1"})
        assert [n["Node"] for n in nodes] == ["m1"]
        assert nodes[0]["Meta"] == {"rack": "r1"}


async def test_other_datacenter_is_an_error(consul_client: Any) -> None:
    with pytest.raises(consul.ConsulException) as err:
        await consul_client.catalog.nodes(dc="dc9")
    assert "No path to datacenter" in str(err.value)


async def test_connect_views_list_proxies_and_native_instances(consul_client: Any) -> None:
    c = consul_client
    await c.agent.service.register("web", service_id="web1", port=80)
    await c.agent.service.register(
        "web-sidecar-proxy",
        service_id="web1-proxy",
        port=21000,
        kind="connect-proxy",
        proxy={"DestinationServiceName": "web", "LocalServicePort": 80},
        check=consul.Check.ttl("60s"),
    )
    await c.catalog.register(
        "n2", "10.0.0.2", service={"Service": "web", "ID": "webn", "Connect": {"Native": True}}
    )
    _, proxies = await c.catalog.connect("web")
    assert [(p["ServiceID"], p["ServiceKind"]) for p in proxies] == [
        ("webn", ""),
        ("web1-proxy", "connect-proxy"),
    ]
    _, healthy = await c.health.connect("web", passing=True)
    assert [e["Service"]["ID"] for e in healthy] == ["webn"]  # the proxy's TTL is critical
    await c.agent.check.ttl_pass("service:web1-proxy")
    _, healthy = await c.health.connect("web", passing=True)
    assert [e["Service"]["ID"] for e in healthy] == ["webn", "web1-proxy"]
    _, none = await c.catalog.connect("db")
    assert none == []


def _svc(name: str, sid: str, tags: list[str] | None = None) -> dict[str, Any]:
    return {
        "ID": sid,
        "Service": name,
        "Tags": tags or [],
        "Address": "",
        "Port": 1,
        "Meta": {},
        "Weights": {"Passing": 1, "Warning": 1},
        "TaggedAddresses": {},
        "EnableTagOverride": False,
        "Kind": "",
    }


def test_catalog_touches_exactly_the_views_that_change() -> None:
    store = Store(None)
    cat = Catalog(store, "n1", "dc1", "127.0.0.1", "1.20.0")
    with store.write() as txn:
        cat.ensure_local_node(txn)
        cat.ensure_node(txn, "n2", "10.0.0.2")
    with store.write() as txn:
        cat.put_service(txn, "n1", _svc("a", "a1"))
        cat.put_service(txn, "n1", _svc("b", "b1"))
        cat.put_service(txn, "n2", _svc("c", "c1"))
        cat.put_check(txn, "n1", {"CheckID": "a-ttl", "ServiceID": "a1", "Type": "ttl"})
    assert cat.get_check("n1", "a-ttl")["ServiceName"] == "a"  # type: ignore[index]

    # A service check: only that service's views.
    with store.write() as txn:
        cat.set_check_status(txn, "n1", "a-ttl", "passing", "ok")
        assert txn.touched == {"checks", "node:n1", "service:a", "agent:checks"}
    # A node check: every service on that node (the server's own `consul` too), and
    # nothing on other nodes; serfHealth is no agent check, so agent views stay asleep.
    with store.write() as txn:
        cat.set_check_status(txn, "n1", "serfHealth", "critical", "down")
        assert txn.touched == {"checks", "node:n1", "service:a", "service:b", "service:consul"}
    # The same status and output again: nothing staged, nobody woken.
    before = store.index
    with store.write() as txn:
        cat.set_check_status(txn, "n1", "serfHealth", "critical", "down")
        cat.put_service(txn, "n1", _svc("a", "a1"))
        cat.ensure_node(txn, "n2", "10.0.0.2")
        assert txn.empty
    assert store.index == before
    # A retag changes the name list and the service's checks carry the new tags.
    with store.write() as txn:
        cat.put_service(txn, "n1", _svc("a", "a1", ["new"]))
        assert {"services", "service:a", "agent:service:a1"} <= txn.touched
    assert cat.get_check("n1", "a-ttl")["ServiceTags"] == ["new"]  # type: ignore[index]
    # Moving a node touches its services' views (their addresses changed).
    with store.write() as txn:
        cat.ensure_node(txn, "n2", "10.0.0.22")
        assert txn.touched == {"nodes", "node:n2", "service:c"}
    # Deleting a node takes its services and checks with it.
    with store.write() as txn:
        cat.delete_node(txn, "n1")
    assert cat.instances("a") == [] and cat.node_checks("n1") == []
    assert cat.service_names() == {"c": []}
