"""`/v1/txn` through `consul.aio`: atomicity, every KV verb, result shapes, limits, kill -9."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from typing import Any

import aiohttp
import consul
import consul.aio
import pytest

from registry.server import RegistryServer
from tests.conftest import RegistryProcess


def b64(s: str) -> str:
    return base64.b64encode(s.encode()).decode()


def kv(verb: str, key: str, **extra: Any) -> dict[str, Any]:
    return {"KV": {"Verb": verb, "Key": key, **extra}}


def conflict(err: pytest.ExceptionInfo[Any]) -> dict[str, Any]:
    """The 409 body py-consul puts in its ClientError message."""
    text = str(err.value)
    assert text.startswith("409 ")
    body: dict[str, Any] = json.loads(text[4:])
    return body


async def test_all_or_nothing(consul_client: Any) -> None:
    c = consul_client
    await c.kv.put("acct/a", "100")
    _, a = await c.kv.get("acct/a")
    ops = [
        kv("set", "acct/b", Value=b64("1")),
        kv("cas", "acct/a", Value=b64("90"), Index=a["ModifyIndex"] + 99),
        kv("set", "acct/c", Value=b64("1")),
        kv("get", "acct/missing"),
    ]
    with pytest.raises(consul.ConsulException) as err:
        await c.txn.put(ops)
    body = conflict(err)
    assert body["Results"] is None
    assert [e["OpIndex"] for e in body["Errors"]] == [1, 3]
    assert "index is stale" in body["Errors"][0]["What"]
    assert "doesn't exist" in body["Errors"][1]["What"]
    # Nothing was applied: not the sets before the failure, nor after it.
    _, keys = await c.kv.get("acct/", keys=True)
    assert keys == ["acct/a"]
    _, a2 = await c.kv.get("acct/a")
    assert a2["ModifyIndex"] == a["ModifyIndex"]


async def test_results_and_ops_see_earlier_ops(consul_client: Any) -> None:
    c = consul_client
    await c.kv.put("t/x", "old")
    _, x = await c.kv.get("t/x")
    out = await c.txn.put(
        [
            kv("cas", "t/x", Value=b64("new"), Index=x["ModifyIndex"], Flags=3),
            kv("set", "t/y", Value=b64("y")),
            kv("get", "t/y"),
            kv("check-not-exists", "t/z"),
            kv("get-tree", "t/"),
            kv("delete", "t/y"),
            kv("check-not-exists", "t/y"),
        ]
    )
    assert out["Errors"] is None
    results = [r["KV"] for r in out["Results"]]
    # cas and set answer without their value; get and get-tree with it.
    assert [(r["Key"], r["Value"]) for r in results] == [
        ("t/x", None),
        ("t/y", None),
        ("t/y", b64("y")),
        ("t/x", b64("new")),
        ("t/y", b64("y")),
    ]
    assert results[0]["Flags"] == 3
    idx = results[0]["ModifyIndex"]
    assert all(r["ModifyIndex"] == idx for r in results[:3])
    _, keys = await c.kv.get("t/", keys=True)
    assert keys == ["t/x"]


async def test_check_index_delete_cas_and_tree(consul_client: Any) -> None:
    c = consul_client
    for k in ("d/1", "d/2", "d/sub/3", "keep"):
        await c.kv.put(k, "v")
    _, d1 = await c.kv.get("d/1")
    out = await c.txn.put(
        [
            kv("check-index", "d/1", Index=d1["ModifyIndex"]),
            kv("delete-cas", "d/1", Index=d1["ModifyIndex"]),
            kv("delete-tree", "d/"),
        ]
    )
    assert [r["KV"]["Key"] for r in out["Results"]] == ["d/1"]
    _, keys = await c.kv.get("", keys=True)
    assert keys == ["keep"]
    with pytest.raises(consul.ConsulException) as err:
        await c.txn.put([kv("check-index", "keep", Index=1), kv("delete", "keep")])
    assert "current modify index" in conflict(err)["Errors"][0]["What"]
    assert (await c.kv.get("keep"))[1] is not None


async def test_lock_unlock_check_session(consul_client: Any) -> None:
    c = consul_client
    sid = await c.session.create(lock_delay=0)
    other = await c.session.create(lock_delay=0)
    out = await c.txn.put(
        [kv("lock", "l", Value=b64("me"), Session=sid), kv("check-session", "l", Session=sid)]
    )
    assert out["Results"][0]["KV"]["Session"] == sid
    assert out["Results"][0]["KV"]["LockIndex"] == 1
    with pytest.raises(consul.ConsulException) as err:
        await c.txn.put([kv("lock", "l", Session=other)])
    assert "lock is already held" in conflict(err)["Errors"][0]["What"]
    with pytest.raises(consul.ConsulException) as err:
        await c.txn.put([kv("unlock", "l", Session=other)])
    assert "isn't held" in conflict(err)["Errors"][0]["What"]
    with pytest.raises(consul.ConsulException) as err:
        await c.txn.put([kv("lock", "l2", Session="00000000-0000-0000-0000-000000000000")])
    assert "invalid session" in conflict(err)["Errors"][0]["What"]
    # Lock-delay holds for transactions too (Consul checks it before applying).
    delayed = await c.session.create(lock_delay=5)
    await c.txn.put([kv("lock", "ld", Session=delayed)])
    await c.session.destroy(delayed)
    with pytest.raises(consul.ConsulException) as err:
        await c.txn.put([kv("set", "untouched", Value=b64("v")), kv("lock", "ld", Session=sid)])
    assert conflict(err)["Errors"] == [
        {"OpIndex": 1, "What": 'failed to lock key "ld" due to lock delay'}
    ]
    assert (await c.kv.get("untouched"))[1] is None
    out = await c.txn.put([kv("unlock", "l", Value=b64("done"), Session=sid)])
    assert "Session" not in out["Results"][0]["KV"]
    # A Session op ends a session atomically with KV work.
    out = await c.txn.put(
        [kv("lock", "l", Session=other), {"Session": {"Verb": "delete", "Session": {"ID": other}}}]
    )
    _, entry = await c.kv.get("l")
    assert "Session" not in entry
    assert (await c.session.info(other))[1] is None


async def test_limits_and_bad_input(registry: RegistryServer) -> None:
    url = f"http://127.0.0.1:{registry.port}/v1/txn"
    async with aiohttp.ClientSession() as s:
        ops = [kv("set", f"k{i}", Value=b64("v")) for i in range(65)]
        async with s.put(url, json=ops) as r:
            assert r.status == 413
        async with s.put(url, data=b"{not json") as r:
            assert r.status == 400
        async with s.put(url, json=[kv("set", "k", Value="***not base64***")]) as r:
            assert r.status == 400 and "Value" in await r.text()
        async with s.put(url, json=[{"Node": {"Verb": "set"}}]) as r:
            assert r.status == 400 and "unsupported" in await r.text()
        async with s.put(url, json=[kv("explode", "k")]) as r:
            assert r.status == 409 and "unknown KV verb" in await r.text()
        ops = [kv("set", f"k{i}", Value=b64("v")) for i in range(64)]
        async with s.put(url, json=ops) as r:
            assert r.status == 200
            assert len((await r.json())["Results"]) == 64
        async with s.put(url, json=[kv("get", "k1")]) as r:
            # A read-only transaction carries the index like any read.
            assert r.status == 200 and int(r.headers["X-Consul-Index"]) >= 1


async def test_txn_survives_kill_9(registry_process: Callable[..., RegistryProcess]) -> None:
    rp = registry_process()
    c = consul.aio.Consul(port=rp.port)
    try:
        await c.txn.put([kv("set", f"batch/{i}", Value=b64(str(i))) for i in range(10)])
    finally:
        await c.close()
    rp.kill9()
    rp.start()
    c = consul.aio.Consul(port=rp.port)
    try:
        _, tree = await c.kv.get("batch/", recurse=True)
        assert sorted(int(e["Value"]) for e in tree) == list(range(10))
        assert len({e["ModifyIndex"] for e in tree}) == 1  # one commit
    finally:
        await c.close()
