"""The shared policy schema: parsing with lines, round trips, durations, JSON Schema."""

from __future__ import annotations

import json
import random
from pathlib import Path

import jsonschema  # type: ignore[import-untyped]
import pytest
import yaml

from controlplane import schema
from controlplane.schema import (
    API_VERSION,
    Resource,
    RouteSpec,
    SchemaError,
    ServiceDefaultsSpec,
    TrafficSplitSpec,
    check_resource,
    format_duration,
    load_documents,
    parse_duration,
    parse_resources,
)

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "tether" / "demo" / "policies"


def example_resources() -> list[Resource]:
    out: list[Resource] = []
    for f in sorted(EXAMPLES.glob("*.yaml")):
        out += parse_resources(f.read_text(), str(f))
    return out


def test_examples_parse_and_are_valid() -> None:
    resources = example_resources()
    kinds = {r.kind for r in resources}
    assert kinds == {"ServiceDefaults", "Route", "TrafficSplit", "MeshConfig"}
    for r in resources:
        assert check_resource(r) == [], r.key
    split = next(r for r in resources if r.kind == "TrafficSplit")
    assert isinstance(split.spec, TrafficSplitSpec)
    assert [(s.name, s.selector, s.weight) for s in split.spec.subsets] == [
        ("v1", {"version": "v1"}, 90),
        ("v2", {"version": "v2"}, 10),
    ]
    route = next(r for r in resources if r.kind == "Route")
    assert isinstance(route.spec, RouteSpec)
    rule = route.spec.rules[0]
    assert rule.match.headers[0].name == "x-canary"
    assert rule.match.headers[0].exact == "true"
    assert rule.destination.subset == "v2"


def test_round_trip_dict_and_yaml_and_json() -> None:
    for r in example_resources():
        d = r.to_dict()
        assert Resource.from_dict(d) == r
        assert Resource.from_dict(json.loads(json.dumps(d))) == r
        assert parse_resources(schema.dump_yaml([r]))[0] == r
        # Encoding is stable: dict → resource → dict is the identity on encoded dicts.
        assert Resource.from_dict(d).to_dict() == d


def test_defaults_are_left_out_and_filled_in() -> None:
    r = Resource.from_dict(
        {
            "apiVersion": API_VERSION,
            "kind": "ServiceDefaults",
            "metadata": {"name": "orders"},
            "spec": {},
        }
    )
    assert r.metadata.namespace == "default"
    assert isinstance(r.spec, ServiceDefaultsSpec)
    assert r.spec.protocol == "http"
    assert r.spec.load_balancer.policy == "peak_ewma"
    assert r.to_dict()["spec"] == {}
    assert r.to_dict()["metadata"] == {"name": "orders", "namespace": "default"}


def test_mesh_config_is_mesh_wide() -> None:
    doc = {"apiVersion": API_VERSION, "kind": "MeshConfig", "metadata": {"name": "mesh"}}
    r = Resource.from_dict({**doc, "spec": {"egress": {"mode": "deny", "hosts": ["*.x.io"]}}})
    assert r.key == ("MeshConfig", "", "mesh")
    assert "namespace" not in r.to_dict()["metadata"]
    with pytest.raises(SchemaError, match="mesh-wide"):
        Resource.from_dict({**doc, "metadata": {"name": "mesh", "namespace": "a"}, "spec": {}})
    with pytest.raises(SchemaError, match="must be named 'mesh'"):
        Resource.from_dict({**doc, "metadata": {"name": "other"}, "spec": {}})


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("5s", 5.0),
        ("250ms", 0.25),
        ("1m30s", 90.0),
        ("1h", 3600.0),
        ("0.5s", 0.5),
        ("1500ms", 1.5),
        ("100us", 1e-4),
        ("0", 0.0),
        ("2h45m", 9900.0),
    ],
)
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds
    assert parse_duration(format_duration(seconds)) == seconds


@pytest.mark.parametrize("text", ["", "5", "s", "5 s", "-1s", "1d", "5sec", "1m-3s"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(ValueError, match="invalid duration"):
        parse_duration(text)


def test_format_duration_round_trips_random_floats() -> None:
    rng = random.Random(7)
    for _ in range(2000):
        x = rng.choice([rng.uniform(0, 5), rng.randint(0, 10**6) / 1000, rng.randint(1, 500)])
        assert parse_duration(format_duration(x)) == x


def test_lines_for_values_and_keys() -> None:
    text = (
        "# comment\n"
        "apiVersion: tether.dev/v1alpha1\n"  # 2
        "kind: Route\n"
        "metadata:\n"
        "  name: orders\n"  # 5
        "spec:\n"
        "  rules:\n"
        "    - match:\n"  # 8
        "        path:\n"
        "          regex: '/a'\n"  # 10
    )
    (doc,) = load_documents(text, "r.yaml")
    assert doc.line_of(("spec", "rules", 0, "match", "path", "regex")) == 10
    assert doc.line_of(("metadata", "name")) == 5
    assert doc.key_positions[("spec", "rules")] == (7, 3)
    # A path that does not exist points at its nearest ancestor.
    assert doc.line_of(("spec", "rules", 0, "match", "nothing")) == 8


def test_every_schema_problem_has_path_and_line() -> None:
    text = """\
apiVersion: tether.dev/v1alpha1
kind: ServiceDefaults
metadata:
  name: orders
spec:
  protocol: udp
  opaquePorts: [80, "x"]
  loadBalancer:
    policy: ring_hash
    hashPolicies:
      - field: header
        nmae: x-user
  connectTimeout: 5
  retryPolicy: 3
---
apiVersion: tether.dev/v1alpha1
kind: TrafficSplit
metadata:
  name: orders
spec:
  subsets:
    - name: v1
      selector: {version: 2}
      weight: "90"
  sticky: {header: a, cookie: b}
"""
    with pytest.raises(SchemaError) as info:
        parse_resources(text, "p.yaml")
    got = {(p.document, p.path, p.line) for p in info.value.problems}
    assert got == {
        (1, "spec.protocol", 6),
        (1, "spec.opaquePorts[1]", 7),
        (1, "spec.loadBalancer.hashPolicies[0].nmae", 12),
        (1, "spec.connectTimeout", 13),
        (1, "spec.retryPolicy", 14),
        (2, "spec.subsets[0].selector.version", 23),
        (2, "spec.subsets[0].weight", 24),
        (2, "spec.sticky", 25),
    }
    by_path = {p.path: p for p in info.value.problems}
    assert "not supported yet" in by_path["spec.retryPolicy"].message
    assert "quote it" in by_path["spec.subsets[0].selector.version"].message
    assert "unknown field 'nmae'" in by_path["spec.loadBalancer.hashPolicies[0].nmae"].message
    assert "exactly one of header, cookie" in by_path["spec.sticky"].message
    p = by_path["spec.protocol"]
    assert p.file == "p.yaml" and p.kind == "ServiceDefaults" and p.name == "orders"
    where = "p.yaml:6: document 1 (ServiceDefaults default/orders): spec.protocol:"
    assert str(p).startswith(where)


@pytest.mark.parametrize(
    ("kind", "instead"),
    [
        ("AuthorizationPolicy", "the Intention kind"),
        ("MTLSPolicy", "MeshConfig spec.mtls"),
        ("PeerAuthentication", "ServiceDefaults spec.mtls.mode"),
    ],
)
def test_other_meshes_kinds_are_refused_naming_their_replacement(kind: str, instead: str) -> None:
    text = f"apiVersion: {API_VERSION}\nkind: {kind}\nmetadata: {{name: a}}\nspec: {{}}\n"
    with pytest.raises(SchemaError) as info:
        parse_resources(text, "f.yaml")
    (p,) = info.value.problems
    assert p.message.startswith(f"kind {kind} is not a Tether kind: use ") and instead in p.message
    assert (p.path, p.line) == ("kind", 2)


@pytest.mark.parametrize("kind", ["RetryPolicy"])
def test_later_kinds_are_refused_as_not_supported_yet(kind: str) -> None:
    text = f"apiVersion: {API_VERSION}\nkind: {kind}\nmetadata: {{name: a}}\nspec: {{}}\n"
    with pytest.raises(SchemaError) as info:
        parse_resources(text, "f.yaml")
    (p,) = info.value.problems
    assert p.message == f"kind {kind} is not supported yet"
    assert (p.path, p.line) == ("kind", 2)


@pytest.mark.parametrize(
    ("kind", "field"),
    [("FaultInjection", "fault"), ("Mirror", "mirror"), ("RateLimit", "rateLimit")],
)
def test_reserved_kinds_name_the_route_field_that_replaces_them(kind: str, field: str) -> None:
    text = f"apiVersion: {API_VERSION}\nkind: {kind}\nmetadata: {{name: a}}\nspec: {{}}\n"
    with pytest.raises(SchemaError) as info:
        parse_resources(text, "f.yaml")
    (p,) = info.value.problems
    assert p.message.startswith(f"kind {kind} is not a Tether kind: use a Route rule's '{field}'")
    assert (p.path, p.line) == ("kind", 2)


def test_yaml_syntax_error_and_duplicate_keys_have_lines() -> None:
    with pytest.raises(SchemaError) as info:
        load_documents("a: 1\n---\nb: [1, 2\nc: 3\n", "s.yaml")
    (p,) = info.value.problems
    assert p.file == "s.yaml" and p.line is not None and p.line >= 3
    assert "invalid YAML" in p.message
    (doc,) = load_documents("kind: Route\nkind: Route\n", "d.yaml")
    assert [(d.message, d.line) for d in doc.problems] == [("duplicate key 'kind'", 2)]


def test_alias_bombs_and_deep_nesting_are_refused() -> None:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    for i in range(1, 9):
        prev = f"*a{i - 1}"
        lines.append(f"a{i}: &a{i} [{', '.join([prev] * 10)}]")
    with pytest.raises(SchemaError, match="more than 100000 values"):
        load_documents("\n".join(lines) + "\n", "bomb.yaml")
    with pytest.raises(SchemaError, match="nested too deeply"):
        load_documents("a: " + "[" * 100 + "]" * 100 + "\n", "deep.yaml")


def test_empty_documents_are_skipped_but_counted() -> None:
    text = f"---\n# nothing\n---\napiVersion: {API_VERSION}\nkind: Route\nmetadata:\n  name: a\n"
    (doc,) = load_documents(text)
    assert doc.index == 2


def test_wrong_top_level_shapes() -> None:
    for data, needle in [
        ([], "must be a mapping"),
        ({"kind": "Route"}, "missing field 'apiVersion'"),
        (
            {"apiVersion": "v1", "kind": "Route", "metadata": {"name": "a"}, "spec": {"rules": []}},
            "unsupported apiVersion",
        ),
        (
            {"apiVersion": API_VERSION, "kind": "Nope", "metadata": {"name": "a"}, "spec": {}},
            "unknown kind 'Nope'",
        ),
        (
            {"apiVersion": API_VERSION, "kind": "Route", "spec": {"rules": []}},
            "missing field 'metadata'",
        ),
        (
            {"apiVersion": API_VERSION, "kind": "Route", "metadata": {"name": "a"}},
            "missing field 'spec'",
        ),
        (
            {"apiVersion": API_VERSION, "kind": "Route", "metadata": {"name": "a"}, "spec": {}},
            "missing field 'rules'",
        ),
    ]:
        with pytest.raises(SchemaError, match=needle):
            Resource.from_dict(data)


def test_check_resource_meaning() -> None:
    def problems(kind: str, spec: object, name: str = "orders") -> dict[str, str]:
        res = Resource.from_dict(
            {"apiVersion": API_VERSION, "kind": kind, "metadata": {"name": name}, "spec": spec}
        )
        return {p.path: p.message for p in check_resource(res)}

    got = problems(
        "TrafficSplit",
        {
            "subsets": [
                {"name": "a", "selector": {"v": "1"}, "weight": 60},
                {"name": "a", "selector": {}, "weight": 30},
            ]
        },
    )
    assert got["spec.subsets"] == "weights sum to 90, not 100"
    assert "already defined" in got["spec.subsets[1].name"]
    assert "at least one Meta key" in got["spec.subsets[1].selector"]
    got = problems(
        "Route",
        {
            "rules": [
                {"match": {"path": {"prefix": "/api"}}},
                {"match": {"path": {"prefix": "/api"}}},
                {"match": {"path": {"regex": "(a"}}},
                {"match": {"path": {"prefix": "/"}}},
                {"match": {"method": "get"}},
            ]
        },
    )
    assert "same match" in got["spec.rules[1]"]
    assert "invalid regular expression" in got["spec.rules[2].match.path.regex"]
    assert "rule [3] before it matches every request" in got["spec.rules[4]"]
    got = problems("Route", {"rules": [{"requestHeaders": {"set": {"Content-Length": "1"}}}]})
    assert "managed by the proxy" in got["spec.rules[0].requestHeaders.set.Content-Length"]
    got = problems("ServiceDefaults", {"loadBalancer": {"policy": "maglev", "tableSize": 100}})
    assert "needs 'hashPolicies'" in got["spec.loadBalancer"]
    assert "prime" in got["spec.loadBalancer.tableSize"]
    assert "invalid name" in problems("Route", {"rules": []}, name="Orders_1")["metadata.name"]


def test_committed_json_schema_is_current() -> None:
    stale = schema.stale_schema_files(ROOT / "docs" / "schema")
    assert stale == [], "run: python -m controlplane.schema --write docs/schema"


def test_json_schema_accepts_examples_and_rejects_bad_documents() -> None:
    validators = {k: jsonschema.Draft202012Validator(schema.json_schema(k)) for k in schema.KINDS}
    for f in sorted(EXAMPLES.glob("*.yaml")):
        for doc in yaml.safe_load_all(f.read_text()):
            errors = list(validators[doc["kind"]].iter_errors(doc))
            assert errors == [], (f, doc["kind"], errors[:1])
    for r in example_resources():  # what the store writes, generation included
        assert list(validators[r.kind].iter_errors(r.with_generation(3).to_dict())) == []
    bad = {
        "apiVersion": API_VERSION,
        "kind": "Route",
        "metadata": {"name": "a"},
        "spec": {"rules": [{"match": {"path": {"exact": "/", "prefix": "/"}}}]},
    }
    assert list(validators["Route"].iter_errors(bad))
    bad["spec"] = {"rules": [], "bogus": 1}
    assert list(validators["Route"].iter_errors(bad))


def test_the_schema_imports_nothing_else_of_the_control_plane() -> None:
    import subprocess
    import sys

    code = (
        "import sys, controlplane.schema as s; "
        "bad = [m for m in sys.modules if m.startswith(('aiohttp', 'consul', 'proxy'))] + "
        "[m for m in sys.modules if m.startswith('controlplane.') and m != 'controlplane.schema'];"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_the_sidecar_and_the_control_plane_share_only_the_wire_package() -> None:
    """A sidecar loads nothing of `controlplane/` and no PyYAML (the resources and the
    push protocol are `wire`); the control plane loads nothing of `proxy/`."""
    import subprocess
    import sys

    sidecar = (
        "import sys, proxy.sidecar, proxy.policy, proxy.policy_client, proxy.policy_router; "
        "bad = [m for m in sys.modules if m.startswith(('controlplane', 'yaml'))]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    control = (
        "import sys, controlplane.server, controlplane.push, controlplane.api, "
        "controlplane.validation, controlplane.store; "
        "bad = [m for m in sys.modules if m == 'proxy' or m.startswith('proxy.')]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    for code in (sidecar, control):
        proc = subprocess.run(
            [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
