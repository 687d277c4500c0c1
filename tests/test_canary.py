"""Canary analysis (controlplane/canary.py): the pure decisions with an injected clock,
the live weights sent to sidecars, and the lock that keeps two control planes from
driving one analysis (real registry sessions)."""

from __future__ import annotations

from pathlib import Path

import pytest

from controlplane.canary import (
    CANARY,
    PROGRESSING,
    PROMOTED,
    ROLLED_BACK,
    CanaryController,
    CanaryNumbers,
    advance,
    canary_numbers,
    with_live_weights,
)
from controlplane.meshstats import Aggregate, Counts
from controlplane.schema import parse_resources
from controlplane.server import ControlPlane, ControlPlaneSpec, RegistryAddress
from controlplane.validation import validate
from tests.conftest import serving_registry
from tests.polling import until
from wire.resources import TrafficSplitSpec

SPLIT = """apiVersion: tether.dev/v1alpha1
kind: TrafficSplit
metadata: {name: orders}
spec:
  subsets:
    - {name: v1, selector: {version: v1}, weight: 90}
    - {name: v2, selector: {version: v2}, weight: 10}
  analysis:
    canary: v2
    stable: v1
    steps: [10, 50, 100]
    interval: 10s
    minRequests: 20
    minSuccessRate: 99
    maxP99: 500ms
"""


def split() -> TrafficSplitSpec:
    (res,) = parse_resources(SPLIT)
    assert isinstance(res.spec, TrafficSplitSpec)
    return res.spec


GOOD = CanaryNumbers(100, 1.0, 0.05)


def test_a_healthy_canary_steps_up_each_interval_then_is_promoted() -> None:
    sp = split()
    st = advance(sp, 1, None, CanaryNumbers(), 1000.0)
    assert st is not None and st["phase"] == PROGRESSING
    assert st["weights"] == {"v1": 90, "v2": 10}
    assert advance(sp, 1, {"analysis": st}, GOOD, 1009.0) is None  # held for the interval
    st = advance(sp, 1, {"analysis": st}, GOOD, 1010.0)
    assert st is not None and st["weights"] == {"v1": 50, "v2": 50} and st["step"] == 1
    st = advance(sp, 1, {"analysis": st}, GOOD, 1020.0)
    assert st is not None and st["weights"] == {"v1": 0, "v2": 100}
    st = advance(sp, 1, {"analysis": st}, GOOD, 1030.0)
    assert st is not None and st["phase"] == PROMOTED and st["weights"] == {"v1": 0, "v2": 100}
    assert [h["event"] for h in st["history"]] == ["started", "advanced", "advanced", "promoted"]
    assert advance(sp, 1, {"analysis": st}, GOOD, 2000.0) is None  # done


def test_too_few_requests_hold_the_step() -> None:
    sp = split()
    st = advance(sp, 1, None, CanaryNumbers(), 0.0)
    few = CanaryNumbers(19, 0.5, 2.0)  # bad numbers, but not enough of them to judge
    assert advance(sp, 1, {"analysis": st}, few, 100.0) is None


@pytest.mark.parametrize(
    ("numbers", "reason"),
    [
        (CanaryNumbers(100, 0.8, 0.01), "success rate 80.00% below 99%"),
        (CanaryNumbers(100, 1.0, 0.75), "p99 750.0ms above 500ms"),
    ],
)
def test_a_breach_rolls_back_at_once_with_its_numbers(numbers: CanaryNumbers, reason: str) -> None:
    sp = split()
    st = advance(sp, 1, None, CanaryNumbers(), 0.0)
    st = advance(sp, 1, {"analysis": st}, GOOD, 10.0)
    assert st is not None and st["step"] == 1
    st = advance(sp, 1, {"analysis": st}, numbers, 10.5)  # mid-step: no waiting
    assert st is not None and st["phase"] == ROLLED_BACK
    assert st["weights"] == {"v1": 100, "v2": 0}
    last = st["history"][-1]
    assert last["event"] == "rolled back" and last["reason"] == reason
    assert last["requests"] == 100
    assert advance(sp, 1, {"analysis": st}, GOOD, 100.0) is None  # stays rolled back


def test_a_new_generation_starts_a_new_analysis() -> None:
    sp = split()
    st = advance(sp, 1, None, CanaryNumbers(), 0.0)
    st = advance(sp, 1, {"analysis": st}, CanaryNumbers(100, 0.5, 0.1), 1.0)
    assert st is not None and st["phase"] == ROLLED_BACK
    again = advance(sp, 2, {"analysis": st}, GOOD, 2.0)
    assert again is not None and again["phase"] == PROGRESSING and again["generation"] == 2


def test_live_weights_replace_the_written_ones_only_when_they_fit() -> None:
    (res,) = parse_resources(SPLIT)
    doc = res.to_dict()
    status = {"analysis": {"weights": {"v1": 50, "v2": 50}}}
    out = with_live_weights(doc, status)
    assert [s["weight"] for s in out["spec"]["subsets"]] == [50, 50]
    assert [s["weight"] for s in doc["spec"]["subsets"]] == [90, 10]  # not changed in place
    assert with_live_weights(doc, {"analysis": {"weights": {"v3": 100}}}) == doc
    assert with_live_weights(doc, None) == doc


def test_canary_numbers_sum_every_callers_edge_to_the_subset() -> None:
    agg = Aggregate()
    agg.edges[("a.default", "orders.default", "v2")] = Counts(classes=[0, 0, 90, 0, 0, 10])
    agg.edges[("b.default", "orders.default", "v2")] = Counts(classes=[0, 0, 100, 0, 0, 0])
    agg.edges[("a.default", "orders.default", "v1")] = Counts(classes=[0, 0, 0, 0, 0, 50])
    n = canary_numbers(agg, "orders", "default", "v2")
    assert n.requests == 200 and n.success_rate == pytest.approx(0.95)


@pytest.mark.parametrize(
    ("change", "path", "message"),
    [
        ("canary: v2", "spec.analysis.canary", "'v3' is not a subset"),
        ("steps: [10, 50, 100]", "spec.analysis.steps[1]", "steps must rise"),
        ("minSuccessRate: 99", "spec.analysis", "needs a threshold"),
    ],
)
def test_analysis_fields_are_checked(change: str, path: str, message: str) -> None:
    replacement = {
        "canary: v2": "canary: v3",
        "steps: [10, 50, 100]": "steps: [10, 5, 100]",
        "minSuccessRate: 99": "minSuccessRate: null",
    }[change]
    text = SPLIT.replace(change, replacement)
    if change == "minSuccessRate: 99":
        text = text.replace("    maxP99: 500ms\n", "")
    got = {p.path: p.message for p in validate([("s.yaml", text)]).problems if p.is_error}
    assert path in got and message in got[path], got


async def test_two_control_planes_never_drive_one_analysis(tmp_path: Path) -> None:
    async with serving_registry(tmp_path / "reg") as reg:
        address = RegistryAddress("127.0.0.1", reg.port, "http", None)
        cps = [ControlPlane(ControlPlaneSpec(port=0, registry=address)) for _ in range(2)]
        for cp in cps:
            await cp.start()
        try:
            for cp in cps:
                await cp.app[CANARY].aclose()  # driven by hand below
            (res,) = parse_resources(SPLIT)
            await cps[0].store.apply([res])
            for cp in cps:
                await cp.refresh()

            async def numbers() -> Aggregate:
                return Aggregate()

            a, b = (CanaryController(cp, numbers) for cp in cps)
            assert await a.run_once() == 1  # started the analysis
            await cps[1].refresh()
            assert await b.run_once() == 0
            assert a.held == {res.key} and b.held == set() and b.decisions == 0
            await until(lambda: cps[1].snapshot.status(res.key) is not None)
            # The holder goes away (its session with it): the other takes over.
            await a.aclose()
            await b.run_once()
            assert b.held == {res.key}
            # Deleted, its status goes too: created again, it starts a new analysis.
            await cps[1].store.delete([res.key])
            snap = await cps[1].refresh()
            assert snap.orphan_statuses == {res.key}
            await b.run_once()
            assert (await cps[1].refresh()).orphan_statuses == frozenset()
            await b.aclose()
        finally:
            for cp in cps:
                await cp.aclose()
