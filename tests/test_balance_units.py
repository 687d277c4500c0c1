"""Unit tests of the balance package's parts: policy parsing, hashing, EDF, slow start,
peak-EWMA's estimator. (The properties every balancer shares are in
test_balance_conformance.py.)"""

from __future__ import annotations

import math
import random
from collections import Counter

import pytest

from proxy.balance import (
    Endpoint,
    HashPolicy,
    LeastRequest,
    LoadBalancerPolicy,
    LocalityBalancer,
    Maglev,
    PeakEwma,
    PickContext,
    RingHash,
    SlowStartPolicy,
    Tuning,
    WeightedRandom,
    WeightedRoundRobin,
    build_balancer,
    hashing,
)
from proxy.balance.edf import EdfScheduler
from proxy.balance.hashing import cookie_value, hash64, request_hash, value_hash
from proxy.balance.slow_start import SlowStart, ramp
from wire import resources


def ep(name: str, weight: int = 1, zone: str = "") -> Endpoint:
    return Endpoint(name, "127.0.0.1", 9000, weight=weight, zone=zone)


# --- round robin keeps its contract ---------------------------------------------------


def test_round_robin_interleaves() -> None:
    b = WeightedRoundRobin()
    b.update([ep("a", 5), ep("b"), ep("c")])
    order = [b.pick(PickContext(), 0.0, random.Random(0)) for _ in range(14)]
    assert "".join(e.id for e in order if e) == "aaabcaa" * 2
    b.update([ep("a"), ep("b"), ep("c")])
    rng = random.Random(0)
    order = "".join(e.id for e in (b.pick(PickContext(), 0.0, rng) for _ in range(9)) if e)
    assert order[:3] in ("abc", "bca", "cab") and order == order[:3] * 3
    # Each membership change restarts the rotation at a random endpoint.
    starts = set()
    for _ in range(30):
        b.update([ep("a"), ep("b"), ep("c")])
        first = b.pick(PickContext(), 0.0, rng)
        assert first is not None
        starts.add(first.id)
    assert starts == {"a", "b", "c"}


# --- EDF ------------------------------------------------------------------------------


def test_edf_is_proportional_and_gives_no_credit_while_refused() -> None:
    a, b = ep("a", 3), ep("b", 1)
    edf = EdfScheduler()
    weight = lambda e: float(e.weight)  # noqa: E731
    edf.reset([a, b], weight)
    picks = Counter(edf.pick(weight, lambda e: True).id for _ in range(400))  # type: ignore[union-attr]
    assert picks == Counter({"a": 300, "b": 100})
    # b refused for 100 picks, then back: it gets its share, not a burst of back pay.
    for _ in range(100):
        assert edf.pick(weight, lambda e: e is not b) is a
    after = [edf.pick(weight, lambda e: True).id for _ in range(8)]  # type: ignore[union-attr]
    assert after.count("b") == 2
    assert edf.pick(weight, lambda e: False) is None


# --- slow start -----------------------------------------------------------------------


def test_slow_start_follows_envoys_formula() -> None:
    ss = SlowStart(SlowStartPolicy(window=10.0))
    assert ss.factor(100.0, 100.0) == pytest.approx(0.1)  # the 10% floor
    assert ss.factor(100.0, 105.0) == pytest.approx(0.5)
    assert ss.factor(100.0, 110.0) == 1.0
    fast = SlowStart(SlowStartPolicy(window=10.0, aggression=2.0, min_weight_percent=0.0))
    assert fast.factor(0.0, 2.5) == pytest.approx(math.sqrt(0.25))
    assert ss.weight(Endpoint("x", "h", 1, weight=4, added_at=100.0), 105.0) == 2.0
    # added_at 0 means "present from the start": never ramps.
    assert ss.weight(Endpoint("x", "h", 1, weight=4), 1.0) == 4.0
    # No policy, or a zero window: no ramp at all.
    assert ramp(None) is None and ramp(SlowStartPolicy(window=0.0)) is None


# --- hashing --------------------------------------------------------------------------


def test_cookie_parsing() -> None:
    assert cookie_value("a=1; session=abc; b=2", "session") == "abc"
    assert cookie_value('session="q v"', "session") == "q v"
    assert cookie_value("sessionx=1; xsession=2", "session") is None
    assert cookie_value(None, "session") is None
    assert cookie_value("garbage;;=;", "session") is None


def test_value_hashes_are_remembered_within_bounds() -> None:
    hashing._RECENT.clear()
    long_value = "x" * (hashing._RECENT_LONGEST + 1)
    for value in ("u1", "ü-2", long_value):
        assert value_hash(value) == hash64(value.encode()) == value_hash(value)
    assert "u1" in hashing._RECENT and long_value not in hashing._RECENT
    for i in range(hashing._RECENT_MAX + 10):
        assert value_hash(f"k{i}") == hash64(b"k%d" % i)
    assert len(hashing._RECENT) <= hashing._RECENT_MAX


def test_request_hash_sources_and_combination() -> None:
    headers = {"x-user": "u1", "cookie": "sid=s1"}.get
    user, cookie = HashPolicy("header", "x-user"), HashPolicy("cookie", "sid")
    query = HashPolicy("query_parameter", "id")
    ctx = PickContext(header=headers, path="/a?x=1&id=42", source_ip="10.0.0.9")
    assert request_hash(ctx, [user]) == hash64(b"u1")
    assert request_hash(ctx, [query]) == hash64(b"42")
    assert request_hash(ctx, [HashPolicy("source_ip")]) == hash64(b"10.0.0.9")
    both = request_hash(ctx, [user, cookie])
    assert both not in (None, hash64(b"u1"), hash64(b"s1"))
    assert request_hash(ctx, [HashPolicy("header", "x-user", terminal=True), cookie]) == hash64(
        b"u1"
    )
    # Absent values are skipped; nothing present means no hash at all.
    assert request_hash(ctx, [HashPolicy("header", "x-none"), cookie]) == hash64(b"s1")
    assert request_hash(PickContext(), [user, query]) is None
    # An explicit key wins over every policy.
    assert request_hash(PickContext(hash_key=b"k", header=headers), [user]) == hash64(b"k")


def test_hash_is_stable_across_processes() -> None:
    # BLAKE2b, not the per-process salted hash(): a fixed value, the same in every sidecar.
    assert hash64(b"user-1") == 0x88E1EA21865AAC9A
    assert hash64(b"user-1") != hash64(b"user-2")


# --- peak-EWMA's estimator ------------------------------------------------------------


def test_peak_ewma_estimator() -> None:
    b = PeakEwma(decay=3.0)
    a = ep("a")
    b.update([a])
    assert b.cost(a, 0.0) == 0.0  # never heard from, idle: probe it
    b.on_start(a, 0.0)
    assert b.cost(a, 0.0) == pytest.approx(0.030 * 2)  # probe out: the 30 ms default
    b.on_end(a, 0.010, 0.010, True)
    assert b.estimate(a, 0.010) == pytest.approx(0.010)
    # A slower observation is taken at once (peak sensitivity)...
    b.on_end(a, 0.020, 0.100, True)
    assert b.estimate(a, 0.020) == pytest.approx(0.100)
    # ...a faster one only as fast as the decay allows: after 3 s (one time constant),
    # 1 - 1/e of the way toward it.
    b.on_end(a, 3.020, 0.010, True)
    assert b.estimate(a, 3.020) == pytest.approx(0.100 / math.e + 0.010 * (1 - 1 / math.e))
    # A fast failure does not make the endpoint look faster.
    before = b.estimate(a, 3.021)
    b.on_end(a, 3.021, 0.0001, False)
    assert b.estimate(a, 3.021) >= before
    # Read costs decay toward zero while idle, so an avoided endpoint is probed again.
    # (down to the floor of a loopback round trip, 0.1 ms).
    assert b.cost(a, 30.0) == pytest.approx(0.0001)
    assert b.cost(a, 3.021) > 0.04


# --- the policy and its factory -------------------------------------------------------


def test_default_policy_is_peak_ewma_under_locality() -> None:
    assert isinstance(build_balancer(), PeakEwma)
    b = build_balancer(LoadBalancerPolicy(), local_zone="z1")
    assert isinstance(b, LocalityBalancer)
    assert isinstance(b.local, PeakEwma) and b.name == "peak_ewma+locality"
    assert isinstance(build_balancer(LoadBalancerPolicy(locality=False), "z1"), PeakEwma)


@pytest.mark.parametrize(
    ("name", "cls"),
    [
        ("round_robin", WeightedRoundRobin),
        ("random", WeightedRandom),
        ("least_request", LeastRequest),
        ("peak_ewma", PeakEwma),
        ("ring_hash", RingHash),
        ("maglev", Maglev),
    ],
)
def test_every_policy_builds_and_picks(name: str, cls: type) -> None:
    b = build_balancer(LoadBalancerPolicy(policy=name))
    assert isinstance(b, cls) and b.name == name
    assert b.uses_context == (name in ("ring_hash", "maglev"))
    layered = build_balancer(LoadBalancerPolicy(policy=name), "z1")
    assert layered.uses_context == b.uses_context
    b.update([ep("a"), ep("b")])
    assert b.pick(PickContext(hash_key=b"k"), 1.0, random.Random(1)) is not None


def test_the_balancer_takes_the_schemas_policy() -> None:
    """One type per concept: `ServiceDefaults.spec.loadBalancer` as decoded is what
    `build_balancer` takes; the constants it does not expose are `Tuning`'s."""
    assert LoadBalancerPolicy is resources.LoadBalancerPolicy
    assert HashPolicy is resources.HashPolicy and SlowStartPolicy is resources.SlowStartPolicy
    res = resources.Resource.from_dict(
        {
            "apiVersion": resources.API_VERSION,
            "kind": "ServiceDefaults",
            "metadata": {"name": "orders"},
            "spec": {
                "loadBalancer": {
                    "policy": "least_request",
                    "choiceCount": 3,
                    "slowStart": {"window": "30s", "minWeightPercent": 20},
                }
            },
        }
    )
    assert resources.check_resource(res) == []
    assert isinstance(res.spec, resources.ServiceDefaultsSpec)
    b = build_balancer(res.spec.load_balancer, tuning=Tuning(active_request_bias=0.5))
    assert isinstance(b, LeastRequest) and b.choice_count == 3 and b.bias == 0.5
    assert b.slow_start is not None and b.slow_start.window == 30.0


@pytest.mark.parametrize(
    ("lb", "field"),
    [
        ({"policy": "fastest"}, "spec.loadBalancer.policy"),
        ({"polcy": "random"}, "spec.loadBalancer.polcy"),
        ({"ringSize": True}, "spec.loadBalancer.ringSize"),
        ({"ringSize": 0}, "spec.loadBalancer.ringSize"),
        ({"policy": "maglev", "tableSize": 65536}, "spec.loadBalancer.tableSize"),
        ({"localityThreshold": 1.5}, "spec.loadBalancer.localityThreshold"),
        ({"choiceCount": 1}, "spec.loadBalancer.choiceCount"),
        ({"hashPolicies": {"field": "header"}}, "spec.loadBalancer.hashPolicies"),
        (
            {"policy": "ring_hash", "hashPolicies": [{"field": "header"}]},
            "spec.loadBalancer.hashPolicies[0]",
        ),
        (
            {"policy": "ring_hash", "hashPolicies": [{"field": "body", "name": "x"}]},
            "spec.loadBalancer.hashPolicies[0].field",
        ),
        ({"slowStart": {"window": "-5s"}}, "spec.loadBalancer.slowStart.window"),
        ({"slowStart": {"window": "5s", "ramp": 5}}, "spec.loadBalancer.slowStart.ramp"),
    ],
)
def test_invalid_policies_name_the_field(lb: dict[str, object], field: str) -> None:
    """The schema refuses them (decoding or `check_resource`), naming the field: the
    control plane before storing, the sidecar before applying a snapshot."""
    doc = {
        "apiVersion": resources.API_VERSION,
        "kind": "ServiceDefaults",
        "metadata": {"name": "orders"},
        "spec": {"loadBalancer": lb},
    }
    try:
        problems = resources.check_resource(resources.Resource.from_dict(doc))
    except resources.SchemaError as exc:
        problems = exc.problems
    assert any(p.path.startswith(field) for p in problems), problems


def test_reprs_say_what_matters() -> None:
    b = build_balancer(LoadBalancerPolicy(policy="maglev"), local_zone="z1")
    b.update([ep("a", zone="z1"), ep("b", zone="z2")])
    assert repr(b) == (
        "<LocalityBalancer zone='z1' threshold=0.7 local=<Maglev endpoints=1 table=16381> "
        "remote=<Maglev endpoints=1 table=16381>>"
    )
    r = RingHash(ring_size=16)
    r.update([ep("a"), ep("b", 2)])
    assert repr(r) == "<RingHash endpoints=2 points=48>"


def test_locality_layer_outcomes_reach_the_endpoint_estimate() -> None:
    b = build_balancer(LoadBalancerPolicy(), local_zone="z1")
    assert isinstance(b, LocalityBalancer)
    assert isinstance(b.local, PeakEwma) and isinstance(b.remote, PeakEwma)
    local, remote = ep("l", zone="z1"), ep("r", zone="z2")
    b.update([local, remote])
    assert b.pick(PickContext(), 1.0, random.Random(1)) is local
    # Through the layer itself...
    b.on_start(local, 1.0)
    assert local.active == 1
    b.on_end(local, 1.05, 0.05, True)
    assert local.active == 0
    assert b.local.estimate(local, 1.05) == pytest.approx(0.05)
    # ...or, as the proxy does, through its tracker: one inner balancer, which records
    # a remote endpoint's outcome on that endpoint as the remote side would.
    assert b.tracker is b.local
    b.tracker.on_start(remote, 2.0)
    assert remote.active == 1
    b.tracker.on_end(remote, 2.02, 0.02, True)
    assert remote.active == 0
    assert b.remote.estimate(remote, 2.02) == pytest.approx(0.02)
    assert b.remote.estimate(local, 1.05) == pytest.approx(0.05)  # the endpoint's own
    # A layer over a balancer that keeps per-instance state hears the outcomes itself.

    # (Set on an instance, not in a subclass: the compiled build's classes take no
    # interpreted subclasses.)
    def per_instance() -> WeightedRoundRobin:
        balancer = WeightedRoundRobin()
        balancer.endpoint_tracking = False
        return balancer

    layered = LocalityBalancer(per_instance, "z1")
    assert layered.tracker is layered
    assert isinstance(LocalityBalancer(WeightedRoundRobin, "z1").tracker, WeightedRoundRobin)


# --- ring hash: incremental rebuilds ----------------------------------------------------


@pytest.mark.parametrize("cls", [RingHash, Maglev])
def test_incremental_rebuilds_equal_a_fresh_build(cls: type) -> None:
    """A ring (table) changed step by step maps keys exactly as one built from scratch."""
    rng = random.Random(14)
    live = RingHash(ring_size=64) if cls is RingHash else Maglev(table_size=1021)
    members: dict[str, int] = {f"e{i}": 1 for i in range(5)}
    for step in range(40):
        action = rng.random()
        if action < 0.4 or len(members) < 2:
            members[f"n{step}"] = rng.choice([1, 1, 2, 3])
        elif action < 0.7:
            del members[rng.choice(sorted(members))]
        else:
            members[rng.choice(sorted(members))] = rng.choice([1, 2, 5])
        eps = [ep(k, w) for k, w in members.items()]
        rng.shuffle(eps)
        live.update(eps)
        fresh = RingHash(ring_size=64) if cls is RingHash else Maglev(table_size=1021)
        fresh.update([ep(k, w) for k, w in sorted(members.items())])
        for k in range(300):
            ctx = PickContext(hash_key=b"k%d" % k)
            a, b = live.pick(ctx, 0.0, rng), fresh.pick(ctx, 0.0, rng)
            assert a is not None and b is not None and a.id == b.id, (step, k)


@pytest.mark.parametrize("locality", [False, True])
def test_retry_and_hedge_picks_take_no_turn_from_first_attempts(locality: bool) -> None:
    """Round robin over a fast and a slow instance, every first attempt on the slow one
    followed by a hedge that avoids it: first attempts still alternate. (The hedge's
    re-pick past the slow instance used to leave the rotation on it, which sent it most
    first attempts, each hedged, until the retry budget ran out.)"""
    from proxy.dispatch import _pick_again

    fast, slow = ep("fast"), ep("slow")
    bal = LocalityBalancer(WeightedRoundRobin, "") if locality else WeightedRoundRobin()
    bal.update([fast, slow])
    rng = random.Random(4)
    ctx = PickContext()
    firsts = []
    for _ in range(40):
        first = bal.pick(ctx, 1.0, rng)
        assert first is not None
        firsts.append("slow" if first is slow else "fast")
        if first is slow:
            assert _pick_again(bal, ctx, 1.0, [slow]) is fast
    assert Counter(firsts) == {"fast": 20, "slow": 20}
    mark = bal.rotation()
    bal.pick(ctx, 1.0, rng)
    bal.rewind(mark)
    assert bal.rotation() == mark
