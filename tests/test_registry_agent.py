"""The agent endpoints through py-consul's unchanged `consul.aio` client."""

from __future__ import annotations

import json
from typing import Any

import consul
import pytest

from registry.server import RegistryServer


async def test_self_and_members(consul_client: Any, registry: RegistryServer) -> None:
    me = await consul_client.agent.self()
    assert me["Config"]["NodeName"] == "node1"
    assert me["Config"]["Datacenter"] == "dc1"
    assert me["Config"]["Version"]
    assert me["Member"]["Name"] == "node1"
    assert me["Member"]["Addr"] == "127.0.0.1"
    members = await consul_client.agent.members()
    assert [m["Name"] for m in members] == ["node1"]
    assert members[0]["Status"] == 1


async def test_local_node_and_serf_health_exist_from_start(consul_client: Any) -> None:
    _, nodes = await consul_client.catalog.nodes()
    assert [n["Node"] for n in nodes] == ["node1"]
    assert nodes[0]["Address"] == "127.0.0.1"
    # serfHealth is the cluster's view of the node: a catalog check, not an agent one.
    assert "serfHealth" not in await consul_client.agent.checks()
    _, node_checks = await consul_client.health.node("node1")
    assert [c["CheckID"] for c in node_checks] == ["serfHealth"]
    assert node_checks[0]["Status"] == "passing"


async def test_register_every_field(consul_client: Any) -> None:
    ok = await consul_client.agent.service.register(
        "orders",
        service_id="orders-1",
        address="127.0.0.2",
        port=8080,
        tags=["v1", "primary"],
        meta={"zone": "a", "version": "1"},
        weights={"Passing": 10, "Warning": 2},
        tagged_addresses={"lan": {"Address": "10.0.0.1", "Port": 81}},
        enable_tag_override=True,
    )
    assert ok is True
    svcs = await consul_client.agent.services()
    svc = svcs["orders-1"]
    assert svc["Service"] == "orders"
    assert svc["Address"] == "127.0.0.2"
    assert svc["Port"] == 8080
    assert svc["Tags"] == ["v1", "primary"]
    assert svc["Meta"] == {"zone": "a", "version": "1"}
    assert svc["Weights"] == {"Passing": 10, "Warning": 2}
    assert svc["TaggedAddresses"] == {"lan": {"Address": "10.0.0.1", "Port": 81}}
    assert svc["EnableTagOverride"] is True
    one = await consul_client.agent.service_definition("orders-1")
    assert one["ID"] == "orders-1" and one["Port"] == 8080 and one["ContentHash"]
    # The catalog sees the same instance on the agent's node.
    _, inst = await consul_client.catalog.service("orders")
    assert [(i["Node"], i["ServiceID"], i["ServicePort"]) for i in inst] == [
        ("node1", "orders-1", 8080)
    ]
    assert inst[0]["ServiceWeights"] == {"Passing": 10, "Warning": 2}


async def test_unknown_service_is_404(consul_client: Any) -> None:
    # py-consul maps a 404 to None / False.
    assert await consul_client.agent.service_definition("nope") is None
    assert await consul_client.agent.service.deregister("nope") is False


async def test_check_ids_and_names(consul_client: Any) -> None:
    await consul_client.agent.service.register("a", service_id="a1", check=consul.Check.ttl("30s"))
    await consul_client.agent.service.register(
        "b",
        service_id="b1",
        check=consul.Check.ttl("30s"),
        extra_checks=[consul.Check.tcp("127.0.0.1", 1, "10s")],
    )
    checks = await consul_client.agent.checks()
    assert checks["service:a1"]["Name"] == "Service 'a' check"
    assert checks["service:a1"]["ServiceID"] == "a1"
    assert checks["service:a1"]["ServiceName"] == "a"
    assert "service:b1:1" in checks and "service:b1:2" in checks
    assert checks["service:b1:1"]["Type"] == "ttl"
    assert checks["service:b1:2"]["Type"] == "tcp"


async def test_new_ttl_and_http_checks_start_critical(consul_client: Any) -> None:
    await consul_client.agent.service.register(
        "w",
        service_id="w1",
        check=consul.Check.ttl("30s"),
        # Nothing listens on port 1: the HTTP check must stay critical.
        extra_checks=[consul.Check.http("http://127.0.0.1:1/health", "10s")],
    )
    checks = await consul_client.agent.checks()
    assert checks["service:w1:1"]["Status"] == "critical"
    assert checks["service:w1:2"]["Status"] == "critical"


async def test_deregister_removes_its_checks(consul_client: Any) -> None:
    await consul_client.agent.service.register("a", service_id="a1", check=consul.Check.ttl("30s"))
    await consul_client.agent.check.register(
        "extra", check=consul.Check.ttl("30s"), check_id="extra", service_id="a1"
    )
    assert {"service:a1", "extra"} <= set(await consul_client.agent.checks())
    assert await consul_client.agent.service.deregister("a1") is True
    assert await consul_client.agent.checks() == {}
    assert await consul_client.agent.services() == {}
    _, state = await consul_client.health.state("any")
    assert [c["CheckID"] for c in state] == ["serfHealth"]


async def test_replace_existing_checks(consul_client: Any) -> None:
    await consul_client.agent.service.register(
        "a",
        service_id="a1",
        check=consul.Check.ttl("30s"),
        extra_checks=[consul.Check.ttl("30s")],
    )
    assert {"service:a1:1", "service:a1:2"} <= set(await consul_client.agent.checks())
    # Without the flag, a check no longer listed stays.
    await consul_client.agent.service.register("a", service_id="a1", check=consul.Check.ttl("9s"))
    assert {"service:a1", "service:a1:1", "service:a1:2"} <= set(await consul_client.agent.checks())
    await consul_client.agent.service.register(
        "a", service_id="a1", check=consul.Check.ttl("9s"), replace_existing_checks=True
    )
    checks = await consul_client.agent.checks()
    assert set(checks) == {"service:a1"}
    assert checks["service:a1"]["Definition"]["TTL"] == "9s"


async def test_ttl_pass_warn_fail_with_notes(consul_client: Any) -> None:
    await consul_client.agent.check.register("beat", check=consul.Check.ttl("30s"))
    assert (await consul_client.agent.checks())["beat"]["Status"] == "critical"
    for call, status in (
        (consul_client.agent.check.ttl_pass, "passing"),
        (consul_client.agent.check.ttl_warn, "warning"),
        (consul_client.agent.check.ttl_fail, "critical"),
        (consul_client.agent.check.ttl_pass, "passing"),
    ):
        assert await call("beat", notes=f"now {status}") is True
        chk = (await consul_client.agent.checks())["beat"]
        assert (chk["Status"], chk["Output"]) == (status, f"now {status}")
    assert await consul_client.agent.check.deregister("beat") is True
    assert "beat" not in await consul_client.agent.checks()
    assert await consul_client.agent.check.ttl_pass("beat") is False  # 404


async def test_check_for_unknown_service_is_404(consul_client: Any) -> None:
    # Consul >= 1.11 answers 404, which py-consul reports as False.
    ok = await consul_client.agent.check.register(
        "c", check=consul.Check.ttl("10s"), service_id="ghost"
    )
    assert ok is False
    assert "c" not in await consul_client.agent.checks()


async def test_service_maintenance(consul_client: Any) -> None:
    await consul_client.agent.service.register("web", service_id="web1", port=80)
    _, healthy = await consul_client.health.service("web", passing=True)
    assert len(healthy) == 1
    assert await consul_client.agent.service.maintenance("web1", True, "deploying") is True
    checks = await consul_client.agent.checks()
    maint = checks["_service_maintenance:web1"]
    assert (maint["Status"], maint["Notes"]) == ("critical", "deploying")
    assert maint["ServiceID"] == "web1"
    _, healthy = await consul_client.health.service("web", passing=True)
    assert healthy == []
    await consul_client.agent.service.maintenance("web1", False)
    _, healthy = await consul_client.health.service("web", passing=True)
    assert len(healthy) == 1
    assert await consul_client.agent.service.maintenance("ghost", True) is False  # 404


async def test_node_maintenance_takes_every_instance_out(consul_client: Any) -> None:
    await consul_client.agent.service.register("web", service_id="web1", port=80)
    await consul_client.agent.service.register("api", service_id="api1", port=81)
    assert await consul_client.agent.maintenance(True, "kernel upgrade") is True
    checks = await consul_client.agent.checks()
    assert checks["_node_maintenance"]["Notes"] == "kernel upgrade"
    for name in ("web", "api"):
        _, healthy = await consul_client.health.service(name, passing=True)
        assert healthy == []
    await consul_client.agent.maintenance(False)
    _, healthy = await consul_client.health.service("web", passing=True)
    assert len(healthy) == 1


async def test_agent_list_filters(consul_client: Any) -> None:
    await consul_client.agent.service.register("web", service_id="w1", tags=["blue"])
    await consul_client.agent.service.register("web", service_id="w2", tags=["green"])
    svcs = await consul_client.agent.services(filter_expr='"blue" in Tags')
    assert set(svcs) == {"w1"}
    await consul_client.agent.check.register("disk", check=consul.Check.ttl("10s"))
    checks = await consul_client.agent.checks(filter_expr="CheckID == disk")
    assert set(checks) == {"disk"}
    with pytest.raises(consul.ConsulException) as err:
        await consul_client.agent.services(filter_expr="Tags ==")
    assert "400" in str(err.value)


async def test_sync_client_works_too(registry: RegistryServer) -> None:
    import asyncio

    def use_sync() -> Any:
        c = consul.Consul(host="127.0.0.1", port=registry.port)
        c.agent.service.register("syncsvc", service_id="s1", port=1)
        return c.agent.services()

    svcs = await asyncio.to_thread(use_sync)
    assert svcs["s1"]["Service"] == "syncsvc"


async def test_durations_as_go_strings_or_nanoseconds(consul_client: Any) -> None:
    await consul_client.agent.check.register("ns", check={"TTL": 30_000_000_000})
    await consul_client.agent.check.register(
        "h", check=consul.Check.http("http://127.0.0.1:1/", "1m30s", timeout="1500ms")
    )
    checks = await consul_client.agent.checks()
    assert checks["ns"]["Definition"]["TTL"] == "30s"
    assert (checks["h"]["Interval"], checks["h"]["Timeout"]) == ("1m30s", "1.5s")


async def test_local_service_health(consul_client: Any) -> None:
    c = consul_client

    def code_and_body(r: Any) -> tuple[int, Any]:
        return r.code, r.body

    async def by(kind: str, name: str, text: bool = False) -> tuple[int, Any]:
        params = [("format", "text")] if text else []
        path = f"/v1/agent/health/service/{kind}/{name}"
        return tuple(await c.http.get(code_and_body, path, params=params))  # type: ignore[return-value]

    await c.agent.service.register("web", service_id="w1", check=consul.Check.ttl("60s"))
    await c.agent.service.register("web", service_id="w2", check=consul.Check.ttl("60s"))
    assert await by("id", "w1", text=True) == (503, "critical")
    await c.agent.check.ttl_pass("service:w1")
    await c.agent.check.ttl_warn("service:w2")
    assert await by("id", "w1", text=True) == (200, "passing")
    assert await by("id", "w2", text=True) == (429, "warning")
    code, body = await by("name", "web")
    assert code == 429
    assert [e["AggregatedStatus"] for e in json.loads(body)] == ["passing", "warning"]
    await c.agent.service.maintenance("w1", True)
    assert await by("id", "w1", text=True) == (503, "maintenance")
    assert (await by("id", "ghost"))[0] == 404
    assert (await by("name", "ghost"))[0] == 404


async def test_agent_restores_its_node_after_a_catalog_deregister(consul_client: Any) -> None:
    c = consul_client
    assert await c.catalog.deregister("node1") is True
    _, nodes = await c.catalog.nodes()
    assert nodes == []
    await c.agent.service.register("web", service_id="w1", port=1)
    _, entries = await c.health.service("web")
    assert entries[0]["Node"]["Node"] == "node1"
    assert [ch["CheckID"] for ch in entries[0]["Checks"]] == ["serfHealth"]
