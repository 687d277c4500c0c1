"""User events through `consul.aio`: fire, payloads, filters, the buffer and blocking lists."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp

from registry.events import uuid_to_index
from registry.server import RegistryServer


def test_uuid_to_index_matches_consul() -> None:
    # Consul's uuidToUint64: the first 16 hex digits XOR the last 16.
    eid = "b54fe110-7af5-cafc-d1fb-afc8ba432b1c"
    assert uuid_to_index(eid) == 0xB54FE1107AF5CAFC ^ 0xD1FBAFC8BA432B1C


async def test_fire_and_list(consul_client: Any) -> None:
    c = consul_client
    ev = await c.event.fire("deploy", "v1.2.3")
    assert ev["Name"] == "deploy" and ev["Version"] == 1 and ev["ID"]
    await c.event.fire("restart")
    await c.event.fire("deploy", "v1.2.4")
    index, events = await c.event.list()
    assert [(e["Name"], e["Payload"]) for e in events] == [
        ("deploy", b"v1.2.3"),
        ("restart", None),
        ("deploy", b"v1.2.4"),
    ]
    assert [e["LTime"] for e in events] == sorted(e["LTime"] for e in events)
    assert int(index) == uuid_to_index(events[-1]["ID"])
    _, deploys = await c.event.list(name="deploy")
    assert [e["Payload"] for e in deploys] == [b"v1.2.3", b"v1.2.4"]
    _, none = await c.event.list(name="nothing")
    assert none == []


async def test_filters_select_the_local_agent(consul_client: Any) -> None:
    c = consul_client
    await c.agent.service.register("web", tags=["blue"])
    await c.event.fire("mine", node="node.*")
    await c.event.fire("theirs", node="^other$")
    await c.event.fire("web-blue", service="web", tag="blu")
    await c.event.fire("web-green", service="web", tag="green")
    await c.event.fire("db", service="^db$")
    _, events = await c.event.list()
    assert [e["Name"] for e in events] == ["mine", "web-blue"]


async def test_bad_events(registry: RegistryServer) -> None:
    base = f"http://127.0.0.1:{registry.port}/v1/event/fire"
    async with aiohttp.ClientSession() as s:
        async with s.put(f"{base}/x?tag=t") as r:
            assert r.status == 400 and "tag filter" in await r.text()
        async with s.put(f"{base}/x?node=(") as r:
            assert r.status == 400
        async with s.put(f"{base}/big", data=b"x" * 600) as r:
            assert r.status == 413
        async with s.put(f"{base}/") as r:
            assert r.status == 400


async def test_blocking_list_and_buffer(consul_client: Any) -> None:
    c = consul_client
    index, _ = await c.event.list(name="tick")
    assert int(index) == 1  # never 0 when empty
    watch = asyncio.ensure_future(c.event.list(name="tick", index=index, wait="5s"))
    await asyncio.sleep(0.1)
    await c.event.fire("other")
    await asyncio.sleep(0.2)
    assert not watch.done()  # another name changes nothing in this listing
    await c.event.fire("tick", "1")
    idx, events = await asyncio.wait_for(watch, 5)
    assert [e["Payload"] for e in events] == [b"1"] and idx != index
    # The agent keeps the last 256 events.
    for i in range(260):
        await c.event.fire("flood", str(i))
    _, events = await c.event.list()
    assert len(events) == 256
    assert events[-1]["Payload"] == b"259"
