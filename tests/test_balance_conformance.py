"""One conformance suite, run against every balancer (trio's `_check_streams` style).

The `balancer_kind` fixture is parametrized over every implementation, bare and under
the locality layer (with all endpoints in the caller's zone the layer must be invisible),
and every test below runs against each. Decisions are pure, so the suite drives them with
a seeded `random.Random` and a virtual clock: no sleeps, no luck. Load-aware behaviour
(slow endpoints, recovery) is simulated with an event queue of completions.
"""

from __future__ import annotations

import heapq
import random
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import pytest

from proxy.balance import (
    Balancer,
    Endpoint,
    HashPolicy,
    LeastRequest,
    LocalityBalancer,
    Maglev,
    PeakEwma,
    PickContext,
    RingHash,
    SlowStartPolicy,
    WeightedRandom,
    WeightedRoundRobin,
)

ZONE = "zone-a"
HEADER = HashPolicy("header", "x-user")


@dataclass(frozen=True)
class Kind:
    name: str
    make: Callable[[], Balancer]
    hashing: bool = False
    load_aware: bool = False
    ramps: bool = False  # supports slow start
    layered: bool = False

    def build(self, endpoints: Sequence[Endpoint] = ()) -> Balancer:
        b: Balancer = LocalityBalancer(self.make, ZONE) if self.layered else self.make()
        b.update(endpoints)
        return b


SLOW_START = SlowStartPolicy(window=10.0)
BARE = [
    Kind("round_robin", lambda: WeightedRoundRobin(SLOW_START), ramps=True),
    Kind("random", lambda: WeightedRandom(SLOW_START), ramps=True),
    Kind("least_request", lambda: LeastRequest(slow_start=SLOW_START), load_aware=True, ramps=True),
    Kind("peak_ewma", lambda: PeakEwma(slow_start=SLOW_START), load_aware=True, ramps=True),
    Kind("ring_hash", lambda: RingHash([HEADER]), hashing=True),
    Kind("maglev", lambda: Maglev([HEADER]), hashing=True),
]
KINDS = BARE + [
    Kind(f"{k.name}+locality", k.make, k.hashing, k.load_aware, k.ramps, layered=True) for k in BARE
]


@pytest.fixture(params=KINDS, ids=[k.name for k in KINDS])
def kind(request: pytest.FixtureRequest) -> Kind:
    k: Kind = request.param
    return k


def only(pred: Callable[[Kind], bool]) -> pytest.MarkDecorator:
    """Narrow the `kind` fixture to the kinds a property applies to."""
    chosen = [k for k in KINDS if pred(k)]
    return pytest.mark.parametrize("kind", chosen, ids=[k.name for k in chosen])


HASHING = only(lambda k: k.hashing)
LOAD_AWARE = only(lambda k: k.load_aware)
RAMPING = only(lambda k: k.ramps)
LAYERED = only(lambda k: k.layered)


def endpoints(weights: Sequence[int], zone: str = ZONE, prefix: str = "ep") -> list[Endpoint]:
    return [
        Endpoint(f"{prefix}-{i}", "127.0.0.1", 20000 + i, weight=w, zone=zone)
        for i, w in enumerate(weights)
    ]


def drive(
    b: Balancer, n: int, rng: random.Random, start: float = 1000.0, step: float = 0.001
) -> Counter[str]:
    """`n` requests one after another, each finishing before the next (nothing in
    flight at a pick, equal latency); each carries a distinct hash key."""
    picks: Counter[str] = Counter()
    for i in range(n):
        now = start + i * step
        ep = b.pick(PickContext(hash_key=b"key-%d" % i), now, rng)
        if ep is None:
            picks["<none>"] += 1
            continue
        picks[ep.id] += 1
        b.tracker.on_start(ep, now)  # as the proxy reports outcomes
        b.tracker.on_end(ep, now + step / 2, step / 2, True)
    return picks


# --- availability ---------------------------------------------------------------------


def test_never_picks_unavailable_and_reports_none(kind: Kind) -> None:
    rng = random.Random(1)
    eps = endpoints([1, 2, 1, 3, 1, 1])
    eps[0].healthy = False
    eps[2].draining = True
    eps[3].ejected_until = 2000.0  # outlier detection holds it out until t=2000
    b = kind.build(eps)
    picks = drive(b, 3000, rng)
    assert set(picks) == {"ep-1", "ep-4", "ep-5"}

    # The ejection expires: the endpoint is back in rotation without any update().
    later = drive(b, 3000, rng, start=2000.0)
    assert "ep-3" in later and "ep-0" not in later and "ep-2" not in later

    for ep in eps:
        ep.ejected_until = 10_000.0
    assert drive(b, 200, rng, start=3000.0) == Counter({"<none>": 200})


def test_empty_and_weightless_clusters_report_none(kind: Kind) -> None:
    rng = random.Random(2)
    b = kind.build([])
    assert b.pick(PickContext(hash_key=b"k"), 0.0, rng) is None
    b.update(endpoints([0, 0]))
    assert b.pick(PickContext(hash_key=b"k"), 0.0, rng) is None
    assert drive(kind.build(endpoints([1])), 10, rng) == Counter({"ep-0": 10})


def test_membership_update_keeps_working(kind: Kind) -> None:
    rng = random.Random(3)
    eps = endpoints([1, 1, 1])
    b = kind.build(eps)
    assert set(drive(b, 300, rng)) == {"ep-0", "ep-1", "ep-2"}
    b.update(eps[:2])
    assert set(drive(b, 300, rng, start=2000.0)) == {"ep-0", "ep-1"}
    b.update([*eps, *endpoints([1], prefix="new")])
    assert set(drive(b, 600, rng, start=3000.0)) == {"ep-0", "ep-1", "ep-2", "new-0"}


# --- weights ----------------------------------------------------------------------------


@pytest.mark.parametrize("weights", [(1, 1, 1, 1), (1, 2, 3), (5, 1, 1)], ids=str)
def test_honours_weights_within_5_percent(kind: Kind, weights: tuple[int, ...]) -> None:
    # For the randomized balancers (random, and P2C's coin flips between equal costs) the
    # band is 2.3-2.9 standard deviations per endpoint: about one seed in fifty falls
    # outside it by chance (measured: 1-4 of 100). The seed is fixed, so the outcome is
    # reproducible; a real bias of a few percent fails for nearly every seed.
    b = kind.build(endpoints(weights))
    picks = drive(b, 10_000, random.Random(1))
    total = sum(weights)
    for i, w in enumerate(weights):
        expected = 10_000 * w / total
        assert abs(picks[f"ep-{i}"] - expected) <= 0.05 * expected, (picks, weights)


# --- consistent hashing -------------------------------------------------------------------


def mapping(b: Balancer, keys: range, now: float = 0.0) -> dict[int, str]:
    rng = random.Random(5)
    out: dict[int, str] = {}
    for k in keys:
        ep = b.pick(PickContext(hash_key=b"user-%d" % k), now, rng)
        assert ep is not None
        out[k] = ep.id
    return out


@pytest.mark.parametrize("n", [4, 10])
@HASHING
def test_hashing_moves_at_most_1_5_over_n_keys(kind: Kind, n: int) -> None:
    keys = range(10_000)
    before = mapping(kind.build(endpoints([1] * (n - 1))), keys)
    after = mapping(kind.build(endpoints([1] * n)), keys)  # one of N added
    moved = sum(before[k] != after[k] for k in keys)
    assert moved <= 1.5 / n * len(keys), moved
    # And removed again (a different one of the N): the same bound.
    fewer = endpoints([1] * n)
    del fewer[n // 2]
    removed = mapping(kind.build(fewer), keys)
    moved = sum(after[k] != removed[k] for k in keys)
    assert moved <= 1.5 / n * len(keys), moved


@HASHING
def test_hashing_same_key_same_endpoint_across_rebuilds(kind: Kind) -> None:
    keys = range(10_000)
    first = mapping(kind.build(endpoints([1, 2, 1, 1, 3])), keys)
    # Fresh Endpoint objects, listed in another order, in a fresh balancer: same mapping.
    shuffled = endpoints([1, 2, 1, 1, 3])
    random.Random(6).shuffle(shuffled)
    assert mapping(kind.build(shuffled), keys) == first
    # And an in-place rebuild of the same balancer.
    b = kind.build(endpoints([1, 2, 1, 1, 3]))
    b.update(shuffled)
    assert mapping(b, keys) == first


@HASHING
def test_hashing_only_moves_an_unavailable_endpoints_keys(kind: Kind) -> None:
    eps = endpoints([1] * 6)
    b = kind.build(eps)
    keys = range(5000)
    before = mapping(b, keys)
    eps[2].healthy = False
    during = mapping(b, keys)
    for k in keys:
        if before[k] != "ep-2":
            assert during[k] == before[k]
        else:
            assert during[k] != "ep-2"
    eps[2].healthy = True
    assert mapping(b, keys) == before


@HASHING
def test_hashing_on_header_cookie_and_source_address(kind: Kind) -> None:
    rng = random.Random(7)
    eps = endpoints([1] * 8)
    for policy, ctx_of in [
        (HashPolicy("header", "x-user"), lambda v: {"x-user": v}),
        (HashPolicy("cookie", "session"), lambda v: {"cookie": f"a=1; session={v}; b=2"}),
        (HashPolicy("source_ip"), None),
    ]:
        make = Maglev if "maglev" in kind.name else RingHash
        k = Kind(kind.name, lambda p=policy, m=make: m([p]), layered=kind.layered)
        b = k.build(eps)
        seen: dict[str, set[str]] = {}
        for i in range(2000):
            value = f"10.1.{i % 200}.7" if ctx_of is None else f"user-{i % 200}"
            if ctx_of is None:
                ctx = PickContext(source_ip=value)
            else:
                headers = ctx_of(value)
                ctx = PickContext(header=headers.get)
            ep = b.pick(ctx, 0.0, rng)
            assert ep is not None
            seen.setdefault(value, set()).add(ep.id)
        assert all(len(s) == 1 for s in seen.values()), policy
        assert len({next(iter(s)) for s in seen.values()}) == 8, policy
    # No value to hash on: a random available endpoint, spread over all of them.
    b = kind.build(eps)
    spread = Counter(ep.id for ep in (b.pick(PickContext(), 0.0, rng) for _ in range(800)) if ep)
    assert len(spread) == 8 and min(spread.values()) > 50


# --- load awareness -------------------------------------------------------------------


class Simulation:
    """`callers` concurrent callers, each sending its next request when the previous
    one completes (a closed loop, as wrk does); completions wait in an event queue."""

    def __init__(self, b: Balancer, latency: Callable[[Endpoint], float], callers: int) -> None:
        self.b = b
        self.latency = latency
        self.rng = random.Random(8)
        self.queue: list[tuple[float, int, Endpoint, float]] = []
        self.seq = 0
        for i in range(callers):
            self._send(i * 1e-4)

    def _send(self, now: float) -> Endpoint:
        ep = self.b.pick(PickContext(), now, self.rng)
        assert ep is not None
        self.b.tracker.on_start(ep, now)  # as the proxy reports outcomes
        done = now + self.latency(ep) * self.rng.uniform(0.9, 1.1)
        self.seq += 1
        heapq.heappush(self.queue, (done, self.seq, ep, now))
        return ep

    def run_until(self, t: float) -> Counter[str]:
        picks: Counter[str] = Counter()
        while self.queue[0][0] < t:
            done, _, ep, started = heapq.heappop(self.queue)
            self.b.tracker.on_end(ep, done, done - started, True)
            picks[self._send(done).id] += 1
        return picks


def share(picks: Counter[str], ep_id: str) -> float:
    return picks[ep_id] / max(1, sum(picks.values()))


@LOAD_AWARE
def test_load_aware_avoids_a_slow_endpoint_and_recovers(kind: Kind) -> None:
    slow = {"ep-2": True}

    def latency(ep: Endpoint) -> float:
        return 0.060 if slow.get(ep.id) else 0.010  # 50 ms slower than the other two

    sim = Simulation(kind.build(endpoints([1, 1, 1])), latency, callers=32)
    picks = sim.run_until(10.0)
    assert sum(picks.values()) > 10_000
    assert share(picks, "ep-2") < 0.10, picks

    slow["ep-2"] = False
    windows = [sim.run_until(10.0 + s) for s in range(1, 11)]
    shares = [round(share(w, "ep-2"), 3) for w in windows]
    # Back to at least 20% of the picks within 6 virtual seconds, and to nearly its fair
    # third within 10 (peak-EWMA's decay, 3 s, sets the pace; least-request has no
    # memory and recovers at once).
    assert shares[5] >= 0.20, shares
    assert shares[9] >= 0.28, shares


@LOAD_AWARE
def test_load_aware_prefers_endpoints_with_less_in_flight(kind: Kind) -> None:
    eps = endpoints([1, 1, 1])
    b = kind.build(eps)
    rng = random.Random(9)
    for _ in range(20):
        b.on_start(eps[0], 0.0)
    picks = Counter(ep.id for ep in (b.pick(PickContext(), 0.0, rng) for _ in range(900)) if ep)
    assert picks["ep-0"] == 0, picks
    assert picks["ep-1"] > 300 and picks["ep-2"] > 300


# --- slow start ---------------------------------------------------------------------------


@RAMPING
def test_slow_start_ramps_a_new_endpoints_weight(kind: Kind) -> None:
    eps = endpoints([1, 1])
    b = kind.build(eps)
    drive(b, 100, random.Random(10), start=100.0)
    new = Endpoint("new", "127.0.0.1", 20100, zone=ZONE, added_at=1000.0)
    b.update([*eps, new])
    rng = random.Random(11)
    observed = []
    for elapsed in (1.0, 5.0, 11.0):
        # 4000 picks within 4 ms of virtual time: the ramp does not move meanwhile.
        picks = drive(b, 4000, rng, start=1000.0 + elapsed, step=1e-6)
        factor = min(1.0, max(0.1, elapsed / 10.0))  # Envoy's ramp, aggression 1
        expected = factor / (2 + factor)
        observed.append(share(picks, "new"))
        assert abs(share(picks, "new") - expected) <= 0.03, (elapsed, picks)
    assert observed[0] < observed[1] < observed[2]


# --- the locality layer -----------------------------------------------------------------


def zoned() -> list[Endpoint]:
    return (
        endpoints([1] * 5, zone=ZONE, prefix="a")
        + endpoints([1] * 5, zone="zone-b", prefix="b")
        + endpoints([1] * 5, zone="zone-c", prefix="c")
    )


def zone_shares(picks: Counter[str]) -> dict[str, float]:
    total = sum(picks.values())
    out: Counter[str] = Counter()
    for ep_id, n in picks.items():
        out[ep_id[0]] += n
    return {z: out[z] / total for z in "abc"}


@LAYERED
def test_locality_keeps_calls_in_zone_spills_over_and_fails_over(kind: Kind) -> None:
    eps = zoned()
    b = kind.build(eps)
    rng = random.Random(12)
    assert zone_shares(drive(b, 10_000, rng))["a"] >= 0.95

    # 4 of 5 local endpoints available: 80% >= the 70% threshold, still all local.
    eps[0].ejected_until = 1e9
    assert zone_shares(drive(b, 10_000, rng, start=2000.0))["a"] >= 0.95

    # 3 of 5 (60%): the zone keeps 60/70 of the calls, the rest spreads over b and c.
    eps[1].healthy = False
    shares = zone_shares(drive(b, 10_000, rng, start=3000.0))
    assert abs(shares["a"] - 0.6 / 0.7) <= 0.02, shares
    assert abs(shares["b"] - shares["c"]) <= 0.02, shares

    # 1 of 5 (20%): 2/7 stay.
    eps[2].draining = True
    eps[3].healthy = False
    shares = zone_shares(drive(b, 10_000, rng, start=4000.0))
    assert abs(shares["a"] - 0.2 / 0.7) <= 0.02, shares

    # None left in the zone: everything fails over, and nothing is lost.
    eps[4].healthy = False
    picks = drive(b, 10_000, rng, start=5000.0)
    assert "<none>" not in picks
    assert zone_shares(picks)["a"] == 0.0

    # The zone recovers: calls come home.
    for ep in eps[:5]:
        ep.healthy, ep.draining, ep.ejected_until = True, False, 0.0
    assert zone_shares(drive(b, 10_000, rng, start=6000.0))["a"] >= 0.95


@LAYERED
def test_locality_uses_the_local_zone_as_long_as_anything_answers(kind: Kind) -> None:
    eps = zoned()
    b = kind.build(eps)
    for ep in eps[:4] + eps[5:]:
        ep.healthy = False  # one local endpoint left, nowhere else to go
    picks = drive(b, 2000, random.Random(13))
    assert picks == Counter({"a-4": 2000})
