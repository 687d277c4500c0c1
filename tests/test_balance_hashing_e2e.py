"""Consistent hashing on the real outbound path: the request is the hash's input.

Three real HTTP apps behind the real outbound listener (a StaticDirectory: no registry
needed for this), balanced by ring hash or Maglev on a header, a cookie or the source
address. The outbound router builds a `PickContext` per request only for balancers that
read it, so the same key must land on the same app every time, and different keys must
spread.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web

from proxy.balance import Endpoint, HashPolicy, LoadBalancerPolicy, build_balancer
from proxy.cluster import Cluster, StaticDirectory
from proxy.listener import Listener, start_outbound
from tests.conftest import serve_app

APPS = ("app-1", "app-2", "app-3")


async def start_app(name: str) -> tuple[web.AppRunner, int]:
    async def handle(request: web.Request) -> web.Response:
        return web.Response(text=name)

    app = web.Application()
    app.router.add_get("/{tail:.*}", handle)
    return await serve_app(app)


@pytest.fixture
async def outbound() -> AsyncIterator[tuple[StaticDirectory, Listener, list[Endpoint]]]:
    apps = [await start_app(name) for name in APPS]
    endpoints = [
        Endpoint(name, "127.0.0.1", port, zone="zone-a")
        for name, (_, port) in zip(APPS, apps, strict=True)
    ]
    directory = StaticDirectory()
    listener = await start_outbound(directory, host="127.0.0.1", port=0)
    try:
        yield directory, listener, endpoints
    finally:
        await listener.aclose()
        for runner, _ in apps:
            await runner.cleanup()


def cluster(name: str, endpoints: list[Endpoint], policy: LoadBalancerPolicy, zone: str) -> Cluster:
    c = Cluster(name, "default", build_balancer(policy, zone))
    c.set_endpoints([Endpoint(e.id, e.host, e.port, zone=e.zone) for e in endpoints])
    return c


async def who(port: int, service: str, headers: dict[str, str], n: int) -> Counter[str]:
    answered: Counter[str] = Counter()
    async with aiohttp.ClientSession() as http:
        for _ in range(n):
            async with http.get(
                f"http://127.0.0.1:{port}/x?q=1", headers={"Host": service, **headers}
            ) as resp:
                answered[await resp.text() if resp.status == 200 else f"<{resp.status}>"] += 1
    return answered


@pytest.mark.parametrize("kind", ["ring_hash", "maglev"])
@pytest.mark.parametrize("zone", ["", "zone-a"])  # bare, and under the locality layer
async def test_same_key_same_endpoint(
    outbound: tuple[StaticDirectory, Listener, list[Endpoint]], kind: str, zone: str
) -> None:
    directory, listener, endpoints = outbound
    by_header = LoadBalancerPolicy(policy=kind, hash_policies=(HashPolicy("header", "x-user"),))
    by_cookie = LoadBalancerPolicy(policy=kind, hash_policies=(HashPolicy("cookie", "sid"),))
    by_source = LoadBalancerPolicy(policy=kind, hash_policies=(HashPolicy("source_ip"),))
    directory.add(cluster("byheader", endpoints, by_header, zone))
    directory.add(cluster("bycookie", endpoints, by_cookie, zone))
    directory.add(cluster("bysource", endpoints, by_source, zone))
    assert directory.clusters[("default", "byheader")].balancer.uses_context

    # One key: one endpoint, every time (without the context it would be random).
    for user in ("alice", "bob"):
        got = await who(listener.port, "byheader", {"X-User": user}, 12)
        assert len(got) == 1 and not any(k.startswith("<") for k in got), got
    got = await who(listener.port, "bycookie", {"Cookie": "a=1; sid=s-42"}, 12)
    assert len(got) == 1, got
    got = await who(listener.port, "bysource", {}, 12)  # always 127.0.0.1
    assert len(got) == 1, got

    # Many keys: spread over the endpoints.
    seen: set[str] = set()
    for i in range(30):
        seen |= set(await who(listener.port, "byheader", {"X-User": f"user-{i}"}, 1))
    assert seen == set(APPS), seen


async def test_balancers_without_context_still_spread(
    outbound: tuple[StaticDirectory, Listener, list[Endpoint]],
) -> None:
    directory, listener, endpoints = outbound
    c = cluster("rr", endpoints, LoadBalancerPolicy(policy="round_robin"), "")
    assert not c.balancer.uses_context
    directory.add(c)
    got = await who(listener.port, "rr", {"X-User": "alice"}, 30)
    assert got == Counter({name: 10 for name in APPS}), got


@pytest.mark.parametrize("kind", ["ring_hash", "maglev"])
async def test_one_keep_alive_connection_many_keys(
    outbound: tuple[StaticDirectory, Listener, list[Endpoint]], kind: str
) -> None:
    """The router keeps one pick context per client connection: each request on it must
    still be hashed on its own header and its own query string."""
    directory, listener, endpoints = outbound
    by_header = LoadBalancerPolicy(policy=kind, hash_policies=(HashPolicy("header", "x-user"),))
    by_query = LoadBalancerPolicy(
        policy=kind, hash_policies=(HashPolicy("query_parameter", "tenant"),)
    )
    directory.add(cluster("byheader", endpoints, by_header, ""))
    directory.add(cluster("byquery", endpoints, by_query, ""))
    users = [f"user-{i}" for i in range(12)]
    # Where each key goes, each asked on a connection of its own.
    expected: dict[str, str] = {}
    for user in users:
        (expected[user],) = await who(listener.port, "byheader", {"X-User": user}, 1)
    assert len(set(expected.values())) > 1, expected  # the keys do spread
    tenants: dict[str, str] = {}
    async with aiohttp.ClientSession() as http:
        for user in users:
            url = f"http://127.0.0.1:{listener.port}/t?tenant={user}"
            async with http.get(url, headers={"Host": "byquery"}) as resp:
                tenants[user] = await resp.text()
    assert len(set(tenants.values())) > 1, tenants
    # The same keys, interleaved, over one keep-alive connection.
    proxy = listener.proxy
    accepted = proxy.stats.downstream_total[proxy.name]
    connector = aiohttp.TCPConnector(limit=1)
    async with aiohttp.ClientSession(connector=connector) as http:
        for user in users + users[::-1]:
            async with http.get(
                f"http://127.0.0.1:{listener.port}/x", headers={"Host": "byheader", "X-User": user}
            ) as resp:
                assert await resp.text() == expected[user], user
            url = f"http://127.0.0.1:{listener.port}/t?tenant={user}"
            async with http.get(url, headers={"Host": "byquery"}) as resp:
                assert await resp.text() == tenants[user], user
    assert proxy.stats.downstream_total[proxy.name] == accepted + 1  # one connection
