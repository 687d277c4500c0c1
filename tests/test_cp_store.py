"""The policy store over a real registry KV: CAS writes, the version counter, no lost update."""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import consul.aio
import pytest

from controlplane.errors import PermissionDeniedError
from controlplane.schema import API_VERSION, Resource, ResourceKey, parse_resources
from controlplane.store import VERSION_KEY, PolicyStore, resource_key_path
from registry.server import RegistryServer
from tests.conftest import serving_registry

ROOT = Path(__file__).resolve().parent.parent


def examples() -> list[Resource]:
    out: list[Resource] = []
    for f in sorted((ROOT / "tether" / "demo" / "policies").glob("*.yaml")):
        out += parse_resources(f.read_text(), str(f))
    return out


def defaults(name: str, labels: dict[str, str] | None = None, ns: str = "default") -> Resource:
    return Resource.from_dict(
        {
            "apiVersion": API_VERSION,
            "kind": "ServiceDefaults",
            "metadata": {"name": name, "namespace": ns, "labels": labels or {}},
            "spec": {"protocol": "http"},
        }
    )


@pytest.fixture(params=[True, False], ids=["txn", "key-by-key"])
async def store(consul_client: Any, request: pytest.FixtureRequest) -> PolicyStore:
    st = PolicyStore(consul_client, rng=random.Random(1))
    st.transactions = request.param
    return st


async def test_apply_create_unchanged_configure_and_generation(
    store: PolicyStore, consul_client: Any
) -> None:
    result = await store.apply(examples())
    assert [c.action for c in result.changes] == ["created"] * 6
    assert result.version == 1
    snap = await store.snapshot()
    assert snap.version == 1 and len(snap.resources) == 6
    assert all(r.metadata.generation == 1 for r in snap.resources.values())
    assert {r.key: r for r in examples()}.keys() == snap.resources.keys()
    # The record is the document, as JSON, under the prefix.
    _, entry = await consul_client.kv.get(
        resource_key_path(ResourceKey("TrafficSplit", "default", "orders"))
    )
    doc = json.loads(entry["Value"])
    assert doc["kind"] == "TrafficSplit" and doc["metadata"]["generation"] == 1

    again = await store.apply(examples())
    assert [c.action for c in again.changes] == ["unchanged"] * 6
    assert again.version == 1  # nothing changed, no bump

    changed = await store.apply([defaults("orders", {"team": "shop"})])
    (c,) = changed.changes
    assert c.action == "configured" and changed.version == 2
    assert c.new is not None and c.new.metadata.generation == 2
    diff = c.diff()
    assert "+    team: shop" in diff and "-  requestTimeout: 2s" in diff


async def test_dry_run_writes_nothing(store: PolicyStore) -> None:
    result = await store.apply(examples(), dry_run=True)
    assert [c.action for c in result.changes] == ["created"] * 6
    assert result.dry_run and result.version == 0
    snap = await store.snapshot()
    assert snap.resources == {} and snap.version == 0
    dry_delete = await store.delete([ResourceKey("Route", "default", "orders")], dry_run=True)
    assert [c.action for c in dry_delete.changes] == ["absent"]


async def test_delete_and_absent(store: PolicyStore) -> None:
    await store.apply(examples())
    key = ResourceKey("Route", "default", "orders")
    result = await store.delete([key, ResourceKey("Route", "default", "nope")])
    assert [c.action for c in result.changes] == ["deleted", "absent"]
    assert result.version == 2
    assert await store.get(key) is None
    assert key not in (await store.snapshot()).resources


async def test_undecodable_records_are_skipped(store: PolicyStore, consul_client: Any) -> None:
    await store.apply([defaults("orders")])
    await consul_client.kv.put("tether/v1/resources/Route/default/broken", "{not json")
    await consul_client.kv.put("tether/v1/resources/Route/default/x", json.dumps({"kind": 1}))
    # A record whose content names another resource than its key.
    wrong = defaults("elsewhere").to_dict()
    await consul_client.kv.put("tether/v1/resources/ServiceDefaults/default/w", json.dumps(wrong))
    snap = await store.snapshot()
    assert list(snap.resources) == [ResourceKey("ServiceDefaults", "default", "orders")]
    # A broken record is overwritten by an apply of that resource.
    fixed = Resource.from_dict(
        {
            "apiVersion": API_VERSION,
            "kind": "Route",
            "metadata": {"name": "broken"},
            "spec": {"rules": []},
        }
    )
    (c,) = (await store.apply([fixed])).changes
    assert c.action == "configured"
    assert ResourceKey("Route", "default", "broken") in (await store.snapshot()).resources


async def test_blocking_snapshot_sees_an_apply_whole(store: PolicyStore, registry: Any) -> None:
    """One apply is one transaction: a watcher never sees half of it, nor its resources
    without its version."""
    first = await store.snapshot()
    waiter = asyncio.create_task(store.snapshot(index=first.index or 1, wait="10s"))
    await asyncio.sleep(0.1)
    assert not waiter.done()
    other = consul.aio.Consul(host="127.0.0.1", port=registry.port)
    try:
        await PolicyStore(other).apply(examples())
    finally:
        await other.close()
    snap = await asyncio.wait_for(waiter, 5)
    assert snap.index > first.index
    assert snap.version == 1 and len(snap.resources) == 6


@pytest.mark.parametrize("transactions", [True, False], ids=["txn", "key-by-key"])
async def test_two_replicas_no_lost_update(registry: Any, transactions: bool) -> None:
    """Two stores (own clients, like two control-plane processes) race on one key and on
    the counter; every write must land: generation and version count them all. Both
    write paths: transactions, and the key-by-key one for registries without /v1/txn."""
    clients = [consul.aio.Consul(host="127.0.0.1", port=registry.port) for _ in range(2)]
    try:
        stores = [PolicyStore(c, rng=random.Random(i)) for i, c in enumerate(clients)]
        for st in stores:
            st.transactions = transactions
        rounds = 15

        async def writer(i: int) -> None:
            for n in range(rounds):
                # Every write changes the content, so each must bump the generation.
                await stores[i].apply([defaults("orders", {"writer": f"r{i}-{n}"})])
                await stores[i].apply([defaults(f"svc-{i}-{n}")])

        await asyncio.gather(writer(0), writer(1))
        snap = await stores[0].snapshot()
        shared = snap.resources[ResourceKey("ServiceDefaults", "default", "orders")]
        assert shared.metadata.generation == 2 * rounds
        assert snap.version == 4 * rounds
        assert len(snap.resources) == 1 + 2 * rounds
        # Pure counter contention: 2 x 25 concurrent bumps → exactly 50 more.
        await asyncio.gather(
            *(s.bump_version() for s in stores for _ in range(25)),
        )
        assert await stores[1].version() == 4 * rounds + 50
    finally:
        for c in clients:
            await c.close()


@pytest.fixture
async def acl_registry(tmp_path: Path) -> AsyncIterator[RegistryServer]:
    async with serving_registry(tmp_path / "reg", management_token="root") as server:
        yield server


async def test_writes_carry_the_callers_token(acl_registry: RegistryServer) -> None:
    port = acl_registry.port
    reader = consul.aio.Consul(host="127.0.0.1", port=port, token="root")
    writer = consul.aio.Consul(host="127.0.0.1", port=port)
    try:
        store = PolicyStore(reader, writer)
        with pytest.raises(PermissionDeniedError):
            await store.apply([defaults("orders")])
        with pytest.raises(PermissionDeniedError):
            await store.apply([defaults("orders")], token="wrong")
        assert (await store.snapshot()).resources == {}
        # A token whose policy may write only under tether/: allowed.
        policy = await reader.acl.policy.create(
            name="tether-policy", rules='key_prefix "tether/" { policy = "write" }'
        )
        token = await reader.acl.token.create(policies_id=[policy["ID"]])
        result = await store.apply([defaults("orders")], token=token["SecretID"])
        assert result.changes[0].action == "created" and result.version == 1
        _, entry = await reader.kv.get(VERSION_KEY)
        assert entry["Value"] == b"1"
    finally:
        await reader.close()
        await writer.close()
