"""The rule index (proxy/rule_index.py) picks the rule a linear scan picks: a differential
test over random rules and requests (seeded), and the index is used past INDEX_MIN."""

from __future__ import annotations

import dataclasses
import random

from proxy.routing import RequestMatch, RouteRule, ServicePolicy, StringMatch
from proxy.rule_index import INDEX_MIN, RuleIndex

PATHS = ["/", "/a", "/a/b", "/a/bc", "/ab", "/users/1/x", "/users/22/y", "/z", "/a/b/c"]
VALUES = ["1", "2", "x", ""]


def random_rule(rng: random.Random, i: int) -> RouteRule:
    path = None
    k = rng.randrange(4)
    if k == 0:
        path = StringMatch.of("exact", rng.choice(PATHS))
    elif k == 1:
        path = StringMatch.of("prefix", rng.choice(PATHS)[: rng.randrange(1, 5)] or "/")
    elif k == 2:
        path = StringMatch.of("regex", rng.choice(["/users/[0-9]+/.*", "/a.*", "/[a-z]", ".*"]))
    headers = []
    for _ in range(rng.randrange(3)):
        name = rng.choice(["x-a", "x-b"])
        kind = rng.choice(["exact", "exact", "present", "absent", "regex"])
        value = rng.choice(VALUES) if kind != "regex" else "[0-9]"
        headers.append((name, StringMatch.of(kind, value)))  # type: ignore[arg-type]
    methods = frozenset({rng.choice(["GET", "POST"])}) if rng.random() < 0.2 else frozenset()
    query = (("q", StringMatch.of("exact", "1")),) if rng.random() < 0.1 else ()
    return RouteRule(RequestMatch(methods, path, tuple(headers), query), f"s{i}", "default")


def test_indexed_and_linear_matching_agree() -> None:
    rng = random.Random(20261203)
    for _ in range(200):
        rules = tuple(random_rule(rng, i) for i in range(rng.randrange(1, 60)))
        linear = ServicePolicy("svc", "default", rules)
        indexed = dataclasses.replace(linear, index=RuleIndex(rules))
        for _ in range(50):
            path = rng.choice(PATHS)
            headers = {n: rng.choice(VALUES) for n in ("x-a", "x-b") if rng.random() < 0.6}
            method = rng.choice(["GET", "POST"])
            qs = rng.choice(["", "q=1", "q=2"])
            want = linear.match(method, path, headers, qs)
            assert indexed.match(method, path, headers, qs) is want, (rules, path, headers)


def test_routes_past_index_min_get_an_index() -> None:
    from proxy.policy import compile_table
    from wire.resources import Resource

    def table(n: int) -> ServicePolicy:
        rules = [{"match": {"path": {"exact": f"/p{i}"}}} for i in range(n)]
        doc = {"apiVersion": "tether.dev/v1alpha1", "kind": "Route", "metadata": {"name": "o"},
               "spec": {"rules": rules}}  # fmt: skip
        pol = compile_table([Resource.from_dict(doc)])[0].policy("default", "o")
        assert pol is not None
        return pol

    assert table(INDEX_MIN).index is None
    big = table(INDEX_MIN + 1)
    assert big.index is not None
    assert big.match("GET", f"/p{INDEX_MIN}", {}) is big.rules[INDEX_MIN]
    assert big.match("GET", "/nope", {}) is None
