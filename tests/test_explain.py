"""`tether explain`'s logic (tether/explain.py) on the example policies: golden outputs
(TETHER_UPDATE_GOLDEN=1 rewrites them), and the rule it names is the one the sidecar's
own compiled table picks."""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import pytest

from controlplane.operator import read_inputs
from controlplane.schema import parse_resources
from proxy.policy import compile_table, decode
from tether.explain import ExplainError, ExplainRequest, explain, why_not

ROOT = Path(__file__).resolve().parent.parent
POLICIES = ROOT / "tether" / "demo" / "policies"
GOLDEN = Path(__file__).resolve().parent / "data" / "explain"

SERVICES = [
    {
        "service": "orders",
        "instances": [
            {"id": "orders-1", "address": "10.0.0.1:15006", "namespace": "default",
             "zone": "a", "version": "v1", "health": "passing"},
            {"id": "orders-2", "address": "10.0.0.2:15006", "namespace": "default",
             "zone": "b", "version": "v1", "health": "passing"},
            {"id": "orders-3", "address": "10.0.0.3:15006", "namespace": "default",
             "zone": "a", "version": "v2", "health": "critical"},
        ],
    },
    {
        "service": "payments",
        "instances": [
            {"id": "payments-1", "address": "10.0.1.1:15006", "namespace": "default",
             "zone": "a", "version": "v1", "health": "passing"},
        ],
    },
]  # fmt: skip
SIDECARS = [
    {"service": "frontend", "namespace": "default", "acked_version": 7},
    {"service": "frontend", "namespace": "default", "acked_version": 6},
]

CASES: dict[str, ExplainRequest] = {
    "orders-canary": ExplainRequest(
        "http://orders/api/v1/items", headers={"x-canary": "true"}, caller="frontend"
    ),
    "orders-split": ExplainRequest("http://orders/api/v1/items", caller="frontend"),
    "payments-fault": ExplainRequest("http://payments/pay", "POST", {"x-chaos": "on"}),
    "payments-plain": ExplainRequest("http://payments/pay", "POST"),
    "shop-redirect": ExplainRequest("http://legacy-shop/shop/cart?id=3"),
    "shop-rewrite": ExplainRequest("http://legacy-shop/api/v1/products"),
    "shop-regex": ExplainRequest("http://legacy-shop/users/42/avatar"),
    "reports-limits": ExplainRequest("http://reports/summary", headers={"x-tenant": "acme"}),
    "search-mirror": ExplainRequest("http://search/q?text=shoes"),
    "egress": ExplainRequest("https://api.example.com/v1/charge"),
}


def documents() -> list[dict[str, Any]]:
    docs = []
    for name, text in read_inputs([str(POLICIES), str(POLICIES / "traffic")]):
        docs += [r.to_dict() for r in parse_resources(text, name)]
    return docs


@pytest.mark.parametrize("case", sorted(CASES))
def test_golden(case: str) -> None:
    text = "\n".join(explain(CASES[case], documents(), SERVICES, SIDECARS, 7)) + "\n"
    want = GOLDEN / f"{case}.txt"
    if os.environ.get("TETHER_UPDATE_GOLDEN"):
        want.write_text(text)
    assert text == want.read_text(), f"{want.name} differs (TETHER_UPDATE_GOLDEN=1 rewrites)"


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_named_rule_is_the_sidecars_choice(case: str) -> None:
    req = CASES[case]
    table, _ = compile_table(decode(documents()))
    host = req.url.split("//")[1].split("/")[0]
    pol = table.policy("default", host)
    lines = explain(req, documents(), SERVICES, SIDECARS, 7)
    named = [ln.split(":")[0].strip() for ln in lines if "MATCHES" in ln]
    if pol is None or not pol.rules:
        assert named == []
        return
    path, _, qs = req.url.split(host, 1)[1].partition("?")
    headers = {k.lower(): v for k, v in req.headers.items()}
    fields = [(k.encode(), v.encode()) for k, v in headers.items()]
    rule = pol.match(req.method, path, pol.read_headers(fields), qs)
    decision = table.decide(pol, req.method, path, pol.read_headers(fields), random.Random(1))
    if rule is None:
        assert named == [] and decision.rule is None
    else:
        assert named == [f"rules[{pol.rules.index(rule)}]"]
        assert decision.rule is rule


def test_why_not_names_each_failing_condition() -> None:
    table, _ = compile_table(decode(documents()))
    pol = table.policy("default", "orders")
    assert pol is not None
    assert why_not(pol.rules[0].match, "GET", "/", {}, {}) == [
        "header x-canary is absent, wanted exact 'true'"
    ]
    assert why_not(pol.rules[0].match, "GET", "/", {"x-canary": "true"}, {}) == []


def test_bad_urls_and_policies_are_clear_errors() -> None:
    with pytest.raises(ExplainError, match="invalid URL"):
        explain(ExplainRequest("http://a b/"), [])
    bad = {"apiVersion": "tether.dev/v1alpha1", "kind": "Route", "metadata": {"name": "x"},
           "spec": {"rules": [{"destination": {"subset": "nope"}}]}}  # fmt: skip
    with pytest.raises(ExplainError, match="does not compile"):
        explain(ExplainRequest("http://x/"), [bad])
