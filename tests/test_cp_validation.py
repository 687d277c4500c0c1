"""Validation before storage: every error names file, document, field path and line."""

from __future__ import annotations

from pathlib import Path

from controlplane.schema import Resource, ResourceKey, parse_resources
from controlplane.validation import Validated, decode_files, identities, validate, validate_deletion

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "tether" / "demo" / "policies").glob("*.yaml"))

HEAD = "apiVersion: tether.dev/v1alpha1\n"


def example_files() -> list[tuple[str, str]]:
    return [(str(p), p.read_text()) for p in EXAMPLES]


def existing_examples() -> dict[ResourceKey, Resource]:
    out = {}
    for name, text in example_files():
        for r in parse_resources(text, name):
            out[r.key] = r
    return out


def located(result: Validated) -> set[tuple[str | None, int | None, str, int | None]]:
    return {(p.file, p.document, p.path, p.line) for p in result.problems}


def test_examples_validate_cleanly() -> None:
    result = validate(example_files())
    assert result.ok, [str(p) for p in result.problems]
    assert len(result.resources) == 6


MULTI = (
    HEAD + "kind: TrafficSplit\n"  # 1-2
    "metadata: {name: orders}\n"  # 3
    "spec:\n"
    "  subsets:\n"  # 5
    "    - {name: v1, selector: {version: v1}, weight: 70}\n"  # 6
    "    - {name: v2, selector: {version: v2}, weight: 20}\n"  # 7
    "---\n"  # 8
     + HEAD + "kind: Route\n"  # 9-10
    "metadata: {name: orders}\n"  # 11
    "spec:\n"
    "  rules:\n"  # 13
    "    - match: {path: {prefix: /}}\n"  # 14
    "    - match:\n"  # 15
    "        path: {regex: '/a(['}\n"  # 16
    "    - match: {headers: [{name: x-v, regex: '*'}]}\n"  # 17
    "      destination: {subset: v3}\n"  # 18
    "---\n"  # 19
     + HEAD + "kind: ServiceDefaults\n"  # 20-21
    "metadata: {name: orders, namespace: Bad_NS}\n"  # 22
    "spec: {protocol: http}\n"
)


def test_multi_document_errors_name_document_path_and_line() -> None:
    result = validate([("policy.yaml", MULTI)])
    assert not result.ok
    got = located(result)
    assert got == {
        ("policy.yaml", 1, "spec.subsets", 5),
        ("policy.yaml", 2, "spec.rules[1]", 15),
        ("policy.yaml", 2, "spec.rules[1].match.path.regex", 16),
        ("policy.yaml", 2, "spec.rules[2]", 17),
        ("policy.yaml", 2, "spec.rules[2].match.headers[0].regex", 17),
        ("policy.yaml", 3, "metadata.namespace", 22),
    }
    msgs = {(p.document, p.path): p.message for p in result.problems}
    assert msgs[(1, "spec.subsets")] == "weights sum to 90, not 100"
    assert "rule [0] before it matches every request" in msgs[(2, "spec.rules[1]")]
    assert "invalid regular expression" in msgs[(2, "spec.rules[1].match.path.regex")]
    texts = [str(p) for p in result.problems]
    assert any(
        t.startswith(
            "policy.yaml:16: document 2 (Route default/orders): "
            "spec.rules[1].match.path.regex: invalid regular expression"
        )
        for t in texts
    ), texts
    # Resources that decoded are still reported, so the caller knows what was meant.
    assert {r.kind for r in result.resources} == {"TrafficSplit", "Route", "ServiceDefaults"}


def test_route_to_undefined_subset_is_an_error_with_line() -> None:
    route = (
        HEAD + "kind: Route\nmetadata: {name: orders}\nspec:\n  rules:\n"
        "    - match: {headers: [{name: x-canary, exact: 'true'}]}\n"
        "      destination: {subset: v3}\n"  # 7
    )
    result = validate([("r.yaml", route)], existing_examples())
    (p,) = result.errors
    assert (p.file, p.document, p.path, p.line) == (
        "r.yaml",
        1,
        "spec.rules[0].destination.subset",
        7,
    )
    assert "not defined by TrafficSplit default/orders (it defines v1, v2)" in p.message
    # Without any TrafficSplit at all:
    result = validate([("r.yaml", route)])
    assert "no TrafficSplit default/orders defines subsets" in result.errors[0].message
    # Defined in the same apply, in another file: fine.
    split = (
        HEAD + "kind: TrafficSplit\nmetadata: {name: orders}\nspec:\n  subsets:\n"
        "    - {name: v3, selector: {version: v3}, weight: 100}\n"
    )
    assert validate([("r.yaml", route), ("s.yaml", split)]).ok


def test_changing_a_split_under_a_route_is_blamed_on_the_split() -> None:
    split = (
        HEAD + "kind: TrafficSplit\nmetadata: {name: orders}\nspec:\n  subsets:\n"
        "    - {name: v1, selector: {version: v1}, weight: 100}\n"
    )
    result = validate([("s.yaml", split)], existing_examples())
    (p,) = result.errors
    assert (p.file, p.path, p.line) == ("s.yaml", "spec.subsets", 5)
    assert "subset 'v2' is still used by Route default/orders rules[0]" in p.message


def test_deleting_a_split_a_route_uses_is_refused() -> None:
    existing = existing_examples()
    problems = validate_deletion([ResourceKey("TrafficSplit", "default", "orders")], existing)
    assert len(problems) == 1
    assert "TrafficSplit default/orders" in str(problems[0])
    # Deleting the Route with it is fine.
    both = [
        ResourceKey("TrafficSplit", "default", "orders"),
        ResourceKey("Route", "default", "orders"),
    ]
    assert validate_deletion(both, existing) == []


def test_namespaces_isolate() -> None:
    # The split that defines v2 lives in namespace `shop`; the Route in `default` can't see it.
    split = (
        HEAD + "kind: TrafficSplit\nmetadata: {name: orders, namespace: shop}\nspec:\n"
        "  subsets:\n    - {name: v2, selector: {version: v2}, weight: 100}\n"
    )
    route = (
        HEAD + "kind: Route\nmetadata: {name: orders}\nspec:\n  rules:\n"
        "    - destination: {subset: v2}\n"
    )
    result = validate([("s.yaml", split), ("r.yaml", route)])
    (p,) = result.errors
    assert p.file == "r.yaml" and "no TrafficSplit default/orders" in p.message
    # The same names in two namespaces are two resources.
    route_shop = route.replace("{name: orders}", "{name: orders, namespace: shop}")
    result = validate(
        [
            ("s.yaml", split),
            ("r.yaml", route_shop),
            ("r2.yaml", route_shop.replace("namespace: shop", "namespace: shop2")),
        ]
    )
    assert [p.file for p in result.errors] == ["r2.yaml"]
    # Subset warnings only count instances of the resource's namespace.
    instances = {("shop", "orders"): [{"version": "v2", "namespace": "shop"}]}
    assert validate([("s.yaml", split)], instances=instances).warnings == []
    other_ns = {("shop", "orders"): [{"version": "v1", "namespace": "shop"}]}
    (w,) = validate([("s.yaml", split)], instances=other_ns).warnings
    assert (w.path, w.line, w.severity) == ("spec.subsets[0].selector", 6, "warning")
    # No instance at all in the namespace: the service itself is named (a typo?).
    (w,) = validate([("s.yaml", split)], instances={("shop", "orders"): []}).warnings
    assert (w.path, w.severity) == ("metadata.name", "warning")
    assert "no instance of service shop/orders is registered" in w.message


def test_subset_selecting_nothing_is_a_warning_not_an_error() -> None:
    instances = {("default", "orders"): [{"version": "v1"}, {"version": "v1", "zone": "a"}]}
    result = validate(example_files(), instances=instances)
    assert result.ok
    (w,) = result.warnings
    assert w.path == "spec.subsets[1].selector"
    assert "subset 'v2' selects no instance of default/orders yet (of 2 registered)" in w.message
    assert w.line == 30 and w.file is not None and w.file.endswith("orders.yaml")


def test_route_on_a_tcp_service_is_refused() -> None:
    sd = HEAD + "kind: ServiceDefaults\nmetadata: {name: orders}\nspec: {protocol: tcp}\n"
    result = validate([("sd.yaml", sd)], existing_examples())
    (p,) = result.errors
    assert p.file == "sd.yaml" and p.path == "spec.protocol" and "tcp" in p.message


def test_same_resource_twice_in_one_apply() -> None:
    doc = HEAD + "kind: ServiceDefaults\nmetadata: {name: orders}\nspec: {}\n"
    result = decode_files([("a.yaml", doc), ("b.yaml", doc)])
    (p,) = result.errors
    assert p.file == "b.yaml" and "already defined in a.yaml document 1" in p.message


def test_identities_for_delete_ignore_the_spec() -> None:
    text = (
        HEAD
        + "kind: TrafficSplit\nmetadata: {name: orders}\nspec: {bogus: 1}\n---\n"
        + HEAD
        + "kind: MeshConfig\nmetadata: {name: mesh}\n---\n"
        + HEAD
        + "kind: RetryPolicy\nmetadata: {name: x}\n"
    )
    keys, problems = identities([("d.yaml", text)])
    assert keys == [
        ResourceKey("TrafficSplit", "default", "orders"),
        ResourceKey("MeshConfig", "", "mesh"),
    ]
    assert [(p.document, p.path, p.line) for p in problems] == [(3, "kind", 11)]
