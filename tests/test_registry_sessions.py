"""Sessions and locks through `consul.aio`: TTL expiry, lock-delay, behaviors, health, kill -9."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import consul
import consul.aio
import pytest
from consul.callback import CB

from registry.server import RegistryServer
from tests.conftest import RegistryProcess, serving_registry
from tests.polling import until


@pytest.fixture
async def fast_registry(tmp_path: Path) -> AsyncIterator[RegistryServer]:
    """A registry allowing sub-second TTLs (Consul's session_ttl_min), so expiry is quick."""
    async with serving_registry(tmp_path / "reg", session_ttl_min=0.2) as server:
        yield server


@pytest.fixture
async def c(fast_registry: RegistryServer) -> AsyncIterator[Any]:
    client = consul.aio.Consul(port=fast_registry.port)
    try:
        yield client
    finally:
        await client.close()


async def create(client: Any, **body: Any) -> str:
    """py-consul refuses TTLs under 10s client-side; send the body through its transport."""
    sid: str = await client.http.put(
        CB.json(is_id=True), "/v1/session/create", data=json.dumps(body)
    )
    return sid


async def test_create_info_list_renew_destroy(c: Any) -> None:
    sid = await c.session.create(name="leader", ttl=30, lock_delay=5)
    _, info = await c.session.info(sid)
    assert info["ID"] == sid and info["Name"] == "leader" and info["Node"] == "node1"
    assert info["TTL"] == "30s" and info["LockDelay"] == 5_000_000_000
    assert info["Behavior"] == "release" and info["NodeChecks"] == ["serfHealth"]
    _, listed = await c.session.list()
    assert [s["ID"] for s in listed] == [sid]
    _, on_node = await c.session.node("node1")
    assert [s["ID"] for s in on_node] == [sid]
    _, other = await c.session.node("elsewhere")
    assert other == []
    renewed = await c.session.renew(sid)
    assert renewed["ID"] == sid
    assert await c.session.destroy(sid) is True
    _, gone = await c.session.info(sid)
    assert gone is None
    with pytest.raises(consul.NotFound):
        await c.session.renew(sid)


async def test_create_validation(c: Any) -> None:
    for body, needle in [
        ({"TTL": "0.1s"}, "Invalid Session TTL"),
        ({"TTL": "90000s"}, "Invalid Session TTL"),
        ({"TTL": "soon"}, "TTL"),
        ({"Behavior": "explode"}, "Invalid Behavior"),
        ({"LockDelay": "61s"}, "Lock delay"),
        ({"LockDelay": float("nan")}, "LockDelay"),
        ({"LockDelay": True}, "LockDelay"),
        ({"TTL": 30}, "TTL"),
        ({"Node": "ghost"}, "Missing node registration"),
        ({"NodeChecks": ["nope"]}, "Missing check 'nope' registration"),
    ]:
        with pytest.raises(consul.ConsulException) as err:
            await create(c, **body)
        assert needle in str(err.value), (body, str(err.value))
    _, none = await c.session.list()
    assert none == []


async def test_acquire_with_unknown_session_fails(c: Any) -> None:
    with pytest.raises(consul.ConsulException) as err:
        await c.kv.put("lock", "x", acquire="00000000-0000-0000-0000-00000000dead")
    assert "invalid session" in str(err.value)
    assert (await c.kv.get("lock"))[1] is None


async def test_lock_contention_and_release(c: Any) -> None:
    a = await c.session.create(lock_delay=0)
    b = await c.session.create(lock_delay=0)
    assert await c.kv.put("svc/leader", "a", acquire=a) is True
    assert await c.kv.put("svc/leader", "b", acquire=b) is False
    # Re-acquiring by the holder keeps LockIndex and updates the value.
    assert await c.kv.put("svc/leader", "a2", acquire=a) is True
    _, held = await c.kv.get("svc/leader")
    assert (held["Session"], held["LockIndex"], held["Value"]) == (a, 1, b"a2")
    # Releasing by a non-holder does nothing.
    assert await c.kv.put("svc/leader", "x", release=b) is False
    assert await c.kv.put("svc/leader", "free", release=a) is True
    _, free = await c.kv.get("svc/leader")
    assert "Session" not in free and free["LockIndex"] == 1 and free["Value"] == b"free"
    # An explicit release sets no lock-delay: the next holder gets it at once.
    assert await c.kv.put("svc/leader", "b", acquire=b) is True
    _, held = await c.kv.get("svc/leader")
    assert (held["Session"], held["LockIndex"]) == (b, 2)


async def test_ttl_expiry_releases_lock_and_lock_delay_holds(c: Any) -> None:
    created = time.monotonic()
    holder = await create(c, TTL="0.4s", LockDelay="2s", Name="holder")
    waiter = await c.session.create(lock_delay=0)
    assert await c.kv.put("job/lock", "holder", acquire=holder) is True
    started = time.monotonic()
    index, entry = await c.kv.get("job/lock")
    # Not renewed: invalidated after twice the TTL (Consul's grace), not before the TTL.
    while entry.get("Session"):
        index, entry = await c.kv.get("job/lock", index=index, wait="5s")
    expired_after = time.monotonic() - started
    assert 0.7 <= expired_after < 5.0, expired_after
    assert entry["Value"] == b"holder" and entry["LockIndex"] == 1
    _, gone = await c.session.info(holder)
    assert gone is None
    # Lock-delay: the key refuses a new holder for 2s after the invalidation, which came
    # no earlier than twice the TTL after creation.
    assert await c.kv.put("job/lock", "waiter", acquire=waiter) is False
    got = await until(lambda: c.kv.put("job/lock", "waiter", acquire=waiter), timeout=8)
    assert got is True
    assert time.monotonic() - created >= 0.8 + 2.0
    _, entry = await c.kv.get("job/lock")
    assert entry["Session"] == waiter and entry["LockIndex"] == 2


async def test_renew_keeps_a_ttl_session_alive(c: Any) -> None:
    sid = await create(c, TTL="0.6s")
    for _ in range(8):  # 1.6s in all, beyond the 1.2s the session would last unrenewed
        await asyncio.sleep(0.2)
        renewed = await c.session.renew(sid)
        assert renewed["ID"] == sid
    _, info = await c.session.info(sid)
    assert info is not None


async def test_behavior_delete_removes_keys(c: Any) -> None:
    sid = await c.session.create(behavior="delete", lock_delay=0)
    assert await c.kv.put("ephemeral/me", "here", acquire=sid) is True
    await c.kv.put("ephemeral/other", "stays")
    assert await c.session.destroy(sid) is True
    assert (await c.kv.get("ephemeral/me"))[1] is None
    _, keys = await c.kv.get("ephemeral/", keys=True)
    assert keys == ["ephemeral/other"]


async def test_critical_check_invalidates_session(c: Any) -> None:
    await c.agent.check.register("heartbeat", check=consul.Check.ttl("30s"))
    await c.agent.check.ttl_pass("heartbeat")
    sid = await c.session.create(checks=["serfHealth", "heartbeat"], lock_delay=0)
    assert await c.kv.put("guarded", "v", acquire=sid) is True
    index, _ = await c.kv.get("guarded")
    await c.agent.check.ttl_fail("heartbeat", "gone")
    _, entry = await c.kv.get("guarded", index=index, wait="5s")
    assert "Session" not in entry
    _, gone = await c.session.info(sid)
    assert gone is None
    # A session cannot be created on a critical check.
    with pytest.raises(consul.ConsulException) as err:
        await c.session.create(checks=["heartbeat"])
    assert "critical" in str(err.value)


async def test_deregistered_check_invalidates_session(c: Any) -> None:
    await c.agent.check.register("hb2", check=consul.Check.ttl("30s"))
    await c.agent.check.ttl_pass("hb2")
    sid = await c.session.create(checks=["hb2"], behavior="delete", lock_delay=0)
    assert await c.kv.put("tmp/owned", "v", acquire=sid) is True
    await c.agent.check.deregister("hb2")
    assert (await c.session.info(sid))[1] is None
    assert (await c.kv.get("tmp/owned"))[1] is None


async def test_blocking_session_list(c: Any) -> None:
    index, _ = await c.session.list()
    watch = asyncio.ensure_future(c.session.list(index=index, wait="5s"))
    await asyncio.sleep(0.1)
    assert not watch.done()
    sid = await c.session.create()
    idx, sessions = await asyncio.wait_for(watch, 5)
    assert int(idx) > int(index) and [s["ID"] for s in sessions] == [sid]


async def test_sessions_and_locks_survive_kill_9(
    registry_process: Callable[..., RegistryProcess],
) -> None:
    rp = registry_process()
    c = consul.aio.Consul(port=rp.port)
    try:
        sid = await c.session.create(name="durable", ttl=60, behavior="delete")
        assert await c.kv.put("held", "v", acquire=sid) is True
    finally:
        await c.close()
    rp.kill9()
    rp.start()
    c = consul.aio.Consul(port=rp.port)
    try:
        _, info = await c.session.info(sid)
        assert info["Name"] == "durable" and info["Behavior"] == "delete"
        _, entry = await c.kv.get("held")
        assert entry["Session"] == sid
        other = await c.session.create(lock_delay=0)
        assert await c.kv.put("held", "x", acquire=other) is False
        # The restarted registry still ends it properly: delete behavior removes the key.
        assert await c.session.destroy(sid) is True
        assert (await c.kv.get("held"))[1] is None
    finally:
        await c.close()


async def test_node_deregistration_ends_its_sessions(c: Any) -> None:
    await c.catalog.register("n2", "10.0.0.2")
    with pytest.raises(consul.ConsulException) as err:
        await c.session.create(node="n2")  # n2 has no serfHealth check
    assert "serfHealth" in str(err.value)
    sid = await c.session.create(node="n2", checks=[], lock_delay=0)
    assert await c.kv.put("n2/lock", "v", acquire=sid) is True
    await c.catalog.deregister("n2")
    assert (await c.session.info(sid))[1] is None
    _, entry = await c.kv.get("n2/lock")
    assert "Session" not in entry
