"""Active health checks (proxy/health_check.py): the pure verdict (thresholds, jitter,
the combination with the registry's health) with an injected clock and random source,
probes against real sockets, and the outbound router's checker against real backends
(an instance failing its health path stops receiving requests, and comes back).
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from aiohttp import web

from proxy.balance import Endpoint
from proxy.cluster import Cluster, StaticDirectory
from proxy.dispatch import OutboundRouter
from proxy.health_check import (
    MAX_STATUS_LINE,
    ClusterChecker,
    EndpointCheck,
    HealthCheckSpec,
    apply,
    describe,
    next_delay,
    probe,
    status_of,
)
from tests.conftest import serve_app
from tests.polling import until
from tests.test_retry_e2e import Backend, doc, make_mesh, snapshot
from tether.ports import free_port
from wire import resources as schema

SPEC = HealthCheckSpec("/healthz", interval=1.0, timeout=0.5, unhealthy_threshold=3,
                       healthy_threshold=2)  # fmt: skip


# -- the verdict ---------------------------------------------------------------------------


def test_unhealthy_after_the_threshold_of_consecutive_failures_only() -> None:
    c = EndpointCheck()
    assert c.healthy
    assert not c.record("status 503", SPEC, 1.0)
    assert not c.record(None, SPEC, 2.0)  # a success resets the streak
    assert not c.record("status 503", SPEC, 3.0)
    assert not c.record("status 503", SPEC, 4.0)
    assert c.healthy and c.failures == 2
    assert c.record("connect: refused", SPEC, 5.0)  # the third in a row: the verdict flips
    assert not c.healthy and c.last_error == "connect: refused" and c.checked_at == 5.0
    assert not c.record("status 500", SPEC, 6.0)  # already failing: no change reported


def test_healthy_again_after_the_threshold_of_consecutive_successes() -> None:
    c = EndpointCheck()
    for t in range(3):
        c.record("status 500", SPEC, float(t))
    assert not c.healthy
    assert not c.record(None, SPEC, 10.0)
    assert not c.record("status 500", SPEC, 11.0)  # the streak starts over
    assert not c.record(None, SPEC, 12.0)
    assert c.record(None, SPEC, 13.0)
    assert c.healthy and c.successes == 2 and c.probes == 7


def test_the_interval_is_jittered_within_ten_percent() -> None:
    rng = random.Random(7)
    delays = [next_delay(2.0, rng) for _ in range(500)]
    assert all(1.8 <= d <= 2.2 for d in delays)
    assert max(delays) - min(delays) > 0.3  # spread, not a constant
    # Pinned random source, pinned delay.
    assert next_delay(2.0, random.Random(1)) == next_delay(2.0, random.Random(1))


def test_an_endpoint_is_used_only_when_the_registry_and_the_check_both_say_healthy() -> None:
    ep = Endpoint("a", "127.0.0.1", 1)
    cluster = Cluster("orders", "default")
    cluster.set_endpoints([ep])
    assert ep.available(0.0)
    ep.check = EndpointCheck()
    for t in range(3):
        if ep.check.record("status 503", SPEC, float(t)):
            apply(ep)
    assert not ep.healthy and not ep.available(0.0)
    # The registry's answers (fresh Endpoint objects from discovery) keep the check's say.
    cluster.set_endpoints([Endpoint("a", "127.0.0.1", 1, healthy=True)])
    assert cluster.endpoints[0] is ep and ep.registry_healthy and not ep.healthy
    for t in range(2):
        if ep.check.record(None, SPEC, 10.0 + t):
            apply(ep)
    assert ep.healthy
    # The registry turning critical wins over a passing check, and the reverse.
    cluster.set_endpoints([Endpoint("a", "127.0.0.1", 1, healthy=False)])
    assert not ep.healthy and not ep.registry_healthy
    cluster.set_endpoints([Endpoint("a", "127.0.0.1", 1, healthy=True)])
    assert ep.healthy
    # A subset cluster re-filtering the parent's (judged) endpoints keeps both words.
    for t in range(3):
        if ep.check.record("status 503", SPEC, 20.0 + t):
            apply(ep)
    subset = Cluster("orders", "default")
    subset.set_endpoints([ep])
    subset.set_endpoints([ep])
    assert ep.registry_healthy and not ep.healthy
    d = describe(ep, 30.0)
    assert d is not None and d["healthy"] is False and d["consecutive_failures"] == 3
    assert d["last_error"] == "status 503" and d["last_probe_ago"] == 8.0


def test_status_lines() -> None:
    assert status_of(b"HTTP/1.1 200 OK\r\n") == 200
    assert status_of(b"HTTP/1.0 503 Service Unavailable\r\n") == 503
    assert status_of(b"HTTP/1.1 204\r\n") == 204
    for bad in (b"SSH-2.0-OpenSSH\r\n", b"HTTP/1.1 20x OK\r\n", b"HTTP/2 200\r\n", b"\r\n"):
        assert status_of(bad) == 0, bad


def test_the_schema_validates_health_checks_with_field_paths() -> None:
    def problems(hc: dict[str, Any], kind: str = "ServiceDefaults") -> dict[str, str]:
        res = schema.Resource.from_dict(doc(kind, "orders" if kind != "MeshConfig" else "mesh",
                                            {"healthCheck": hc}))  # fmt: skip
        return {p.path: p.message for p in schema.check_resource(res)}

    assert problems({"path": "/healthz", "interval": "2s", "timeout": "500ms"}) == {}
    assert problems({"path": "/healthz"}, "MeshConfig") == {}
    got = problems({"path": "health z", "interval": "0s", "timeout": "0s",
                    "unhealthyThreshold": 0, "healthyThreshold": 101})  # fmt: skip
    assert set(got) == {
        "spec.healthCheck.path",
        "spec.healthCheck.interval",
        "spec.healthCheck.timeout",
        "spec.healthCheck.unhealthyThreshold",
        "spec.healthCheck.healthyThreshold",
    }, got
    assert problems({"path": "/h", "interval": "1s", "timeout": "2s"}) == {
        "spec.healthCheck.timeout": "must not exceed interval"
    }
    with pytest.raises(schema.SchemaError, match="path"):
        schema.Resource.from_dict(doc("ServiceDefaults", "orders", {"healthCheck": {}}))
    with pytest.raises(schema.SchemaError, match=r"spec\.healthCheck\.interval: invalid duration"):
        problems({"path": "/h", "interval": "-1s"})


# -- probes over real sockets --------------------------------------------------------------


@pytest.fixture
async def closers() -> AsyncIterator[list[Callable[[], Any]]]:
    done: list[Callable[[], Any]] = []
    yield done
    for fn in reversed(done):
        await fn()


async def raw_server(answer: bytes, closers: list[Callable[[], Any]]) -> int:
    """A server that writes `answer` to whoever connects (or nothing, if empty)."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        if answer:
            writer.write(answer)
            await writer.drain()
        await reader.read()  # until the prober hangs up
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)

    async def close() -> None:
        server.close()
        await server.wait_closed()

    closers.append(close)
    return int(server.sockets[0].getsockname()[1])


async def test_probe_results(closers: list[Callable[[], Any]]) -> None:
    seen: list[tuple[str, str, str | None]] = []

    async def health(request: web.Request) -> web.Response:
        seen.append((request.path, request.headers["Host"], request.headers.get("User-Agent")))
        return web.Response(status=int(request.query.get("s", "200")))

    app = web.Application()
    app.router.add_get("/{tail:.*}", health)
    runner, port = await serve_app(app)
    closers.append(runner.cleanup)
    assert await probe("127.0.0.1", port, SPEC, "orders", None) is None
    assert seen == [("/healthz", "orders", "tether-health-check")]
    bad = HealthCheckSpec("/healthz?s=503", timeout=0.5)
    assert await probe("127.0.0.1", port, bad, "orders", None) == "status 503"
    refused = await probe("127.0.0.1", free_port(), SPEC, "orders", None)
    assert refused is not None and refused.startswith("connect:")
    # Bounded: a peer that never answers, one that sends an endless line, one that is
    # not HTTP, one that hangs up.
    silent = await raw_server(b"", closers)
    assert await probe("127.0.0.1", silent, HealthCheckSpec("/", timeout=0.2), "o", None) == (
        "no answer within 0.2s"
    )
    long = await raw_server(b"HTTP/1.1 200 " + b"x" * (MAX_STATUS_LINE * 4), closers)
    assert await probe("127.0.0.1", long, SPEC, "o", None) == (
        f"status line over {MAX_STATUS_LINE} bytes"
    )
    ssh = await raw_server(b"SSH-2.0-OpenSSH_9.6\r\n", closers)
    assert await probe("127.0.0.1", ssh, SPEC, "o", None) == "not an HTTP/1.x status line"


async def test_a_checker_round_judges_every_endpoint_with_bounded_concurrency(
    closers: list[Callable[[], Any]],
) -> None:
    cluster = Cluster("orders", "default")
    cluster.set_endpoints([Endpoint(f"e{i}", "127.0.0.1", 1000 + i) for i in range(20)])
    in_flight = 0
    peak = 0
    sick = {"e3", "e7"}
    ids = {1000 + i: f"e{i}" for i in range(20)}

    async def prober(ep: Endpoint, spec: HealthCheckSpec) -> str | None:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        await asyncio.sleep(0)
        in_flight -= 1
        return "status 503" if ids[ep.port] in sick else None

    now = [100.0]
    checker = ClusterChecker(
        "default", "orders", SPEC, StaticDirectory([cluster]), prober, asyncio.Semaphore(4),
        clock=lambda: now[0],
    )  # fmt: skip
    for _ in range(SPEC.unhealthy_threshold):
        await checker.check_once()
    assert peak <= 4
    out = {ep.id for ep in cluster.endpoints if not ep.available(0.0)}
    assert out == sick
    assert checker.failures == 2 * 3 and checker.successes == 18 * 3
    sick.clear()
    now[0] = 200.0
    await checker.check_once()
    assert {ep.id for ep in cluster.endpoints if not ep.available(0.0)} == {"e3", "e7"}
    await checker.check_once()
    assert all(ep.available(0.0) for ep in cluster.endpoints)
    assert cluster.endpoints[3].added_at == 200.0  # back to health: slow start's origin
    checker.stop()
    assert all(ep.check is None for ep in cluster.endpoints)


# -- through the outbound router -----------------------------------------------------------


class HealthBackend(Backend):
    sick: bool = False

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if request.path == "/healthz":
            return web.Response(status=503 if self.sick else 200)
        return await super().handle(request)


async def test_an_instance_failing_its_health_path_stops_receiving_requests_then_returns(
    closers: list[Callable[[], Any]],
) -> None:
    a = await HealthBackend.start("a")
    b = await HealthBackend.start("b")
    assert isinstance(a, HealthBackend) and isinstance(b, HealthBackend)
    closers.extend([a.runner.cleanup, b.runner.cleanup])
    hc = {"path": "/healthz", "interval": "50ms", "timeout": "40ms",
          "unhealthyThreshold": 2, "healthyThreshold": 2}  # fmt: skip
    mesh = await make_mesh([a, b], {"healthCheck": hc})
    closers.append(mesh.aclose)
    assert (await mesh.request())[0] == 200  # the first request starts the checker
    router = mesh.outbound.proxy.router
    assert isinstance(router, OutboundRouter)
    checks = router.health_checks
    await until(lambda: all(ep.check is not None for ep in mesh.cluster("orders").endpoints), 10)
    a.sick = True
    await until(lambda: not mesh.cluster("orders").endpoints[0].healthy, 10)
    a.seen.clear()
    results = [await mesh.request() for _ in range(20)]
    assert [r[2] for r in results] == ["b"] * 20 and a.seen == []
    text = mesh.stats.render_prometheus()
    assert 'tether_health_check_failing{destination="orders.default"} 1' in text
    assert 'tether_health_check_probes_total{destination="orders.default",result="failure"}' in (
        text
    )
    a.sick = False
    await until(lambda: mesh.cluster("orders").endpoints[0].healthy, 10)
    results = [await mesh.request() for _ in range(20)]
    assert {r[2] for r in results} == {"a", "b"}
    # Health checks removed from the policy: the registry's word alone again, without
    # waiting for a request (the router's sweep follows the specs).
    spec = {"loadBalancer": {"policy": "round_robin"}}
    await mesh.policy.apply(snapshot(2, [doc("ServiceDefaults", "orders", spec)]))
    await until(lambda: checks.checkers == {}, 10)
    assert all(ep.check is None for ep in mesh.cluster("orders").endpoints)
    # And back, again without a request.
    again = doc("ServiceDefaults", "orders", {**spec, "healthCheck": hc})
    await mesh.policy.apply(snapshot(3, [again]))
    await until(lambda: all(ep.check is not None for ep in mesh.cluster("orders").endpoints), 10)
