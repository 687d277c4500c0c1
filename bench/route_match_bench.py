"""Route matching with many rules: CPU per request of the policy step, and compile time.

The outbound sidecar matches a request against its destination's Route rules in order
(proxy/routing.py, first match wins), each condition by its compiled matcher; a Route's
rules are compiled once per snapshot (proxy/policy.py). This measures, in-process, what
one request pays for `ServicePolicy.match` + the split draw with 1,000 rules (path
prefixes, exact paths, RE2 regexes, header and method conditions, mixed), when the
first rule matches, a middle one, the last one, and none; what a matched rule's filters
add (a token-bucket check, a fault draw); and how long compiling the 1,000-rule
snapshot takes. Best of 7 repeats; results go to docs/benchmarks.md by hand.

    .venv/bin/python -m bench.route_match_bench [--rules 1000]
"""

from __future__ import annotations

import argparse
import random
import time
import timeit
from typing import Any

from proxy.policy import compile_table, decode


def route(rules: int) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for i in range(rules - 1):
        kind = i % 4
        if kind == 0:
            match: dict[str, Any] = {"path": {"prefix": f"/api/r{i}/"}}
        elif kind == 1:
            match = {"path": {"exact": f"/items/{i}"}, "method": "GET"}
        elif kind == 2:
            match = {"path": {"regex": f"/users/[0-9]+/r{i}"}}
        else:
            match = {"headers": [{"name": "x-tenant", "exact": f"t{i}"}]}
        out.append({"match": match, "destination": {"subset": "v2" if i % 2 else "v1"}})
    # The last rule: what the "last" case matches, with a rate limit and a fault.
    out.append(
        {
            "match": {"path": {"prefix": "/last/"}},
            "rateLimit": {"requests": 1_000_000_000, "interval": "1s"},
            "fault": {"abort": {"status": 503, "percentage": 0}},
        }
    )
    return [
        {"apiVersion": "tether.dev/v1alpha1", "kind": "Route",
         "metadata": {"name": "orders"}, "spec": {"rules": out}},
        {"apiVersion": "tether.dev/v1alpha1", "kind": "TrafficSplit",
         "metadata": {"name": "orders"},
         "spec": {"subsets": [{"name": "v1", "selector": {"version": "v1"}, "weight": 90},
                              {"name": "v2", "selector": {"version": "v2"}, "weight": 10}]}},
    ]  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--rules", type=int, default=1000)
    args = ap.parse_args()
    docs = route(args.rules)
    t0 = time.perf_counter()
    table, _ = compile_table(decode(docs), 1)
    compile_ms = (time.perf_counter() - t0) * 1000
    pol = table.policy("default", "orders")
    assert pol is not None
    rng = random.Random(1)
    headers = [(b"Host", b"orders"), (b"User-Agent", b"curl/8"), (b"Accept", b"*/*"),
               (b"X-Request-Id", b"abc"), (b"X-Tenant", b"nobody")]  # fmt: skip
    n = args.rules
    cases = [
        ("first rule matches", "/api/r0/x"),
        (f"rule {n // 2} matches (a prefix)", f"/api/r{(n // 2) // 4 * 4}/x"),
        (f"rule {n} (the last) matches", "/last/x"),
        ("no rule matches (the split decides)", "/none"),
    ]
    print(f"{n} rules: compiled (decode + check + compile) in {compile_ms:.1f} ms")
    print("| request | µs CPU per request |")
    print("|---|---|")
    for name, target in cases:

        def step(target: str = target) -> None:
            d = table.decide(pol, "GET", target, pol.read_headers(headers), rng)
            rule = d.rule
            if rule is not None and rule.filters is not None:
                f = rule.filters
                if f.rate_limit is not None:
                    f.rate_limit.check({}, None, 0.0)
                if f.fault is not None:
                    f.fault.draw({}, rng)

        best = min(timeit.repeat(step, number=2000, repeat=7)) / 2000
        print(f"| {name} | {best * 1e6:.1f} |")


if __name__ == "__main__":
    main()
