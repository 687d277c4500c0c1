"""CPU cost of each balancer on the hot path: pick + on_start + on_end, per request.

A plain timed loop (bounded: `--count` requests per round, `--rounds` rounds, the best
round kept, as other work shares the cores) over each policy, bare and under the
locality layer, for clusters of 3, 10 and 100 endpoints; the hashing policies hash a
header per request, as the proxy will ask them to. Also the time of a membership
rebuild (`update`), which ring hash and Maglev pay on membership changes. Prints a
Markdown table for docs/benchmarks.md.

    .venv/bin/python -m bench.balance_bench [--count 20000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import platform
import random
import statistics
import time
from collections.abc import Callable

from proxy.balance import (
    POLICIES,
    Balancer,
    Endpoint,
    HashPolicy,
    LoadBalancerPolicy,
    PickContext,
    build_balancer,
)

SIZES = (3, 10, 100)
ZONES = ("zone-a", "zone-b", "zone-c")


def cluster(n: int) -> list[Endpoint]:
    return [
        Endpoint(f"svc-{i}", "10.0.0.1", 20000 + i, zone=ZONES[i % len(ZONES)]) for i in range(n)
    ]


def contexts() -> list[PickContext]:
    return [PickContext(header={"x-user": f"user-{i}"}.get) for i in range(1024)]


def per_request_us(b: Balancer, count: int, rounds: int) -> float:
    ctxs = contexts()
    rng = random.Random(1)
    samples = []
    now = 1000.0
    tracker = b.tracker  # the proxy reports outcomes to the picking balancer's tracker
    for r in range(rounds + 1):  # round 0 warms up (caches, the interpreter) and is dropped
        start = time.process_time()
        for i in range(count):
            ep = b.pick(ctxs[i & 1023], now, rng)
            if ep is not None:
                tracker.on_start(ep, now)
                tracker.on_end(ep, now + 0.001, 0.001, True)
            now += 0.0001
        if r:
            samples.append((time.process_time() - start) / count * 1e6)
    return min(samples)


def rebuild_ms(make: Callable[[], Balancer], n: int) -> tuple[float, float]:
    """Milliseconds to build over `n` endpoints, and to take in one more."""
    eps = cluster(n + 1)
    build, join = [], []
    for _ in range(3):
        b = make()
        start = time.process_time()
        b.update(eps[:n])
        build.append((time.process_time() - start) * 1e3)
        start = time.process_time()
        b.update(eps)
        join.append((time.process_time() - start) * 1e3)
    return statistics.median(build), statistics.median(join)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    count = max(1000, min(args.count, 1_000_000))
    rounds = max(1, min(args.rounds, 20))

    print(f"python {platform.python_version()}, {count} requests x {rounds} rounds, best round\n")
    header = " | ".join(f"{n} endpoints" for n in SIZES)
    print(f"| policy | {header} | build, 100 endpoints | one more joins |")
    print("|---" * (len(SIZES) + 3) + "|")
    for name in POLICIES:
        policy = LoadBalancerPolicy(policy=name, hash_policies=(HashPolicy("header", "x-user"),))
        for zone in ("", "zone-a"):
            label = name + (" + locality" if zone else "")
            cells = []
            for n in SIZES:
                b = build_balancer(policy, local_zone=zone)
                b.update(cluster(n))
                cells.append(f"{per_request_us(b, count, rounds):.2f} µs")
            build, join = rebuild_ms(lambda p=policy, z=zone: build_balancer(p, local_zone=z), 100)
            print(f"| {label} | {' | '.join(cells)} | {build:.1f} ms | {join:.1f} ms |")


if __name__ == "__main__":
    main()
