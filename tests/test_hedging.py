"""Hedged requests (proxy/hedging.py): the pure decision, and races through a real
outbound listener against aiohttp backends whose answers the test releases (an
`asyncio.Event` per backend), so which head comes first is decided by the test, not by
timing. Each backend records what reached it, and whether the proxy hung up on it.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from controlplane.validation import validate
from proxy.cluster import Cluster
from proxy.cluster_spec import PoolKeys, compile_specs
from proxy.hedging import (
    ANSWERED,
    BUDGET,
    INCOMPLETE,
    RECOMPUTE_EVERY,
    WINDOW,
    HedgeSpec,
    Hedging,
    may_hedge,
    percentile_delay,
)
from proxy.policy import compile_table, decode
from proxy.pool import PoolPolicy
from proxy.resilience import ResilienceState
from proxy.retry import NOT_REPLAYABLE, RetryBudget
from tests.conftest import serve_app
from tests.polling import until
from tests.test_retry_e2e import make_mesh
from wire import resources as schema

# -- the decision ----------------------------------------------------------------------------


def test_which_requests_are_hedged() -> None:
    spec = HedgeSpec(0.05)
    assert spec.applies(b"GET") and spec.applies(b"HEAD") and spec.applies(b"OPTIONS")
    assert not spec.applies(b"POST") and not spec.applies(b"PUT")
    assert HedgeSpec(0.05, idempotent=True).applies(b"POST")


def test_may_hedge_with_an_injected_clock() -> None:
    budget = RetryBudget(ratio=0.0, window=10.0, min_per_second=1)
    assert may_hedge(True, True, True, budget, 100.0) == ""
    assert may_hedge(False, True, True, budget, 100.0) == ANSWERED
    assert may_hedge(True, False, True, budget, 100.0) == INCOMPLETE
    assert may_hedge(True, True, False, budget, 100.0) == NOT_REPLAYABLE
    for _ in range(10):  # 1 a second over the 10 s window
        budget.spend(100.0)
    assert may_hedge(True, True, True, budget, 100.0) == BUDGET
    assert may_hedge(True, True, True, budget, 111.0) == ""  # the window moved on


def test_the_schema_takes_hedging_on_services_and_rules_with_field_paths() -> None:
    def problems(kind: str, spec: dict[str, Any]) -> dict[str, str]:
        doc = {"apiVersion": "tether.dev/v1alpha1", "kind": kind,
               "metadata": {"name": "orders"}, "spec": spec}  # fmt: skip
        return {p.path: p.message for p in schema.check_resource(schema.Resource.from_dict(doc))}

    assert problems("ServiceDefaults", {"hedging": {"delay": "50ms"}}) == {}
    rule = {"rules": [{"hedging": {"delay": "20ms", "idempotent": True}}]}
    assert problems("Route", rule) == {}
    assert problems("ServiceDefaults", {"hedging": {"delay": "0s", "maxHedges": 2}}) == {
        "spec.hedging.delay": "must be greater than zero",
        "spec.hedging.maxHedges": "must be 1 (one hedge per request)",
    }


def test_percentile_delay_is_the_nearest_rank_within_floor_and_ceiling() -> None:
    spec = HedgeSpec(0.0, percentile=90, min_delay=0.002, max_delay=0.1, min_samples=10)
    ms = [i / 1000 for i in range(1, 11)]  # 1..10 ms
    assert percentile_delay(ms[:9], spec) == 0.1  # too few yet: the ceiling
    assert percentile_delay(ms, spec) == 0.009  # 90th of ten: the 9th
    assert percentile_delay(list(reversed(ms)), spec) == 0.009  # order does not matter
    assert percentile_delay([0.0005] * 10, spec) == 0.002  # the floor
    assert percentile_delay([5.0] * 10, spec) == 0.1  # the ceiling
    p50 = HedgeSpec(0.0, percentile=50, min_samples=1)
    assert percentile_delay([0.03], p50) == 0.03
    assert percentile_delay([], HedgeSpec(0.0, percentile=50, min_samples=1)) == 0.25


def test_a_percentile_hedging_follows_the_latest_latencies() -> None:
    spec = HedgeSpec(0.0, percentile=95, min_delay=0.001, max_delay=0.5, min_samples=20)
    h = Hedging(spec, "orders")
    assert h.delay() == 0.5  # nothing seen yet: the ceiling
    for _ in range(19):
        h.observe(0.010)
    assert h.delay() == 0.5
    h.observe(0.010)  # the 20th: the percentile is used from now on
    assert h.delay() == 0.010
    for _ in range(WINDOW):  # the destination slows down: the old latencies leave
        h.observe(0.040)
    assert len(h.samples) == WINDOW and h.delay() == 0.040
    # 10 fast ones among the 128: the 95th percentile is still the slow one; recomputed
    # only every RECOMPUTE_EVERY latencies.
    for _ in range(RECOMPUTE_EVERY - 1):
        h.observe(0.002)
    assert h.delay() == 0.040
    h.spec = dataclasses.replace(spec, percentile=5)  # a new snapshot: computed again
    assert h.delay() == 0.002
    static = Hedging(HedgeSpec(0.03), "orders")
    static.observe(1.0)
    assert static.delay() == 0.03 and static.samples == []  # a static delay keeps none


def test_the_schema_takes_a_delay_percentile_validated() -> None:
    def problems(hedging: dict[str, Any]) -> dict[str, str]:
        doc = {"apiVersion": "tether.dev/v1alpha1", "kind": "ServiceDefaults",
               "metadata": {"name": "orders"}, "spec": {"hedging": hedging}}  # fmt: skip
        try:
            res = schema.Resource.from_dict(doc)
        except schema.SchemaError as e:
            return {p.path: p.message for p in e.problems}
        return {p.path: p.message for p in schema.check_resource(res)}

    ok = {"delayPercentile": 95, "minDelay": "2ms", "maxDelay": "80ms", "minSamples": 50}
    assert problems(ok) == {}
    res = schema.Resource.from_dict(
        {
            "apiVersion": "tether.dev/v1alpha1",
            "kind": "ServiceDefaults",
            "metadata": {"name": "orders"},
            "spec": {"hedging": ok},
        }
    )
    assert HedgeSpec.of(res.spec.hedging) == HedgeSpec(  # type: ignore[union-attr, arg-type]
        0.0, percentile=95, min_delay=0.002, max_delay=0.08, min_samples=50
    )
    both = problems({"delay": "50ms", "delayPercentile": 95})
    assert list(both) == ["spec.hedging"] and "exactly one of delay, delayPercentile" in str(both)
    assert list(problems({})) == ["spec.hedging"]
    assert problems(
        {"delayPercentile": 100, "minDelay": "90ms", "maxDelay": "80ms", "minSamples": 129}
    ) == {
        "spec.hedging.delayPercentile": "must be between 0 and 100 (both excluded)",
        "spec.hedging.minDelay": "must not be above maxDelay",
        "spec.hedging.minSamples": "must be between 1 and 128",
    }
    assert problems({"delayPercentile": 0, "minDelay": "0s", "minSamples": 0}) == {
        "spec.hedging.delayPercentile": "must be between 0 and 100 (both excluded)",
        "spec.hedging.minDelay": "must be greater than zero",
        "spec.hedging.minSamples": "must be between 1 and 128",
    }


def test_meshconfig_takes_hedging_as_the_mesh_wide_default_with_field_paths() -> None:
    def problems(spec: dict[str, Any]) -> dict[str, str]:
        doc = {"apiVersion": "tether.dev/v1alpha1", "kind": "MeshConfig",
               "metadata": {"name": "mesh"}, "spec": spec}  # fmt: skip
        return {p.path: p.message for p in schema.check_resource(schema.Resource.from_dict(doc))}

    assert problems({"hedging": {"delay": "50ms"}}) == {}
    assert problems({"hedging": {"delay": "0s", "maxHedges": 0}}) == {
        "spec.hedging.delay": "must be greater than zero",
        "spec.hedging.maxHedges": "must be 1 (one hedge per request)",
    }


MESH_HEDGING = """\
apiVersion: tether.dev/v1alpha1
kind: MeshConfig
metadata:
  name: mesh
spec:
  hedging:
    delay: 0s
"""


def test_an_invalid_mesh_hedging_is_refused_with_its_line() -> None:
    out = validate([("mesh.yaml", MESH_HEDGING)])
    assert [(p.path, p.line) for p in out.errors] == [("spec.hedging.delay", 7)], out.errors
    assert validate([("mesh.yaml", MESH_HEDGING.replace("0s", "90ms"))]).ok


def _doc(kind: str, name: str, spec: dict[str, Any]) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name}
    if kind != "MeshConfig":
        meta["namespace"] = "default"
    return {"apiVersion": "tether.dev/v1alpha1", "kind": kind, "metadata": meta, "spec": spec}


def test_hedging_precedence_route_over_service_over_mesh() -> None:
    resources = decode(
        [
            _doc("MeshConfig", "mesh", {"hedging": {"delay": "90ms"}}),
            _doc("ServiceDefaults", "orders", {"hedging": {"delay": "50ms"}}),
            _doc("ServiceDefaults", "other", {"retries": {"attempts": 3}}),
            _doc(
                "Route",
                "orders",
                {
                    "rules": [
                        {"match": {"path": {"prefix": "/fast"}}, "hedging": {"delay": "20ms"}},
                        {"match": {"path": {"prefix": "/"}}},
                    ]
                },
            ),
        ]
    )
    table, mesh = compile_table(resources, 1)
    specs = compile_specs(table, mesh, PoolPolicy(), PoolKeys())
    orders, other = specs.get("default", "orders"), specs.get("default", "other")
    assert orders.hedging == HedgeSpec(0.05)  # the service's own over the mesh's
    assert other.hedging == HedgeSpec(0.09)  # ServiceDefaults without hedging: the mesh's
    assert specs.default.hedging == HedgeSpec(0.09)  # no ServiceDefaults at all
    fast, rest = table.services[("default", "orders")].rules
    assert fast.hedge == HedgeSpec(0.02) and rest.hedge is None
    # What a request gets at the route (proxy/policy_router.py): the rule's own hedging
    # over the service's; a rule without one keeps the service's.
    state = ResilienceState()
    cluster = Cluster("orders", "default")
    base = state.make(("default", "orders"), cluster, None, None, None, orders.hedging)
    assert base is not None and base.hedging is not None
    key = ("default", "orders", "orders#0")
    fast_res = state.for_rule(base, cluster, key, fast.retry, fast.circuit_breaker, fast.hedge)
    rest_res = state.for_rule(base, cluster, (*key[:2], "orders#1"), None, None, rest.hedge)
    assert fast_res.hedging is not None and fast_res.hedging.spec.delay == 0.02
    assert rest_res.hedging is base.hedging and base.hedging.spec.delay == 0.05
    # Without any hedging written anywhere, none.
    bare, _ = compile_table(decode([_doc("ServiceDefaults", "orders", {})]), 2)
    bare_specs = compile_specs(bare, None, PoolPolicy(), PoolKeys())
    assert bare_specs.get("default", "orders").hedging is None


# -- races through the listener ----------------------------------------------------------------


@dataclass
class GatedBackend:
    """Answers each request once `gate` is set (with `reset`: hangs up instead)."""

    name: str
    gate: asyncio.Event = field(default_factory=asyncio.Event)
    mode: str = "ok"  # ok | reset
    seen: list[tuple[str, str | None]] = field(default_factory=list)
    hung_up: int = 0
    runner: Any = None
    port: int = 0

    async def handle(self, request: web.Request) -> web.StreamResponse:
        await request.read()
        self.seen.append((request.method, request.headers.get("x-tether-attempt")))
        try:
            await self.gate.wait()
        except asyncio.CancelledError:
            self.hung_up += 1  # the proxy gave this attempt up
            raise
        if self.mode == "reset":
            assert request.transport is not None
            request.transport.abort()
            return web.Response()
        return web.Response(text=self.name)

    @classmethod
    async def start(cls, name: str, **kw: Any) -> GatedBackend:
        b = cls(name, **kw)
        app = web.Application(handler_args={"handler_cancellation": True})
        app.router.add_route("*", "/{tail:.*}", b.handle)
        b.runner, b.port = await serve_app(app)
        return b


HEDGING = {"hedging": {"delay": "20ms"}, "retries": {"retryOn": ["5xx"]}}


async def two(cleanup: list[Callable[[], Any]]) -> tuple[GatedBackend, GatedBackend]:
    a = await GatedBackend.start("a")
    b = await GatedBackend.start("b")
    cleanup.extend([a.runner.cleanup, b.runner.cleanup])
    return a, b


async def raced(a: GatedBackend, b: GatedBackend) -> tuple[GatedBackend, GatedBackend]:
    """Once both got the request: (the first attempt's backend, the hedge's)."""
    await until(lambda: len(a.seen) == 1 and len(b.seen) == 1, 10)
    first, hedge = (a, b) if a.seen[0][1] is None else (b, a)
    assert first.seen == [("GET", None)] and hedge.seen == [("GET", "2")]
    return first, hedge


def hedge_metrics(mesh: Any) -> dict[str, float]:
    out = {}
    for line in mesh.stats.render_prometheus().splitlines():
        if line.startswith("tether_hedges") and 'destination="orders.default"' in line:
            name, value = line.rsplit(" ", 1)
            out[name.split("{")[0] + name[name.find("reason=") :].rstrip("}")] = float(value)
    return out


async def test_the_hedges_head_first_wins_and_the_first_attempt_is_cut(
    cleanup: list[Callable[[], Any]],
) -> None:
    a, b = await two(cleanup)
    mesh = await make_mesh([a, b], HEDGING)  # type: ignore[list-item]
    cleanup.append(mesh.aclose)
    pending = asyncio.ensure_future(mesh.request())
    # The first attempt goes to one; 20 ms later the hedge goes to the other.
    first, hedge = await raced(a, b)
    hedge.gate.set()
    assert await pending == (200, "", hedge.name)
    await until(lambda: first.hung_up == 1, 10)  # its connection aborted, not pooled
    m = hedge_metrics(mesh)
    assert m["tether_hedges_total"] == 1 and m["tether_hedges_won_total"] == 1
    ds = mesh.destination("orders.default")
    assert ds.attempts == 2
    # The next requests find both backends' pools usable.
    first.gate.set()
    assert {(await mesh.request())[2] for _ in range(4)} == {"a", "b"}


async def test_the_first_attempts_head_first_wins_and_the_hedge_is_cancelled(
    cleanup: list[Callable[[], Any]],
) -> None:
    a, b = await two(cleanup)
    mesh = await make_mesh([a, b], HEDGING)  # type: ignore[list-item]
    cleanup.append(mesh.aclose)
    pending = asyncio.ensure_future(mesh.request())
    first, hedge = await raced(a, b)
    first.gate.set()
    assert await pending == (200, "", first.name)
    await until(lambda: hedge.hung_up == 1, 10)
    m = hedge_metrics(mesh)
    assert m["tether_hedges_total"] == 1 and m["tether_hedges_won_total"] == 0


async def test_posts_are_not_hedged_and_a_failed_first_attempt_waits_for_the_hedge(
    cleanup: list[Callable[[], Any]],
) -> None:
    a, b = await two(cleanup)
    mesh = await make_mesh([a, b], HEDGING)  # type: ignore[list-item]
    cleanup.append(mesh.aclose)
    pending = asyncio.ensure_future(mesh.request("POST", b"order-1"))
    await until(lambda: len(a.seen) + len(b.seen) == 1, 10)
    a.gate.set()
    b.gate.set()
    assert (await pending)[0] == 200
    assert len(a.seen) + len(b.seen) == 1
    assert hedge_metrics(mesh).get("tether_hedges_total", 0) == 0
    # The first attempt resets after the hedge went out: the request waits for the
    # hedge rather than retrying.
    for x in (a, b):
        x.gate.clear()
        x.seen.clear()
    pending = asyncio.ensure_future(mesh.request())
    first, hedge = await raced(a, b)
    first.mode = "reset"
    first.gate.set()
    await until(
        lambda: mesh.destination("orders.default").attempts == 3, 10
    )  # the POST's, then these two
    hedge.gate.set()
    assert await pending == (200, "", hedge.name)
    assert len(first.seen) == 1  # not retried meanwhile


async def test_no_hedge_past_the_budget(cleanup: list[Callable[[], Any]]) -> None:
    a, b = await two(cleanup)
    policy = {"hedging": {"delay": "20ms"},
              "retries": {"budget": {"ratio": 0, "minPerSecond": 0}}}  # fmt: skip
    mesh = await make_mesh([a, b], policy)  # type: ignore[list-item]
    cleanup.append(mesh.aclose)
    pending = asyncio.ensure_future(mesh.request())
    await until(lambda: hedge_metrics(mesh).get('tether_hedges_refused_totalreason="budget"'), 10)
    a.gate.set()
    b.gate.set()
    assert (await pending)[0] == 200
    assert len(a.seen) + len(b.seen) == 1


async def test_a_percentile_delay_takes_over_from_the_ceiling_once_latencies_are_in(
    cleanup: list[Callable[[], Any]],
) -> None:
    """Until 4 requests have ended the delay is maxDelay (60 s: no hedge within the test);
    then it is their median within minDelay, so a held request is hedged."""
    a, b = await two(cleanup)
    a.gate.set()
    b.gate.set()
    policy = {"hedging": {"delayPercentile": 50, "minDelay": "20ms", "maxDelay": "60s",
                          "minSamples": 4}}  # fmt: skip
    mesh = await make_mesh([a, b], policy)  # type: ignore[list-item]
    cleanup.append(mesh.aclose)
    for _ in range(4):
        assert (await mesh.request())[0] == 200
    router: Any = mesh.outbound.router  # the policy router (proxy/dispatch.py)
    hedging = next(iter(router.resilience.hedgings().values()))
    assert len(hedging.samples) == 4 and hedging.delay() < 60
    assert hedge_metrics(mesh).get("tether_hedges_total", 0) == 0
    a.gate.clear()
    b.gate.clear()
    na, nb = len(a.seen), len(b.seen)
    pending = asyncio.ensure_future(mesh.request())
    await until(lambda: len(a.seen) + len(b.seen) == na + nb + 2, 10)
    # The first attempt on one, the hedge (attempt 2) on the other.
    assert sorted(s[1] or "" for s in a.seen[na:] + b.seen[nb:]) == ["", "2"]
    assert len(a.seen) == na + 1 and len(b.seen) == nb + 1
    a.gate.set()
    b.gate.set()
    assert (await pending)[0] == 200
    assert hedge_metrics(mesh)["tether_hedges_total"] == 1
