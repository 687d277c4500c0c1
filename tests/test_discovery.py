"""Discovery: `ConsulDirectory` over the real registry through `consul.aio`."""

from __future__ import annotations

import random
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import consul.aio
import pytest

from proxy.backoff import BackoffPolicy
from proxy.balance import PickContext
from proxy.cluster import Cluster
from proxy.discovery import ConsulDirectory, endpoints_from_health
from registry.http import RegistrySpec
from registry.server import RegistryServer
from tests.conftest import free_port
from tests.polling import until

# -- pure parts ------------------------------------------------------------------------


def test_endpoints_from_health_maps_consul_fields() -> None:
    entries = [
        {
            "Node": {"Node": "n1", "Address": "10.0.0.1"},
            "Service": {
                "ID": "orders-1",
                "Service": "orders",
                "Address": "",
                "Port": 15006,
                "Meta": {"zone": "z1", "version": "v2"},
                "Weights": {"Passing": 5, "Warning": 1},
            },
            "Checks": [],
        },
        {
            "Node": {"Node": "n2", "Address": "10.0.0.2"},
            "Service": {
                "ID": "orders-2",
                "Service": "orders",
                "Address": "10.0.0.9",
                "Port": 15007,
                "Meta": {"namespace": "payments"},
            },
        },
        # Same ID on another node: kept, qualified by its node.
        {
            "Node": {"Node": "n3", "Address": "10.0.0.3"},
            "Service": {"ID": "orders-1", "Service": "orders", "Port": 1},
        },
        # Malformed entries are skipped, not fatal.
        {"Node": {}, "Service": {"ID": "bad-port", "Port": "x", "Address": "h"}},
        {"Node": {}, "Service": {"ID": "no-host", "Port": 80}},
        "garbage",
    ]
    by_ns = endpoints_from_health(entries)
    assert set(by_ns) == {"default", "payments"}
    first, dup = by_ns["default"]
    assert (first.id, first.host, first.port) == ("orders-1", "10.0.0.1", 15006)
    assert (first.weight, first.zone, first.meta["version"]) == (5, "z1", "v2")
    assert dup.id == "n3/orders-1" and dup.weight == 1
    (other,) = by_ns["payments"]
    assert (other.host, other.port, other.zone) == ("10.0.0.9", 15007, "")
    assert endpoints_from_health(None) == {}


def test_health_comes_from_the_checks() -> None:
    def entry(sid: str, *statuses: str) -> dict[str, Any]:
        return {
            "Node": {"Node": "n1", "Address": "10.0.0.1"},
            "Service": {"ID": sid, "Port": 80, "Weights": {"Passing": 10, "Warning": 2}},
            "Checks": [{"CheckID": f"c{i}", "Status": st} for i, st in enumerate(statuses)],
        }

    entries = [
        entry("ok", "passing", "passing"),
        entry("warn", "passing", "warning"),
        entry("crit", "warning", "critical"),
        entry("maint", "passing", "maintenance"),
        entry("none"),
    ]
    zero = entry("zero-warning", "warning")
    zero["Service"]["Weights"]["Warning"] = 0
    entries.append(zero)
    eps = {ep.id: ep for ep in endpoints_from_health(entries)["default"]}
    assert {i: (ep.healthy, ep.weight) for i, ep in eps.items()} == {
        "ok": (True, 10),
        "warn": (True, 2),  # warning routes, at Weights.Warning
        "crit": (False, 10),
        "maint": (False, 10),
        "none": (True, 10),
        "zero-warning": (False, 0),  # Consul's xDS: weight 0 is unhealthy
    }


def test_backoff_grows_to_cap_with_jitter() -> None:
    policy = BackoffPolicy(base=0.1, factor=2, cap=2.0)
    rng = random.Random(7)
    delays = [policy.delay(a, rng) for a in range(12)]
    for attempt, d in enumerate(delays):
        step = min(2.0, 0.1 * 2**attempt)
        assert step / 2 <= d <= step
    assert max(delays) <= 2.0 and delays[-1] >= 1.0
    assert [policy.delay(a, random.Random(7)) for a in range(3)] != [
        policy.delay(a, random.Random(8)) for a in range(3)
    ]
    assert policy.delay(10_000, rng) <= 2.0  # no overflow on long outages


# -- against the registry --------------------------------------------------------------


async def register(
    c: Any,
    name: str,
    sid: str,
    port: int,
    *,
    namespace: str | None = None,
    zone: str = "",
    status: str = "passing",
) -> None:
    meta = {"zone": zone}
    if namespace:
        meta["namespace"] = namespace
    ok = await c.agent.service.register(
        name,
        service_id=sid,
        address="127.0.0.1",
        port=port,
        meta=meta,
        check={"CheckID": f"ttl:{sid}", "Name": "ttl", "TTL": "600s", "Status": status},
    )
    assert ok


def ids(cluster: Cluster | None) -> set[str]:
    """The endpoints in rotation (members whose checks say healthy)."""
    assert cluster is not None
    return {ep.id for ep in cluster.endpoints if ep.healthy}


@pytest.fixture
async def directory(registry: RegistryServer) -> AsyncIterator[ConsulDirectory]:
    client = consul.aio.Consul(host="127.0.0.1", port=registry.port)
    d = ConsulDirectory(client, wait=5.0, rng=random.Random(1))
    d.start()
    try:
        yield d
    finally:
        await d.aclose()
        await client.close()


async def test_resolve_watches_and_follows_membership(
    directory: ConsulDirectory, consul_client: Any
) -> None:
    await register(consul_client, "orders", "orders-1", 9001, zone="z1")
    await register(consul_client, "orders", "orders-2", 9002, zone="z2")
    assert directory.lookup("default", "orders") is None  # not watched yet
    cluster = await directory.resolve("default", "orders")
    assert cluster is not None and cluster.source == "live"
    assert ids(cluster) == {"orders-1", "orders-2"}
    assert directory.lookup("default", "orders") is cluster
    assert {ep.zone for ep in cluster.endpoints} == {"z1", "z2"}

    # A new instance is in rotation, and a removed one out, within a second.
    await register(consul_client, "orders", "orders-3", 9003)
    await until(lambda: "orders-3" in ids(cluster), 1.0)
    await consul_client.agent.service.deregister("orders-1")
    await until(lambda: "orders-1" not in ids(cluster), 1.0)
    # An instance whose check turns critical leaves rotation: it stays a member, marked
    # unhealthy, so the locality layer can count its zone's healthy share.
    await consul_client.agent.check.ttl_fail("ttl:orders-2")
    await until(lambda: ids(cluster) == {"orders-3"}, 1.0)
    assert {ep.id for ep in cluster.endpoints} == {"orders-2", "orders-3"}
    assert cluster.balancer.pick(PickContext(), time.monotonic(), random.Random(0)).id == "orders-3"
    assert directory.up
    (row,) = directory.describe()
    assert row["name"] == "orders.default" and row["source"] == "live"
    health = {ep["id"]: ep["health"] for ep in row["endpoints"]}
    assert health == {"orders-2": "critical", "orders-3": "passing"}
    # Warning counts as healthy (Consul's OnlyPassing=false default), at Weights.Warning.
    await consul_client.agent.check.ttl_warn("ttl:orders-2")
    await until(lambda: ids(cluster) == {"orders-2", "orders-3"}, 1.0)


async def test_unknown_and_unhealthy_services(
    directory: ConsulDirectory, consul_client: Any
) -> None:
    assert await directory.resolve("default", "nosuch") is None
    assert directory.lookup("default", "nosuch") is None
    # A service that exists but has no passing instance is known: an empty cluster
    # (503 no_healthy_upstream), not a 404.
    await register(consul_client, "sick", "sick-1", 9100, status="critical")
    cluster = await directory.resolve("default", "sick")
    assert cluster is not None and ids(cluster) == set()
    assert cluster.balancer.pick(PickContext(), time.monotonic(), random.Random(0)) is None
    # A name unknown at first becomes usable once an instance registers.
    await register(consul_client, "nosuch", "nosuch-1", 9101)
    await until(lambda: directory.lookup("default", "nosuch") is not None, 1.0)
    assert ids(directory.lookup("default", "nosuch")) == {"nosuch-1"}


async def test_namespaces_come_from_meta(directory: ConsulDirectory, consul_client: Any) -> None:
    await register(consul_client, "pay", "pay-default", 9201)
    await register(consul_client, "pay", "pay-payments", 9202, namespace="payments")
    default = await directory.resolve("default", "pay")
    payments = await directory.resolve("payments", "pay")
    assert ids(default) == {"pay-default"}
    assert ids(payments) == {"pay-payments"}
    assert await directory.resolve("other", "pay") is None
    assert len(directory.watches) == 1  # one watch serves every namespace of a name


async def test_registry_outage_serves_cached_endpoints(consul_client: Any, tmp_path: Path) -> None:
    port = free_port()
    spec = RegistrySpec(port=port, data_dir=tmp_path / "reg2", node="n1")
    server = RegistryServer(spec)
    await server.start()
    client = consul.aio.Consul(host="127.0.0.1", port=port)
    d = ConsulDirectory(
        client, wait=5.0, backoff=BackoffPolicy(base=0.05, cap=0.2), rng=random.Random(2)
    )
    try:
        await register(client, "inv", "inv-1", 9301)
        cluster = await d.resolve("default", "inv")
        assert ids(cluster) == {"inv-1"}
        await server.aclose()
        assert cluster is not None
        await until(lambda: cluster.source == "cached")
        # Static stability: the last known endpoints keep serving.
        assert d.lookup("default", "inv") is cluster and ids(cluster) == {"inv-1"}
        assert d.describe()[0]["last_error"]
        # The registry comes back (same port, same data) with every check critical
        # until its instance reports again: the cluster keeps its cached endpoint.
        server = RegistryServer(spec)
        await server.start()
        await until(lambda: d.watches["inv"].hold_until > 0, 5.0)
        assert ids(cluster) == {"inv-1"} and cluster.source == "cached"
        # Changes flow again: a live answer with instances replaces the cache.
        await register(client, "inv", "inv-2", 9302)
        await until(lambda: cluster.source == "live" and "inv-2" in ids(cluster), 2.0)
    finally:
        await d.aclose()
        await client.close()
        await server.aclose()


async def test_first_resolve_with_registry_down_is_not_a_404() -> None:
    client = consul.aio.Consul(host="127.0.0.1", port=free_port())
    d = ConsulDirectory(client, first_answer_timeout=2.0, rng=random.Random(3))
    try:
        cluster = await d.resolve("default", "orders")
        # Nothing known and nothing cached: an empty cluster (503), never a false 404.
        assert cluster is not None and cluster.endpoints == ()
        assert cluster.source == "cached" and not d.up
        assert d.lookup("default", "orders") is None
    finally:
        await d.aclose()
        await client.close()
