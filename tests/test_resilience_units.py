"""The resilience decisions as pure functions: retry classification, attempts, budget,
backoff, circuit-breaker counters and outlier detection, with injected clocks and random
sources (no sleeps, no sockets); and the policy's validation (field paths and lines)."""

from __future__ import annotations

import random

import pytest

from controlplane.validation import validate
from proxy import retry as r
from proxy.balance import Endpoint
from proxy.balance.outlier import (
    CONNECT,
    EJECTED,
    ERROR_5XX,
    GATEWAY,
    HEALTHY,
    IGNORE,
    LOCAL,
    SUCCESS,
    TRIAL,
    OutlierDetector,
    OutlierSpec,
    classify,
    start_trial,
)
from proxy.circuit_breaker import Breaker, Breakers, CircuitBreakerSpec
from proxy.cluster_spec import PoolKeys, compile_specs
from proxy.policy import compile_table, decode
from proxy.pool import PoolPolicy
from wire import resources as schema

# -- retryOn ---------------------------------------------------------------------------


def spec(*on: str, **kw: object) -> r.RetrySpec:
    policy = schema.RetryPolicy(retry_on=on, **kw)  # type: ignore[arg-type]
    return r.RetrySpec.of(policy)


@pytest.mark.parametrize(
    ("on", "failure", "status", "want"),
    [
        (("connect-failure",), r.F_CONNECT, 0, True),
        (("connect-failure",), r.F_RESET, 0, False),
        (("reset",), r.F_RESET, 0, True),
        (("reset",), r.F_TIMEOUT, 0, False),
        (("gateway-error",), r.F_CONNECT, 0, True),
        (("gateway-error",), r.F_TIMEOUT, 0, True),
        (("gateway-error",), r.F_STATUS, 503, True),
        (("gateway-error",), r.F_STATUS, 500, False),
        (("5xx",), r.F_STATUS, 500, True),
        (("5xx",), r.F_STATUS, 499, False),
        (("5xx",), r.F_RESET, 0, True),
        (("refused-stream",), r.F_STATUS, 503, False),
    ],
)
def test_retry_on_classifies_failures(
    on: tuple[str, ...], failure: int, status: int, want: bool
) -> None:
    assert spec(*on).retriable(failure, status) is want


def test_retriable_status_codes_and_headers() -> None:
    s = spec("retriable-status-codes", retriable_status_codes=(409,))
    assert s.retriable(r.F_STATUS, 409) and not s.retriable(r.F_STATUS, 500)
    h = spec("retriable-headers", retriable_headers=("X-Retry-Me",))
    assert h.reads_headers
    assert h.retriable(r.F_STATUS, 200, frozenset({b"x-retry-me"}))
    assert not h.retriable(r.F_STATUS, 200, frozenset({b"content-type"}))


def test_header_override_lowers_attempts_only() -> None:
    s = spec("5xx", attempts=3)
    assert s.override(b"2", None).attempts == 2
    assert s.override(b"9", None).attempts == 3  # never raised
    assert s.override(b"x", None) is s
    assert s.override(None, b"reset, nonsense").on == r.RESET


# -- may_retry, budget, backoff -----------------------------------------------------------


def test_may_retry_checks_attempts_method_body_and_budget_in_that_order() -> None:
    s = spec("5xx", attempts=2)
    budget = r.RetryBudget(0.0, 10.0, 0)
    assert r.may_retry(s, 2, b"GET", True, budget, 0.0) == r.NO_ATTEMPTS_LEFT
    assert r.may_retry(s, 1, b"POST", True, budget, 0.0) == r.NOT_IDEMPOTENT
    assert r.may_retry(s, 1, b"GET", False, budget, 0.0) == r.NOT_REPLAYABLE
    assert r.may_retry(s, 1, b"GET", True, budget, 0.0) == r.BUDGET_EXHAUSTED
    ok = r.RetryBudget(0.0, 10.0, 1)
    assert r.may_retry(s, 1, b"PUT", True, ok, 0.0) == ""
    post = spec("5xx", retry_non_idempotent=True)
    assert r.may_retry(post, 1, b"POST", True, ok, 0.0) == ""


def test_budget_allows_ratio_of_requests_plus_min_per_second_over_a_sliding_window() -> None:
    b = r.RetryBudget(ratio=0.2, window=10.0, min_per_second=1)
    now = 1000.0
    for i in range(100):
        b.request(now + i * 0.01)
    # 0.2 * 100 + 1 * 10 = 30 retries in the window.
    granted = 0
    while b.allows(now + 1) and granted < 1000:
        b.spend(now + 1)
        granted += 1
    assert granted == 30
    assert b.counts(now + 1) == (100, 30)
    # A whole window later everything slid out: only minPerSecond * window is left.
    assert b.counts(now + 12) == (0, 0)
    granted = 0
    while b.allows(now + 12) and granted < 1000:
        b.spend(now + 12)
        granted += 1
    assert granted == 10
    # Half a window on, the requests of the first half still count.
    c = r.RetryBudget(ratio=1.0, window=10.0, min_per_second=0)
    c.request(0.5)
    c.request(6.0)
    assert c.counts(9.9) == (2, 0)
    assert c.counts(10.5) == (1, 0)  # the slice of 0.5 s left the window


def test_budget_counts_a_request_whose_start_is_in_an_earlier_slice() -> None:
    # A request routed late (discovery's first answer) is counted with its start time,
    # which may lie in a slice before the last request's: it is counted, and the window
    # is kept (it is not taken for a clock gone back).
    b = r.RetryBudget(ratio=1.0, window=10.0, min_per_second=0)
    for _ in range(5):
        b.request(100.2)
    b.request(99.7)
    assert b.counts(100.5) == (6, 0)
    b.request(101.0)  # the next slice
    b.spend(101.5)
    assert b.counts(101.5) == (7, 1)
    assert "requests=7 retries=1" in repr(b)
    assert b.counts(110.5) == (1, 1)  # the slice of 101 s is all that is left


def test_backoff_is_full_jitter_capped() -> None:
    s = spec("5xx", backoff=schema.BackoffPolicy(base=0.025, max=0.25))

    class Max(random.Random):
        def random(self) -> float:
            return 0.999999

    caps = [r.backoff(s, n, Max()) for n in range(1, 8)]
    assert [round(c, 4) for c in caps] == [0.025, 0.05, 0.1, 0.2, 0.25, 0.25, 0.25]
    rng = random.Random(7)
    draws = [r.backoff(s, 3, rng) for _ in range(200)]
    assert all(0 <= d < 0.1 for d in draws) and max(draws) > 0.08 and min(draws) < 0.02


# -- circuit breakers ---------------------------------------------------------------------


def test_breaker_counts_and_overflows() -> None:
    b = Breaker(CircuitBreakerSpec(max_active_requests=2, max_active_retries=1), "s")
    assert b.admit() and b.admit() and not b.admit()
    assert b.overflows == 1
    b.done()
    assert b.admit()
    assert b.admit_retry() and not b.admit_retry() and b.retry_overflows == 1
    b.retry_done()
    assert b.admit_retry()
    reg = Breakers()
    one = reg.get(("ns", "svc"), CircuitBreakerSpec(max_active_requests=1))
    assert one.admit()
    two = reg.get(("ns", "svc"), CircuitBreakerSpec(max_active_requests=5))
    assert two is one and one.active == 1 and one.spec.max_active_requests == 5


# -- outlier detection ----------------------------------------------------------------------


def eps(n: int) -> list[Endpoint]:
    return [Endpoint(f"e{i}", "127.0.0.1", 1000 + i) for i in range(n)]


def test_classify_reads_the_typed_outcome() -> None:
    assert classify("Completed", 200) == SUCCESS
    assert classify("Completed", 404) == SUCCESS
    assert classify("Completed", 500) == ERROR_5XX
    assert classify("Completed", 503) == GATEWAY
    assert classify("ConnectFailure", 502) == CONNECT
    assert classify("Reset", 502) == LOCAL
    assert classify("Timeout", 504) == LOCAL
    assert classify("ClientGone", 0) == IGNORE
    assert classify("LocalReply", 503) == IGNORE


def test_consecutive_5xx_ejects_then_probation_with_one_trial() -> None:
    d = OutlierDetector(OutlierSpec(consecutive_5xx=3, base_ejection=10.0, max_ejection_percent=50))
    group = eps(2)
    ep = group[0]
    now = 100.0
    assert not d.observe(ep, ERROR_5XX, now, group)
    assert not d.observe(ep, SUCCESS, now, group)  # a success resets the count
    assert not d.observe(ep, CONNECT, now, group)
    assert not d.observe(ep, LOCAL, now, group)
    assert d.observe(ep, GATEWAY, now, group)
    assert ep.outlier.state == EJECTED and not ep.available(now + 9.9)
    assert d.ejections_total["consecutive_5xx"] == 1
    assert d.describe(ep, now)["ejected"] is True
    # Time up: available again; the first pick is its one trial and takes it out again.
    assert ep.available(now + 10)
    start_trial(ep, now + 10)
    assert ep.outlier.state == TRIAL and not ep.available(now + 11)
    # The trial fails: ejected again, for twice as long.
    assert d.observe(ep, ERROR_5XX, now + 11, group)
    assert ep.ejected_until == now + 11 + 20.0
    # Next trial succeeds: back for good.
    start_trial(ep, now + 40)
    d.observe(ep, SUCCESS, now + 40, group)
    assert ep.outlier.state == HEALTHY and ep.available(now + 40)
    # A trial that told nothing (the client left) gives way to another trial.
    d.observe(ep, ERROR_5XX, now + 50, group)
    d.observe(ep, ERROR_5XX, now + 50, group)
    d.observe(ep, ERROR_5XX, now + 50, group)
    start_trial(ep, now + 200)
    d.observe(ep, IGNORE, now + 200, group)
    assert ep.outlier.state == EJECTED and ep.available(now + 200)


def test_ejection_time_is_capped_and_shrinks_after_healthy_intervals() -> None:
    d = OutlierDetector(
        OutlierSpec(consecutive_5xx=1, base_ejection=10.0, max_ejection=25.0,
                    max_ejection_percent=100)
    )  # fmt: skip
    group = eps(1)
    ep = group[0]
    assert d.observe(ep, ERROR_5XX, 0.0, group)
    lengths = [ep.ejected_until]
    for _ in range(3):  # each failed trial ejects it again, for one base longer
        t = ep.ejected_until
        start_trial(ep, t)
        assert d.observe(ep, ERROR_5XX, t, group)
        lengths.append(ep.ejected_until - t)
    assert lengths == [10.0, 20.0, 25.0, 25.0]
    t = ep.ejected_until
    start_trial(ep, t)
    d.observe(ep, SUCCESS, t, group)
    assert ep.outlier.state == HEALTHY and ep.outlier.ejections == 4
    d.evaluate(group, t)  # the interval of the failures: no credit
    assert ep.outlier.ejections == 4
    for k in range(1, 5):  # then one less per healthy interval
        d.evaluate(group, t + k)
    assert ep.outlier.ejections == 0


def test_max_ejection_percent_keeps_enough_endpoints() -> None:
    d = OutlierDetector(OutlierSpec(consecutive_5xx=1, max_ejection_percent=10))
    group = eps(3)
    assert d.observe(group[0], ERROR_5XX, 0.0, group)  # one may always go
    assert not d.observe(group[1], ERROR_5XX, 0.0, group)
    assert group[1].available(0.0)
    off = OutlierDetector(OutlierSpec(consecutive_5xx=1, max_ejection_percent=0))
    fresh = eps(3)
    assert not off.observe(fresh[0], ERROR_5XX, 0.0, fresh)


def test_failure_percentage_and_success_rate_every_interval() -> None:
    spec_ = OutlierSpec(
        consecutive_5xx=0,
        interval=1.0,
        failure_percentage=(40, 3, 10),
        max_ejection_percent=50,
    )
    d = OutlierDetector(spec_)
    group = eps(4)
    for i, ep in enumerate(group):
        for k in range(20):
            failing = i == 0 and k % 2 == 0
            d.observe(ep, ERROR_5XX if failing else SUCCESS, 0.5, group)
    assert d.evaluate(group, 1.0) == [group[0]]
    assert group[0].outlier.reason == "failure_percentage"
    assert d.evaluate(group, 1.5) == []  # not an interval yet
    sr = OutlierDetector(OutlierSpec(consecutive_5xx=0, success_rate=(3, 10, 1.0),
                                     max_ejection_percent=50))  # fmt: skip
    g2 = eps(5)
    for i, ep in enumerate(g2):
        for k in range(20):
            bad = (i == 4 and k < 8) or (i == 3 and k < 1)
            sr.observe(ep, ERROR_5XX if bad else SUCCESS, 0.0, g2)
    assert sr.evaluate(g2, 0.0) == [g2[4]]
    # Too few requests: nothing evaluated.
    g3 = eps(5)
    for ep in g3:
        sr.observe(ep, ERROR_5XX, 2.0, g3)
    sr.next_eval = 0.0
    assert sr.evaluate(g3, 2.0) == []


# -- compiled specs ---------------------------------------------------------------------------


def doc(kind: str, name: str, spec_: dict[str, object]) -> dict[str, object]:
    meta: dict[str, object] = {"name": name}
    if kind != "MeshConfig":
        meta["namespace"] = "default"
    return {"apiVersion": "tether.dev/v1alpha1", "kind": kind, "metadata": meta, "spec": spec_}


def test_specs_resolve_service_then_mesh_and_bound_pools() -> None:
    resources = decode(
        [
            doc("MeshConfig", "mesh", {"retries": {}, "outlierDetection": {}}),
            doc(
                "ServiceDefaults",
                "orders",
                {
                    "retries": {"attempts": 3, "perTryTimeout": "250ms", "retryOn": ["5xx"]},
                    "circuitBreaker": {"maxConnections": 7, "maxPendingRequests": 9},
                },
            ),
            doc("ServiceDefaults", "other", {"connectTimeout": "1s"}),
        ]
    )
    table, mesh = compile_table(resources, 1)
    specs = compile_specs(table, mesh, PoolPolicy(), PoolKeys())
    orders = specs.get("default", "orders")
    assert orders.retry is not None and orders.retry.attempts == 3
    assert orders.retry.per_try_timeout == 0.25 and orders.retry.on == r.STATUS_5XX
    assert (orders.pool.max_connections, orders.pool.max_pending) == (7, 9)
    assert orders.outlier_detection == OutlierSpec()  # MeshConfig's, all defaults
    other = specs.get("default", "other")
    assert other.retry == r.RetrySpec() and other.circuit_breaker is None
    assert specs.default.retry == r.RetrySpec()  # mesh-wide default applies to all


# -- validation --------------------------------------------------------------------------------

BAD = """\
apiVersion: tether.dev/v1alpha1
kind: ServiceDefaults
metadata:
  name: orders
spec:
  retries:
    attempts: 0
    perTryTimeout: -1s
    retryOn: [5xx, bogus]
    budget:
      ratio: 1.5
  circuitBreaker:
    maxActiveRequests: 10
  outlierDetection:
    maxEjectionPercent: 101
"""


def test_invalid_policy_is_refused_with_paths_and_lines() -> None:
    out = validate([("bad.yaml", BAD)])
    got = {(p.path, p.line) for p in out.errors}
    assert ("spec.retries.perTryTimeout", 8) in got
    assert ("spec.retries.retryOn[1]", 9) in got
    # The decoder stops at type errors; meaning is checked on a well-typed document.
    fixed = BAD.replace("perTryTimeout: -1s", "perTryTimeout: 0s").replace(", bogus", "")
    out = validate([("bad.yaml", fixed)])
    got = {(p.path, p.line) for p in out.errors}
    assert got == {
        ("spec.retries.attempts", 7),
        ("spec.retries.perTryTimeout", 8),
        ("spec.retries.budget.ratio", 11),
        ("spec.outlierDetection.maxEjectionPercent", 15),
    }, out.errors


def test_a_route_limit_above_the_service_limit_is_refused() -> None:
    route = """\
apiVersion: tether.dev/v1alpha1
kind: Route
metadata:
  name: orders
spec:
  rules:
    - match: {path: {prefix: /a}}
      circuitBreaker:
        maxActiveRequests: 50
"""
    sd = BAD.split("  retries:")[0] + "  circuitBreaker:\n    maxActiveRequests: 10\n"
    out = validate([("sd.yaml", sd), ("route.yaml", route)])
    errors = [p for p in out.errors]
    assert len(errors) == 1, errors
    p = errors[0]
    assert p.path == "spec.rules[0].circuitBreaker.maxActiveRequests" and p.line == 9
    assert "above the ServiceDefaults limit 10" in p.message
    ok = route.replace("50", "10")
    assert validate([("sd.yaml", sd), ("route.yaml", ok)]).ok
