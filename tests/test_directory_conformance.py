"""One contract, every `ServiceDirectory`: the static one and discovery over the registry.

What the outbound path relies on: `resolve` of a known name gives its cluster (the
same object `lookup` then returns without waiting), an unknown name gives None, and
namespaces are kept apart.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from typing import Any

import consul.aio
import pytest

from proxy.balance import Endpoint, PickContext
from proxy.cluster import Cluster, ServiceDirectory, StaticDirectory
from proxy.discovery import ConsulDirectory
from registry.server import RegistryServer

# (service, namespace) -> [(id, port)]
FIXTURE = {
    ("orders", "default"): [("orders-1", 9001), ("orders-2", 9002)],
    ("orders", "shop"): [("orders-shop", 9003)],
}


async def static_directory(_: RegistryServer) -> tuple[ServiceDirectory, Any]:
    clusters = []
    for (svc, ns), members in FIXTURE.items():
        c = Cluster(svc, ns)
        c.set_endpoints([Endpoint(i, "127.0.0.1", p) for i, p in members], "static")
        clusters.append(c)
    return StaticDirectory(clusters), None


async def consul_directory(registry: RegistryServer) -> tuple[ServiceDirectory, Any]:
    client = consul.aio.Consul(host="127.0.0.1", port=registry.port)
    for (svc, ns), members in FIXTURE.items():
        for sid, port in members:
            await client.agent.service.register(
                svc, service_id=sid, address="127.0.0.1", port=port, meta={"namespace": ns}
            )
    d = ConsulDirectory(client, wait=5.0, rng=random.Random(5))
    return d, client


@pytest.fixture(params=[static_directory, consul_directory], ids=["static", "consul"])
async def directory(
    request: pytest.FixtureRequest, registry: RegistryServer
) -> AsyncIterator[ServiceDirectory]:
    d, client = await request.param(registry)
    try:
        yield d
    finally:
        if isinstance(d, ConsulDirectory):
            await d.aclose()
        if client is not None:
            await client.close()


async def test_known_service_resolves_to_its_cluster(directory: ServiceDirectory) -> None:
    cluster = await directory.resolve("default", "orders")
    assert cluster is not None
    assert (cluster.service, cluster.namespace, cluster.name) == (
        "orders",
        "default",
        "orders.default",
    )
    assert sorted((ep.id, ep.host, ep.port) for ep in cluster.endpoints) == [
        ("orders-1", "127.0.0.1", 9001),
        ("orders-2", "127.0.0.1", 9002),
    ]
    assert directory.lookup("default", "orders") is cluster
    assert await directory.resolve("default", "orders") is cluster
    # The cluster's balancer was given the same membership.
    rng = random.Random(1)
    picks = {cluster.balancer.pick(PickContext(), 0.0, rng) for _ in range(4)}
    assert {ep.id for ep in picks if ep is not None} == {"orders-1", "orders-2"}


async def test_unknown_names_and_namespaces(directory: ServiceDirectory) -> None:
    assert await directory.resolve("default", "nosuch") is None
    assert directory.lookup("default", "nosuch") is None
    assert await directory.resolve("elsewhere", "orders") is None
    shop = await directory.resolve("shop", "orders")
    assert shop is not None and [ep.id for ep in shop.endpoints] == ["orders-shop"]
    assert shop is not directory.lookup("default", "orders")
