"""Locality through real sidecars: zone preference, proportional spill-over, failover.

Real processes: the registry (`tether registry`), one sidecar per instance (`tether
sidecar --zone ...`), apps in threads. The caller's sidecar is in zone-a with the
default balancer (peak-EWMA under the locality layer); `orders` has two instances in
zone-a and two in zone-b. Health comes from the registry's HTTP checks of the apps
(1 s interval), so a stopped app turns critical and counts against its zone's share.
Synchronous test (threads, blocking sockets): it runs once.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import RegistryProcess
from tests.sidecar_harness import ProcessSet, Sidecar, poll

pytestmark = pytest.mark.timeout(90)

ORDERS = {"a-1": "zone-a", "a-2": "zone-a", "b-1": "zone-b", "b-2": "zone-b"}


@pytest.fixture
def procs(registry_process: Callable[..., RegistryProcess], tmp_path: Path) -> Iterator[ProcessSet]:
    reg = registry_process()
    ps = ProcessSet(tmp_path, reg.port)
    try:
        yield ps
    finally:
        ps.close()


def calls(front: Sidecar, n: int) -> Counter[str]:
    """`n` calls to `orders` through the caller's outbound listener: who answered."""
    who: Counter[str] = Counter()
    for _ in range(n):
        status, _, body = front.call("http://orders/who")
        who[json.loads(body)["name"] if status == 200 else f"<{status}>"] += 1
    return who


def health(front: Sidecar) -> dict[str, str]:
    """Health of every orders endpoint the caller knows, by instance id."""
    cluster = front.cluster("orders")
    return {ep["id"]: ep["health"] for ep in cluster["endpoints"]} if cluster else {}


def test_zone_preference_spill_over_and_failover(procs: ProcessSet) -> None:
    ids: dict[str, str] = {}
    for name, zone in ORDERS.items():
        sc = procs.sidecar("orders", procs.app(name), "--zone", zone, "--version", "v1")
        ids[name] = sc.instance_id
    front = procs.sidecar("frontend", procs.app("frontend"), "--zone", "zone-a")
    assert front.call("http://orders/who")[0] == 200
    poll(lambda: len(health(front)) == 4, 10, "four orders endpoints discovered")
    cluster = front.cluster("orders")
    assert cluster is not None and cluster["balancer"] == "peak_ewma+locality"
    assert {ep["zone"] for ep in cluster["endpoints"]} == {"zone-a", "zone-b"}

    # Healthy local zone: at least 95% of the calls stay in it (in fact all of them).
    who = calls(front, 200)
    local = who["a-1"] + who["a-2"]
    assert local >= 0.95 * 200, who
    assert who["a-1"] > 0 and who["a-2"] > 0, who  # spread within the zone

    # One of two local instances stops: its check fails, the zone is 50% healthy,
    # below the 70% threshold, so it keeps 0.5 / 0.7 = 71% of the calls and the rest
    # spill over to zone-b. (Bounds: about five standard deviations for n = 400.)
    procs.apps[0].close()  # a-1
    poll(lambda: health(front).get(ids["a-1"]) == "critical", 15, "a-1 critical")
    who = calls(front, 400)
    assert not any(k.startswith("<") for k in who), who
    assert who["a-1"] == 0, who
    assert 0.60 * 400 <= who["a-2"] <= 0.83 * 400, who
    assert who["b-1"] > 0 and who["b-2"] > 0, who

    # The whole local zone is down: everything fails over to zone-b, no errors.
    procs.apps[1].close()  # a-2
    poll(lambda: health(front).get(ids["a-2"]) == "critical", 15, "a-2 critical")
    who = calls(front, 100)
    assert set(who) == {"b-1", "b-2"} and sum(who.values()) == 100, who
