"""Retries, per-try timeouts, circuit breakers and outlier ejection through a real outbound
listener: aiohttp backends on ephemeral ports, the policy router with an applied
snapshot, aiohttp clients. Each backend records what it received (method, body, the
`x-tether-attempt` header), so the tests check what reached the applications, not only
what the client saw. No fixed sleeps: conditions are polled (`tests.polling.until`).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from proxy.balance import Endpoint
from proxy.balance.outlier import HEALTHY, TRIAL
from proxy.cluster import Cluster, StaticDirectory
from proxy.policy import Policy
from tests.conftest import black_hole_ports, free_port, serve_app
from tests.polling import until
from tests.sidecar_harness import Mesh
from wire import push as protocol


def doc(kind: str, name: str, spec: dict[str, Any]) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name}
    if kind != "MeshConfig":
        meta["namespace"] = "default"
    return {"apiVersion": "tether.dev/v1alpha1", "kind": kind, "metadata": meta, "spec": spec}


def snapshot(version: int, docs: list[dict[str, Any]]) -> protocol.Snapshot:
    text = protocol.canonical_json(docs)
    return protocol.Snapshot(version, protocol.content_hash(text), f"n{version}", tuple(docs))


@dataclass
class Backend:
    """An app that answers `status` (or behaves as `mode` says) and records requests."""

    name: str
    status: int = 200
    mode: str = "ok"  # ok | reset | slow
    delay: float = 0.0
    seen: list[tuple[str, bytes, str | None]] = field(default_factory=list)
    runner: Any = None
    port: int = 0

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.seen.append((request.method, body, request.headers.get("x-tether-attempt")))
        if self.mode == "reset":
            assert request.transport is not None
            request.transport.abort()
            return web.Response()
        if self.mode == "slow":
            await asyncio.sleep(self.delay)
        return web.Response(status=self.status, text=self.name)

    @classmethod
    async def start(cls, name: str, **kw: Any) -> Backend:
        b = cls(name, **kw)
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", b.handle)
        b.runner, b.port = await serve_app(app)
        return b


async def make_mesh(
    backends: list[Backend], defaults: dict[str, Any], extra: list[dict[str, Any]] | None = None
) -> Mesh:
    cluster = Cluster("orders", "default")
    cluster.set_endpoints([Endpoint(f"e{i}", "127.0.0.1", b.port) for i, b in enumerate(backends)])
    directory = StaticDirectory([cluster])
    policy = Policy(directory)
    spec = {"loadBalancer": {"policy": "round_robin"}, **defaults}
    await policy.apply(snapshot(1, [doc("ServiceDefaults", "orders", spec), *(extra or [])]))
    return await Mesh.with_policy(directory, policy)


async def start(cleanup: list[Callable[[], Any]], *backends: Backend) -> None:
    for b in backends:
        cleanup.append(b.runner.cleanup)


async def test_a_failed_get_is_retried_on_another_endpoint_with_its_attempt_number(
    cleanup: list[Callable[[], Any]],
) -> None:
    bad = await Backend.start("bad", status=503)
    good = await Backend.start("good")
    await start(cleanup, bad, good)
    mesh = await make_mesh([bad, good], {"retries": {"retryOn": ["gateway-error"]}})
    cleanup.append(mesh.aclose)
    results = [await mesh.request() for _ in range(20)]
    assert all(r[:1] == (200,) and r[2] == "good" for r in results), results
    # Every request that met `bad` first went to `good` as attempt 2; none the reverse.
    assert bad.seen and all(attempt is None for _, _, attempt in bad.seen)
    retried = [a for _, _, a in good.seen if a is not None]
    assert retried == ["2"] * len(bad.seen)
    ds = mesh.destination("orders.default")
    assert ds.attempts == 20 + len(bad.seen) and ds.retries == len(bad.seen)
    text = mesh.stats.render_prometheus()
    line = [x for x in text.splitlines() if x.startswith("tether_retries_total{")]
    assert line and line[0].endswith(f'destination="orders.default",subset=""}} {len(bad.seen)}')


async def test_post_is_not_retried_unless_the_policy_says_so_and_its_body_is_replayed(
    cleanup: list[Callable[[], Any]],
) -> None:
    bad = await Backend.start("bad", status=503)
    good = await Backend.start("good")
    await start(cleanup, bad, good)
    mesh = await make_mesh([bad, good], {"retries": {"retryOn": ["5xx"]}})
    cleanup.append(mesh.aclose)
    statuses = [(await mesh.request("POST", b"order-%d" % i))[0] for i in range(6)]
    # Not idempotent: each POST reached exactly one app, once; the 503s came through.
    assert sorted(statuses) == [200] * 3 + [503] * 3
    assert len(bad.seen) + len(good.seen) == 6
    assert mesh.destination("orders.default").retries_refused == {"not_idempotent": 3}
    # retryNonIdempotent: the same body goes to the other app.
    retry = {"retryOn": ["5xx"], "retryNonIdempotent": True}
    spec = {"retries": retry, "loadBalancer": {"policy": "round_robin"}}
    await mesh.policy.apply(snapshot(2, [doc("ServiceDefaults", "orders", spec)]))
    bad.seen.clear()
    good.seen.clear()
    for i in range(6):
        assert await mesh.request("POST", b"x" * 1000 + b"-%d" % i) == (200, "", "good")
    assert [b for _, b, _ in bad.seen] == [
        b for _, b, a in good.seen if a == "2"
    ]  # the replayed bodies are the bodies the first attempt carried
    assert len(good.seen) == 6


async def test_a_body_over_the_buffer_limit_is_never_retried(
    cleanup: list[Callable[[], Any]],
) -> None:
    bad = await Backend.start("bad", status=503)
    await start(cleanup, bad)
    retry = {"retryOn": ["5xx"], "bufferLimit": 100, "budget": {"minPerSecond": 100}}
    mesh = await make_mesh([bad], {"retries": retry})
    cleanup.append(mesh.aclose)
    assert (await mesh.request("PUT", b"y" * 101))[0] == 503
    assert len(bad.seen) == 1
    assert mesh.destination("orders.default").retries_refused == {"body_too_large": 1}
    assert (await mesh.request("PUT", b"y" * 100))[0] == 503
    assert len(bad.seen) == 3  # a body within the limit: two attempts (same endpoint)


async def test_connect_failures_and_resets_are_retried(cleanup: list[Callable[[], Any]]) -> None:
    dead_port = free_port()  # nothing listens
    reset = await Backend.start("reset", mode="reset")
    good = await Backend.start("good")
    await start(cleanup, reset, good)
    dead = Backend("dead", port=dead_port)
    mesh = await make_mesh([dead, reset, good], {"retries": {"attempts": 3}})
    cleanup.append(mesh.aclose)
    results = [await mesh.request() for _ in range(12)]
    assert all(r == (200, "", "good") for r in results), results
    assert reset.seen and mesh.destination("orders.default").retries >= len(reset.seen)


async def test_budget_exhausted_answers_with_the_original_status(
    cleanup: list[Callable[[], Any]],
) -> None:
    bad = await Backend.start("bad", status=502)
    await start(cleanup, bad)
    retry = {"retryOn": ["gateway-error"], "budget": {"ratio": 0.0, "minPerSecond": 0}}
    mesh = await make_mesh([bad], {"retries": retry})
    cleanup.append(mesh.aclose)
    status, error, body = await mesh.request()
    assert (status, error) == (502, "retry_budget_exhausted"), body
    assert json.loads(body)["error"] == "retry_budget_exhausted"
    assert len(bad.seen) == 1
    assert mesh.destination("orders.default").retries_refused == {"budget": 1}


async def test_per_try_timeout_retries_elsewhere_and_answers_its_own_reason(
    cleanup: list[Callable[[], Any]],
) -> None:
    slow = await Backend.start("slow", mode="slow", delay=5.0)
    good = await Backend.start("good")
    await start(cleanup, slow, good)
    retry = {"perTryTimeout": "200ms", "retryOn": ["gateway-error"]}
    mesh = await make_mesh([slow, good], {"retries": retry})
    cleanup.append(mesh.aclose)
    results = [await mesh.request() for _ in range(4)]
    assert all(r == (200, "", "good") for r in results), results
    # One attempt only: the per-try timeout's own reply.
    retry = {"perTryTimeout": "200ms", "attempts": 1}
    await mesh.policy.apply(snapshot(2, [doc("ServiceDefaults", "orders", {"retries": retry})]))
    mesh.cluster("orders").set_endpoints([Endpoint("s", "127.0.0.1", slow.port)])
    status, error, _ = await mesh.request()
    assert (status, error) == (504, "per_try_timeout")
    assert mesh.stats.local_replies.get("per_try_timeout") == 1


async def test_connect_timeout_has_its_own_reply(cleanup: list[Callable[[], Any]]) -> None:
    with black_hole_ports(1) as (port,):
        mesh = await make_mesh([Backend("hole", port=port)], {"connectTimeout": "200ms"})
        cleanup.append(mesh.aclose)
        status, error, body = await mesh.request()
        assert (status, error) == (503, "upstream_connect_timeout"), body


async def test_circuit_breaker_sheds_past_max_active_requests(
    cleanup: list[Callable[[], Any]],
) -> None:
    slow = await Backend.start("slow", mode="slow", delay=0.5)
    await start(cleanup, slow)
    mesh = await make_mesh([slow], {"circuitBreaker": {"maxActiveRequests": 2}})
    cleanup.append(mesh.aclose)
    results = await asyncio.gather(*(mesh.request() for _ in range(5)))
    statuses = sorted(r[0] for r in results)
    assert statuses == [200, 200, 503, 503, 503], results
    assert {r[1] for r in results if r[0] == 503} == {"overflow"}
    text = mesh.stats.render_prometheus()
    assert (
        'tether_circuit_breaker_overflows_total{destination="orders.default",rule="",'
        'limit="max_active_requests"} 3'
    ) in text
    # Slots are given back: the next requests pass.
    assert (await mesh.request())[0] == 200


async def test_route_rule_limits_and_retries_apply_on_top_of_the_service(
    cleanup: list[Callable[[], Any]],
) -> None:
    slow = await Backend.start("slow", mode="slow", delay=0.5)
    await start(cleanup, slow)
    route = doc(
        "Route",
        "orders",
        {
            "rules": [
                {"match": {"path": {"prefix": "/x"}}, "circuitBreaker": {"maxActiveRequests": 1}},
            ]
        },
    )
    mesh = await make_mesh([slow], {"circuitBreaker": {"maxActiveRequests": 10}}, [route])
    cleanup.append(mesh.aclose)
    results = await asyncio.gather(*(mesh.request() for _ in range(3)))
    assert sorted(r[0] for r in results) == [200, 503, 503], results


async def test_consecutive_failures_eject_and_a_trial_brings_the_endpoint_back(
    cleanup: list[Callable[[], Any]],
) -> None:
    flaky = await Backend.start("flaky", status=500)
    good = await Backend.start("good")
    await start(cleanup, flaky, good)
    policy = {
        "retries": {"retryOn": ["5xx"]},
        "outlierDetection": {
            "consecutive5xx": 3,
            "baseEjectionTime": "300ms",
            "maxEjectionPercent": 50,
        },
    }
    mesh = await make_mesh([flaky, good], policy)
    cleanup.append(mesh.aclose)
    ep = mesh.cluster("orders").endpoints[0]
    for _ in range(8):
        assert (await mesh.request())[0] == 200
    assert ep.outlier is not None and ep.outlier.state != HEALTHY
    assert ep.outlier.reason == "consecutive_5xx"
    text = mesh.stats.render_prometheus()
    assert 'tether_outlier_ejected{destination="orders.default"} 1' in text
    assert 'tether_outlier_ejections_total{destination="orders.default",' in text
    seen = len(flaky.seen)
    # Healed: after the ejection time, one trial request goes to it and brings it back.
    flaky.status = 200

    async def back() -> bool:
        await mesh.request()
        return ep.outlier.state == HEALTHY

    await until(back, 10, "the healed endpoint back in rotation")
    assert len(flaky.seen) == seen + 1  # exactly one trial request before the return
    assert ep.outlier.state not in (TRIAL,)
    assert ep.outlier.times_ejected == 1
