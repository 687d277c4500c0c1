"""Blocking queries (`?index=&wait=`) on every GET route, scoped to what each route shows."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import consul
import consul.aio
from consul.callback import CB

from registry.server import RegistryServer

Mutation = Callable[[Any], Awaitable[Any]]


async def read(c: Any, path: str, index: int | None = None, wait: str = "10s") -> tuple[int, Any]:
    params: list[tuple[str, Any]] = [("token", c.token)] if c.token else []
    if index is not None:
        params += [("index", index), ("wait", wait)]
    idx, data = await c.http.get(CB.json(index=True), path, params=params)
    return int(idx), data


async def _seed(c: Any) -> dict[str, str]:
    """The state every route's read is made on; returns the names paths refer to."""
    await c.kv.put("app/config", "v1")
    session = await c.session.create(name="seed", checks=[])
    await c.agent.service.register("web", service_id="web1", port=80, check=consul.Check.ttl("60s"))
    await c.agent.service.register(
        "web-sidecar-proxy",
        service_id="web1-proxy",
        port=21001,
        kind="connect-proxy",
        proxy={"DestinationServiceName": "web", "LocalServicePort": 80},
    )
    await c.catalog.register("n2", "10.0.0.2", service={"Service": "db", "ID": "db1", "Port": 1})
    return {"session": session}


async def _pass_web(c: Any) -> None:
    """A TTL pass with a new note: a change of Output, so an observable change."""
    await c.agent.check.ttl_pass("service:web1", f"ok at {time.monotonic()}")


async def _new_node(c: Any) -> None:
    await c.catalog.register("n9", "10.0.0.9")


async def _new_service(c: Any) -> None:
    await c.agent.service.register("other", service_id="other1", port=9)


async def _retag_web(c: Any) -> None:
    await c.agent.service.register(
        "web", service_id="web1", port=80, tags=["new"], check=consul.Check.ttl("60s")
    )


async def _node_maintenance(c: Any) -> None:
    await c.agent.maintenance(True, "test")


async def _move_n2(c: Any) -> None:
    await c.catalog.register("n2", "10.0.0.22")


async def _new_proxy(c: Any) -> None:
    await c.agent.service.register(
        "web-sidecar-proxy",
        service_id="other1",  # removed again between routes
        port=21000,
        kind="connect-proxy",
        proxy={"DestinationServiceName": "web", "LocalServicePort": 80},
    )


async def _node_check(c: Any) -> None:
    await c.agent.check.register("disk", check=consul.Check.ttl("60s"))


async def _put_config(c: Any) -> None:
    await c.kv.put("app/config", f"v at {time.monotonic()}")


async def _new_session(c: Any) -> None:
    await c.session.create(name="another", checks=[])


async def _destroy_seed_sessions(c: Any) -> None:
    _, sessions = await c.session.list()
    for s in sessions:
        if s["Name"] == "seed":
            await c.session.destroy(s["ID"])


async def _fire_event(c: Any) -> None:
    await c.event.fire("deploy", str(time.monotonic()))


# Every GET route of the agent, catalog and health APIs, with a write that changes it.
ROUTES: dict[str, tuple[str, Mutation]] = {
    "/v1/agent/self": ("/v1/agent/self", _node_maintenance),
    "/v1/agent/members": ("/v1/agent/members", _new_node),
    "/v1/agent/services": ("/v1/agent/services", _new_service),
    "/v1/agent/service/{service_id}": ("/v1/agent/service/web1", _retag_web),
    "/v1/agent/checks": ("/v1/agent/checks", _pass_web),
    "/v1/agent/health/service/id/{service_id}": ("/v1/agent/health/service/id/web1", _pass_web),
    "/v1/agent/health/service/name/{name}": ("/v1/agent/health/service/name/web", _pass_web),
    "/v1/catalog/nodes": ("/v1/catalog/nodes", _new_node),
    "/v1/catalog/services": ("/v1/catalog/services", _new_service),
    "/v1/catalog/service/{name}": ("/v1/catalog/service/web", _retag_web),
    "/v1/catalog/node/{node}": ("/v1/catalog/node/n2", _move_n2),
    "/v1/catalog/node-services/{node}": ("/v1/catalog/node-services/n2", _move_n2),
    "/v1/health/service/{name}": ("/v1/health/service/web", _node_check),
    "/v1/catalog/connect/{name}": ("/v1/catalog/connect/web", _new_proxy),
    "/v1/health/connect/{name}": ("/v1/health/connect/web", _node_check),
    "/v1/health/checks/{name}": ("/v1/health/checks/web", _pass_web),
    "/v1/health/state/{state}": ("/v1/health/state/any", _pass_web),
    "/v1/health/node/{node}": ("/v1/health/node/node1", _pass_web),
    "/v1/kv/{key}": ("/v1/kv/app/config", _put_config),
    "/v1/session/info/{id}": ("/v1/session/info/{session}", _destroy_seed_sessions),
    "/v1/session/node/{node}": ("/v1/session/node/node1", _new_session),
    "/v1/session/list": ("/v1/session/list", _new_session),
    "/v1/event/list": ("/v1/event/list", _fire_event),
}


async def _new_policy(c: Any) -> None:
    await c.acl.policy.create(f"p{time.monotonic_ns()}", rules='key "a" { policy = "read" }')


async def _new_token(c: Any) -> None:
    await c.acl.token.create(description="another")


# The ACL reads, on a registry with ACLs (they are 401 without): each blocks on `acl`.
ACL_ROUTES: dict[str, tuple[str, Mutation]] = {
    "/v1/acl/policies": ("/v1/acl/policies", _new_policy),
    "/v1/acl/policy/{id}": ("/v1/acl/policy/00000000-0000-0000-0000-000000000001", _new_policy),
    "/v1/acl/policy/name/{name}": ("/v1/acl/policy/name/global-management", _new_policy),
    "/v1/acl/tokens": ("/v1/acl/tokens", _new_token),
    "/v1/acl/token/{id}": ("/v1/acl/token/00000000-0000-0000-0000-000000000002", _new_token),
    "/v1/acl/token/self": ("/v1/acl/token/self", _new_token),
}
# Routes whose data never changes: a blocking read simply waits out `wait`.
STATIC = {"/v1/catalog/datacenters"}
# GET routes that are not blocking queries in Consul either (no index to wait on).
NOT_BLOCKING = {
    "/v1/status/leader": "Consul's Status.Leader is a plain RPC",
    "/v1/status/peers": "Consul's Status.Peers is a plain RPC",
    "/v1/agent/metrics": "metrics are a snapshot of the moment",
    "/v1/agent/version": "the build's version never changes",
}


async def test_every_get_route_is_covered(registry: RegistryServer) -> None:
    """Every GET route in the whole route table: blocking with a test below, or listed
    as never changing or as not blocking in Consul either."""
    gets = [
        r.resource.canonical
        for r in registry.app.router.routes()
        if r.method == "GET" and r.resource is not None
    ]
    assert len(gets) == len(set(gets))
    assert sorted(gets) == sorted([*ROUTES, *ACL_ROUTES, *STATIC, *NOT_BLOCKING])


async def _blocks_until_changed(c: Any, route: str, path: str, mutate: Mutation) -> tuple[int, int]:
    """Read `path`, block on its index, `mutate`: the index before and the one woken with."""
    index, _ = await read(c, path)
    assert index > 0, route
    waiter = asyncio.ensure_future(read(c, path, index))
    await asyncio.sleep(0.05)
    assert not waiter.done(), f"{route} answered before anything changed"
    started = time.monotonic()
    await mutate(c)
    new_index, _ = await asyncio.wait_for(waiter, 5)
    assert time.monotonic() - started < 4, route  # woken, not timed out (10 s)
    return index, new_index


async def test_every_get_route_blocks_until_its_resource_changes(consul_client: Any) -> None:
    c = consul_client
    for route, (template, mutate) in ROUTES.items():
        names = await _seed(c)
        index, new_index = await _blocks_until_changed(c, route, template.format(**names), mutate)
        # Greater, but for events: their index is a hash of the list (as Consul's).
        assert new_index != index if route == "/v1/event/list" else new_index > index, route
        # Undo what the mutations left behind that would stop the next one changing things.
        await c.agent.maintenance(False)
        await c.agent.check.deregister("disk")
        await c.agent.service.deregister("other1")
        await c.catalog.deregister("n9")


async def test_blocking_times_out_with_the_same_index(consul_client: Any) -> None:
    c = consul_client
    await _seed(c)
    for path in ("/v1/health/service/web", "/v1/catalog/datacenters", "/v1/agent/services"):
        index, _ = await read(c, path)
        started = time.monotonic()
        again, _ = await read(c, path, index, wait="300ms")
        took = time.monotonic() - started
        assert again == index, path
        # wait plus at most wait/16 of jitter, and some scheduling slack
        assert 0.28 <= took < 3, (path, took)


async def test_a_change_to_one_service_does_not_wake_another(consul_client: Any) -> None:
    c = consul_client
    await _seed(c)
    await c.agent.service.register("api", service_id="api1", port=81, check=consul.Check.ttl("60s"))
    index, _ = await read(c, "/v1/health/service/web")
    cindex, _ = await read(c, "/v1/catalog/service/web")
    waiters = [
        asyncio.ensure_future(read(c, "/v1/health/service/web", index, wait="2s")),
        asyncio.ensure_future(read(c, "/v1/catalog/service/web", cindex, wait="2s")),
    ]
    await asyncio.sleep(0.05)
    # Changes to api, to db on another node, and to the KV-free rest of the catalog.
    await c.agent.check.ttl_pass("service:api1")
    await c.agent.service.register("api", service_id="api1", port=82, check=consul.Check.ttl("60s"))
    await c.catalog.register("n2", "10.0.0.2", service={"Service": "db", "ID": "db1", "Port": 2})
    await c.catalog.register("n3", "10.0.0.3")
    for w in waiters:
        assert not w.done()
    (i1, _), (i2, _) = await asyncio.gather(*waiters)
    assert (i1, i2) == (index, cindex)


async def test_a_write_that_changes_nothing_wakes_nobody(consul_client: Any) -> None:
    c = consul_client
    await _seed(c)
    await c.agent.check.ttl_pass("service:web1", "ok")
    index, _ = await read(c, "/v1/health/service/web")
    waiter = asyncio.ensure_future(read(c, "/v1/health/service/web", index, wait="800ms"))
    await asyncio.sleep(0.05)
    await c.agent.check.ttl_pass("service:web1", "ok")  # same status, same output
    await _seed(c)  # the same registrations again
    again, _ = await waiter
    assert again == index


async def test_index_header_is_never_zero(consul_client: Any) -> None:
    c = consul_client
    for path in [p for p, _ in ROUTES.values()] + ["/v1/health/service/never-registered"]:
        index, _ = await read(c, path)
        assert index >= 1, path


async def test_many_watchers_one_wakes(consul_client: Any, registry: RegistryServer) -> None:
    c = consul_client
    names = [f"svc{i}" for i in range(20)]
    for n in names:
        await c.agent.service.register(n, service_id=n, port=1)
    indexes = {n: (await read(c, f"/v1/health/service/{n}"))[0] for n in names}
    waiters = {
        n: asyncio.ensure_future(read(c, f"/v1/health/service/{n}", indexes[n], wait="30s"))
        for n in names
    }
    deadline = time.monotonic() + 5
    while registry.store.hub.waiting < len(names) and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    assert registry.store.hub.waiting == len(names)
    await c.agent.service.register("svc7", service_id="svc7", port=2)
    i7, _ = await asyncio.wait_for(waiters["svc7"], 5)
    assert i7 > indexes["svc7"]
    await asyncio.sleep(0.1)
    assert [n for n, w in waiters.items() if w.done()] == ["svc7"]
    for w in waiters.values():
        w.cancel()
    await asyncio.gather(*waiters.values(), return_exceptions=True)


async def test_agent_service_blocks_on_its_content_hash(consul_client: Any) -> None:
    c = consul_client
    await _seed(c)
    first = await c.agent.service_definition("web1")
    path = "/v1/agent/service/web1"
    params = [("hash", first["ContentHash"]), ("wait", "300ms")]
    started = time.monotonic()
    same = await c.http.get(CB.json(), path, params=params)
    assert same["ContentHash"] == first["ContentHash"]
    assert time.monotonic() - started >= 0.28
    waiter = asyncio.ensure_future(
        c.http.get(CB.json(), path, params=[("hash", first["ContentHash"]), ("wait", "10s")])
    )
    await asyncio.sleep(0.05)
    assert not waiter.done()
    await _retag_web(c)
    changed = await asyncio.wait_for(waiter, 5)
    assert changed["Tags"] == ["new"] and changed["ContentHash"] != first["ContentHash"]


async def test_every_acl_read_blocks_until_acls_change(registry_admin: Any) -> None:
    for route, (path, mutate) in ACL_ROUTES.items():
        index, new_index = await _blocks_until_changed(registry_admin, route, path, mutate)
        assert new_index > index, route
