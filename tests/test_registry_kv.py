"""The KV endpoint through `consul.aio`: reads, check-and-set races, blocking, limits, kill -9."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from typing import Any

import aiohttp
import consul
import consul.aio
import pytest

from registry.server import RegistryServer
from tests.conftest import RegistryProcess


def _base(registry: RegistryServer) -> str:
    return f"http://127.0.0.1:{registry.port}"


async def test_get_put_recurse_keys(consul_client: Any) -> None:
    c = consul_client
    assert await c.kv.put("app/config/a", "1") is True
    assert await c.kv.put("app/config/b", b"\x00\xffbinary", flags=42) is True
    assert await c.kv.put("app/other", None) is True
    assert await c.kv.put("apple", "x") is True

    _, a = await c.kv.get("app/config/a")
    assert a["Value"] == b"1"
    assert a["Flags"] == 0 and a["LockIndex"] == 0 and "Session" not in a
    assert a["CreateIndex"] == a["ModifyIndex"]
    _, b = await c.kv.get("app/config/b")
    assert (b["Value"], b["Flags"]) == (b"\x00\xffbinary", 42)
    _, empty = await c.kv.get("app/other")
    assert empty["Value"] is None

    _, tree = await c.kv.get("app/", recurse=True)
    assert [e["Key"] for e in tree] == ["app/config/a", "app/config/b", "app/other"]
    _, everything = await c.kv.get("", recurse=True)
    assert [e["Key"] for e in everything] == [
        "app/config/a",
        "app/config/b",
        "app/other",
        "apple",
    ]
    _, keys = await c.kv.get("app", keys=True)
    assert keys == ["app/config/a", "app/config/b", "app/other", "apple"]
    _, shallow = await c.kv.get("app/", keys=True, separator="/")
    assert shallow == ["app/config/", "app/other"]
    index, missing = await c.kv.get("nope/", recurse=True)
    assert missing is None and int(index) >= 1


async def test_missing_key_is_404_with_index_and_raw_value(registry: RegistryServer) -> None:
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{_base(registry)}/v1/kv/?keys") as r:
            # An empty root listing is 200 [] (Consul's one exception to the 404).
            assert r.status == 200 and await r.json() == []
        async with s.get(f"{_base(registry)}/v1/kv/ghost") as r:
            assert r.status == 404
            assert await r.read() == b""
            assert int(r.headers["X-Consul-Index"]) >= 1
        async with s.put(f"{_base(registry)}/v1/kv/raw", data=b"plain text") as r:
            assert r.status == 200 and await r.json() is True
        async with s.get(f"{_base(registry)}/v1/kv/raw?raw") as r:
            assert r.status == 200
            assert await r.read() == b"plain text"
            assert int(r.headers["X-Consul-Index"]) >= 1
        async with s.put(f"{_base(registry)}/v1/kv/big", data=b"x" * (512 * 1024 + 1)) as r:
            assert r.status == 413
        async with s.put(f"{_base(registry)}/v1/kv/edge", data=b"x" * (512 * 1024)) as r:
            assert r.status == 200
        async with s.put(f"{_base(registry)}/v1/kv/f?flags=-1", data=b"x") as r:
            assert r.status == 400
            assert "flags" in await r.text()
        async with s.put(f"{_base(registry)}/v1/kv/?cas=0", data=b"x") as r:
            assert r.status == 400
        async with s.put(f"{_base(registry)}/v1/kv/k?cas=0&acquire=x", data=b"x") as r:
            assert r.status == 400 and "Conflicting flags" in await r.text()
        async with s.delete(f"{_base(registry)}/v1/kv/k?cas=0&recurse") as r:
            assert r.status == 400 and "Conflicting flags" in await r.text()
        async with s.get(f"{_base(registry)}/v1/kv/") as r:
            assert r.status == 400 and "Missing key name" in await r.text()
        async with s.get(f"{_base(registry)}/v1/kv/?keys") as r:
            assert r.status == 200 and await r.json() == ["edge", "raw"]
        async with s.get(f"{_base(registry)}/v1/kv/none/?keys") as r:
            assert r.status == 404
    c = consul.aio.Consul(port=registry.port)
    try:
        _, big = await c.kv.get("big")
        assert big is None
    finally:
        await c.close()


async def test_cas_semantics(consul_client: Any) -> None:
    c = consul_client
    assert await c.kv.put("k", "first", cas=0) is True
    assert await c.kv.put("k", "again", cas=0) is False
    _, k = await c.kv.get("k")
    assert k["Value"] == b"first"
    assert await c.kv.put("k", "stale", cas=k["ModifyIndex"] + 1000) is False
    assert await c.kv.put("k", "second", cas=k["ModifyIndex"]) is True
    _, k2 = await c.kv.get("k")
    assert k2["Value"] == b"second"
    assert k2["CreateIndex"] == k["CreateIndex"] and k2["ModifyIndex"] > k["ModifyIndex"]
    # Delete with cas: a wrong index refuses, the right one deletes.
    assert await c.kv.delete("k", cas=k["ModifyIndex"]) is False
    assert await c.kv.delete("k", cas=k2["ModifyIndex"]) is True
    assert (await c.kv.get("k"))[1] is None
    # A CAS delete of a missing key succeeds, as in Consul.
    assert await c.kv.delete("k", cas=5) is True


async def test_cas_races_exactly_one_winner(registry: RegistryServer) -> None:
    """Eight clients on their own connections race on the same index, 40 rounds."""
    writers = [consul.aio.Consul(port=registry.port) for _ in range(8)]
    rng = random.Random(7)
    try:
        for rnd in range(40):
            key = f"race/{rnd % 4}"
            _, cur = await writers[0].kv.get(key)
            cas = 0 if cur is None else cur["ModifyIndex"]
            order = list(range(len(writers)))
            rng.shuffle(order)
            outcomes = await asyncio.gather(
                *(writers[i].kv.put(key, f"w{i}-r{rnd}", cas=cas) for i in order)
            )
            assert sum(1 for ok in outcomes if ok) == 1, (rnd, outcomes)
            winner = order[outcomes.index(True)]
            _, now = await writers[0].kv.get(key)
            assert now["Value"] == f"w{winner}-r{rnd}".encode()
    finally:
        for w in writers:
            await w.close()


async def test_cas_counter_loses_no_increment(registry: RegistryServer) -> None:
    """Read-modify-CAS loops from six clients: the count is exact."""
    clients = [consul.aio.Consul(port=registry.port) for _ in range(6)]
    per_client = 15

    async def bump(c: Any) -> int:
        conflicts = 0
        for _ in range(per_client):
            while True:
                _, cur = await c.kv.get("counter")
                value = int(cur["Value"]) if cur is not None else 0
                cas = cur["ModifyIndex"] if cur is not None else 0
                if await c.kv.put("counter", str(value + 1), cas=cas):
                    break
                conflicts += 1
        return conflicts

    try:
        await asyncio.gather(*(bump(c) for c in clients))
        _, final = await clients[0].kv.get("counter")
        assert int(final["Value"]) == per_client * len(clients)
    finally:
        for c in clients:
            await c.close()


async def test_blocking_on_key_and_prefix(consul_client: Any, registry: RegistryServer) -> None:
    c = consul_client
    await c.kv.put("cfg/a", "1")
    await c.kv.put("elsewhere", "1")
    key_index, _ = await c.kv.get("cfg/a")
    tree_index, _ = await c.kv.get("cfg/", recurse=True)

    key_watch = asyncio.ensure_future(c.kv.get("cfg/a", index=key_index, wait="10s"))
    tree_watch = asyncio.ensure_future(c.kv.get("cfg/", index=tree_index, recurse=True, wait="10s"))
    await asyncio.sleep(0.2)
    # A write outside the prefix wakes neither.
    await c.kv.put("elsewhere", "2")
    await c.kv.put("cfg-not-under-slash", "2")
    await asyncio.sleep(0.3)
    assert not key_watch.done() and not tree_watch.done()
    # A new key under the prefix wakes only the prefix watcher.
    await c.kv.put("cfg/b", "2")
    idx, tree = await asyncio.wait_for(tree_watch, 5)
    assert int(idx) > int(tree_index)
    assert [e["Key"] for e in tree] == ["cfg/a", "cfg/b"]
    await asyncio.sleep(0.2)
    assert not key_watch.done()
    # A delete under the prefix moves the prefix index (the tombstone) and wakes it.
    tree_watch = asyncio.ensure_future(c.kv.get("cfg/", index=idx, recurse=True, wait="10s"))
    await asyncio.sleep(0.1)
    await c.kv.delete("cfg/b")
    idx2, tree = await asyncio.wait_for(tree_watch, 5)
    assert int(idx2) > int(idx)
    assert [e["Key"] for e in tree] == ["cfg/a"]
    # Changing the key itself wakes the key watcher with the new value.
    await c.kv.put("cfg/a", "3")
    kidx, entry = await asyncio.wait_for(key_watch, 5)
    assert entry["Value"] == b"3" and int(kidx) == entry["ModifyIndex"]
    # After deleting the whole tree the listing is a 404 whose index still moved.
    await c.kv.delete("cfg/", recurse=True)
    idx3, gone = await c.kv.get("cfg/", recurse=True)
    assert gone is None and int(idx3) > int(idx2)


async def test_delete_recurse(consul_client: Any) -> None:
    c = consul_client
    for k in ("t/1", "t/2", "t/sub/3", "tx"):
        await c.kv.put(k, "v")
    assert await c.kv.delete("t/", recurse=True) is True
    _, keys = await c.kv.get("", keys=True)
    assert keys == ["tx"]


async def test_kv_survives_kill_9(registry_process: Callable[..., RegistryProcess]) -> None:
    rp = registry_process()
    c = consul.aio.Consul(port=rp.port)
    try:
        assert await c.kv.put("durable/a", "1") is True
        assert await c.kv.put("durable/b", "2", flags=7) is True
        _, b = await c.kv.get("durable/b")
        assert await c.kv.put("durable/b", "3", cas=b["ModifyIndex"], flags=7) is True
        assert await c.kv.delete("durable/a") is True
        before, _ = await c.kv.get("durable/", recurse=True)
    finally:
        await c.close()
    rp.kill9()
    rp.start()
    c = consul.aio.Consul(port=rp.port)
    try:
        after, tree = await c.kv.get("durable/", recurse=True)
        assert [(e["Key"], e["Value"], e["Flags"]) for e in tree] == [("durable/b", b"3", 7)]
        # Indexes never go backwards across a restart.
        assert int(after) >= int(before)
        _, b2 = await c.kv.get("durable/b")
        assert await c.kv.put("durable/b", "4", cas=b2["ModifyIndex"]) is True
    finally:
        await c.close()


@pytest.mark.parametrize("bad", ["cas=x", "cas=-1", "flags=1.5"])
async def test_bad_parameters_are_400(registry: RegistryServer, bad: str) -> None:
    async with aiohttp.ClientSession() as s:
        async with s.put(f"{_base(registry)}/v1/kv/k?{bad}", data=b"v") as r:
            assert r.status == 400
        async with s.get(f"{_base(registry)}/v1/kv/k") as r:
            assert r.status == 404


def test_store_prefix_index_and_ordered_keys(tmp_path: Any) -> None:
    """The store's sorted indexes: deletions stay visible to a prefix's index."""
    from registry.store import Store

    store = Store(tmp_path / "s.db")
    try:
        with store.write() as txn:
            for k in ("b/2", "a/1", "b/1", "c"):
                txn.put("kv", k, {"Key": k})
                txn.touch(f"kv:{k}")
        assert store.keys("kv", "b/") == ["b/1", "b/2"]
        assert store.keys("kv") == ["a/1", "b/1", "b/2", "c"]
        created = store.index
        with store.write() as txn:
            txn.delete("kv", "b/1")
            txn.touch("kv:b/1")
        assert store.keys("kv", "b/") == ["b/2"]
        assert store.prefix_index("kv:b/") == store.index > created
        assert store.prefix_index("kv:a/") == created
        assert store.prefix_index("kv:zzz") == 1  # nothing under it: the load index
        with store.write() as txn:
            txn.put("kv", "b/0", {"Key": "b/0"})
            txn.touch("kv:b/0")
        assert store.keys("kv", "b/") == ["b/0", "b/2"]
    finally:
        store.close()


async def test_watch_hub_wakes_by_prefix_with_many_watchers() -> None:
    """Past a few prefix watchers the hub looks up each prefix of a resource instead."""
    from registry.watch import WatchHub

    hub = WatchHub()
    prefixes = [f"kv:p{i}/" for i in range(40)] + ["kv:", "kv:p7"]
    waits = {p: asyncio.ensure_future(hub.wait([], 5, [p])) for p in prefixes}
    await asyncio.sleep(0.01)
    hub.notify(["kv:p7/x"])
    await asyncio.sleep(0.01)
    woken = {p for p, f in waits.items() if f.done()}
    assert woken == {"kv:p7/", "kv:", "kv:p7"}
    hub.close()
    await asyncio.gather(*waits.values())


def test_graveyard_forgets_tombstones_without_going_backwards(tmp_path: Any) -> None:
    from registry import kv
    from registry.store import Store

    store = Store(tmp_path / "g.db")
    try:
        with store.write() as txn:
            kv.put(txn, "t/a", None, 0)
            kv.put(txn, "t/b", None, 0)
            kv.put(txn, "u/c", None, 0)
        with store.write() as txn:
            kv.delete(txn, "t/a")
        deleted_at = store.index
        yard = kv.Graveyard(store)
        assert yard.sweep() == 0  # first seen: kept one more interval
        assert kv.tree_index(store, "t/") == deleted_at
        assert yard.sweep() == 1
        assert store.resources("kv:t/") == ["kv:t/b"]
        # The prefix's index holds at the forgotten tombstone's, never lower.
        assert kv.tree_index(store, "t/") == deleted_at
        assert kv.tree_index(store, "u/") == deleted_at  # Consul's table-index fallback
    finally:
        store.close()
