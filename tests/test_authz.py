"""The intentions evaluator (wire/authz.py): precedence, L4 and L7, default action,
anonymous callers and namespace isolation, as pure decisions."""

from __future__ import annotations

import itertools
from typing import Any

import pytest

from wire import authz
from wire.authz import Intentions, Source, precedence, source_of_spiffe_id
from wire.resources import API_VERSION, Resource, SchemaError, check_resource

WEB = Source("default", "web")
BILLING = Source("default", "billing")
PAY_WEB = Source("payments", "web")
SHOP_WEB = Source("shop", "web")


def intention(name: str, sources: list[dict[str, Any]], namespace: str = "default") -> Resource:
    res = Resource.from_dict(
        {
            "apiVersion": API_VERSION,
            "kind": "Intention",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"sources": sources},
        }
    )
    assert [p for p in check_resource(res) if p.is_error] == []
    return res


def mesh(default: str | None = None, isolated: tuple[str, ...] = ()) -> Resource:
    spec: dict[str, Any] = {}
    if default:
        spec["authorization"] = {"defaultAction": default}
    if isolated:
        spec["mtls"] = {"namespaces": {ns: {"isolated": True} for ns in isolated}}
    return Resource.from_dict(
        {
            "apiVersion": API_VERSION,
            "kind": "MeshConfig",
            "metadata": {"name": "mesh"},
            "spec": spec,
        }
    )


def policy(*resources: Resource, ns: str = "default", svc: str = "api") -> authz.DestinationPolicy:
    return Intentions.compile(resources).for_destination(ns, svc)


# -- precedence --------------------------------------------------------------------------


def test_precedence_is_consuls_table() -> None:
    # Consul's documented table: (source ns, source name, destination ns, name) → value.
    table = {
        ("a", "b", "c", "d"): 9,
        ("a", "*", "c", "d"): 8,
        ("*", "*", "c", "d"): 7,
        ("a", "b", "c", "*"): 6,
        ("a", "*", "c", "*"): 5,
        ("*", "*", "c", "*"): 4,
        ("a", "b", "*", "*"): 3,
        ("a", "*", "*", "*"): 2,
        ("*", "*", "*", "*"): 1,
    }
    for key, value in table.items():
        assert precedence(*key) == value, key


def test_every_specificity_pair_most_specific_wins() -> None:
    """For each pair of rules that both match default/web → default/api, the one with the
    higher precedence decides, whichever order they were written in."""
    shapes = [  # (destination name, destination namespace, source namespace, source name)
        ("api", "default", "default", "web"),
        ("api", "default", "default", "*"),
        ("api", "default", "*", "*"),
        ("*", "default", "default", "web"),
        ("*", "default", "default", "*"),
        ("*", "default", "*", "*"),
        ("*", "*", "default", "web"),
        ("*", "*", "default", "*"),
        ("*", "*", "*", "*"),
    ]
    for a, b in itertools.permutations(shapes, 2):
        for first_action in ("allow", "deny"):
            other = "deny" if first_action == "allow" else "allow"
            docs = [
                intention(a[0], [{"name": a[3], "namespace": a[2], "action": first_action}], a[1]),
                intention(b[0], [{"name": b[3], "namespace": b[2], "action": other}], b[1]),
            ]
            d = policy(*docs).decide(WEB)
            expect = (
                first_action
                if precedence(a[2], a[3], a[1], a[0]) > precedence(b[2], b[3], b[1], b[0])
                else other
            )
            assert d.allowed == (expect == "allow"), (a, b, first_action, d.reason)
            assert d.rule is not None and d.rule.action == expect


def test_rules_sorted_highest_precedence_first_and_stable() -> None:
    docs = [
        intention("*", [{"name": "*", "namespace": "*", "action": "deny"}], "*"),
        intention("api", [{"name": "web", "action": "allow"}, {"name": "*", "action": "deny"}]),
        intention("*", [{"name": "zeta", "action": "allow"}, {"name": "alpha", "action": "allow"}]),
    ]
    rules = Intentions.compile(docs).rules
    assert [r.precedence for r in rules] == [9, 8, 6, 6, 1]
    assert [r.source_name for r in rules if r.precedence == 6] == ["alpha", "zeta"]
    assert Intentions.compile(reversed(docs)).rules == rules


# -- L4 ----------------------------------------------------------------------------------


def test_l4_allow_and_deny_by_source() -> None:
    p = policy(
        intention(
            "api", [{"name": "web", "action": "allow"}, {"name": "billing", "action": "deny"}]
        ),
        mesh("deny"),
    )
    assert p.decide(WEB).allowed
    d = p.decide(BILLING)
    assert not d.allowed and "default/billing => default/api" in d.reason
    d = p.decide(Source("default", "other"))
    assert not d.allowed and "Default behavior" in d.reason and d.rule is None


def test_default_action_allow_when_unset_and_deny_when_set() -> None:
    assert policy().decide(WEB).allowed
    assert policy().trivially_allows
    assert policy(mesh()).decide(WEB).allowed
    assert not policy(mesh("deny")).decide(WEB).allowed
    assert not policy(mesh("deny")).trivially_allows


def test_rules_of_other_destinations_do_not_apply() -> None:
    docs = [
        intention("orders", [{"name": "web", "action": "deny"}]),
        intention("api", [{"name": "web", "action": "deny"}], namespace="shop"),
    ]
    p = policy(*docs)
    assert p.rules == ()
    assert p.decide(WEB).allowed
    assert policy(*docs, ns="shop").decide(WEB).allowed  # its source is shop/web
    assert not policy(*docs, ns="shop").decide(SHOP_WEB).allowed


def test_source_namespace_defaults_to_the_intentions() -> None:
    p = policy(intention("api", [{"name": "web", "action": "deny"}], namespace="shop"), ns="shop")
    assert not p.decide(SHOP_WEB).allowed
    assert p.decide(WEB).allowed  # default/web is another service


def test_cross_namespace_source() -> None:
    p = policy(
        intention("api", [{"name": "web", "namespace": "payments", "action": "allow"}]),
        mesh("deny"),
    )
    assert p.decide(PAY_WEB).allowed
    assert not p.decide(WEB).allowed
    assert not p.decide(SHOP_WEB).allowed


def test_anonymous_caller_matches_only_full_wildcards() -> None:
    for src in ({"name": "*"}, {"name": "*", "namespace": "default"}, {"name": "web"}):
        p = policy(intention("api", [{**src, "action": "allow"}]), mesh("deny"))
        assert not p.decide(None).allowed, src
    p = policy(intention("api", [{"name": "*", "namespace": "*", "action": "allow"}]), mesh("deny"))
    assert p.decide(None).allowed
    assert policy(mesh("allow")).decide(None).allowed


# -- L7 ----------------------------------------------------------------------------------


def l7(*perms: dict[str, Any], name: str = "web") -> Resource:
    return intention("api", [{"name": name, "permissions": list(perms)}])


def test_l7_first_matching_permission_decides() -> None:
    p = policy(
        l7(
            {"action": "deny", "http": {"path": {"prefix": "/admin"}}},
            {"action": "allow", "http": {"path": {"prefix": "/"}, "methods": ["GET", "HEAD"]}},
        ),
        mesh("deny"),
    )
    assert p.has_l7
    assert p.decide(WEB, "GET", "/orders").allowed
    assert p.decide(WEB, "HEAD", "/").allowed
    assert not p.decide(WEB, "GET", "/admin/x").allowed
    d = p.decide(WEB, "POST", "/orders")
    assert not d.allowed and "no permission" in d.reason


def test_l7_no_match_falls_to_default_not_to_later_rules() -> None:
    docs = [
        l7({"action": "allow", "http": {"methods": ["GET"]}}),
        intention("api", [{"name": "*", "action": "allow"}], namespace="default"),
    ]
    # default/web's L7 rule (precedence 9) shadows default/* (8) even when no permission
    # matches: the default action decides.
    assert not policy(*docs[:1], mesh("deny")).decide(WEB, "POST", "/").allowed
    merged = intention(
        "api",
        [
            {"name": "web", "permissions": [{"action": "allow", "http": {"methods": ["GET"]}}]},
            {"name": "*", "action": "allow"},
        ],
    )
    p = policy(merged, mesh("deny"))
    assert not p.decide(WEB, "POST", "/").allowed
    assert p.decide(BILLING, "POST", "/").allowed
    assert policy(merged, mesh("allow")).decide(WEB, "POST", "/").allowed


@pytest.mark.parametrize(
    ("match", "path", "ok"),
    [
        ({"exact": "/a"}, "/a", True),
        ({"exact": "/a"}, "/a/", False),
        ({"prefix": "/a"}, "/ab", True),
        ({"prefix": "/a"}, "/b", False),
        ({"regex": "/v[0-9]+/.*"}, "/v12/x", True),
        ({"regex": "/v[0-9]+/.*"}, "/v/x", False),
        ({"regex": "/v[0-9]+"}, "/v1/x", False),  # a full match, not a search
    ],
)
def test_l7_path(match: dict[str, str], path: str, ok: bool) -> None:
    p = policy(l7({"action": "allow", "http": {"path": match}}), mesh("deny"))
    assert p.decide(WEB, "GET", path).allowed is ok


@pytest.mark.parametrize(
    ("cond", "headers", "ok"),
    [
        ({"exact": "admin"}, {"x-role": "admin"}, True),
        ({"exact": "admin"}, {"x-role": "user"}, False),
        ({"exact": "admin"}, {}, False),
        ({"prefix": "ad"}, {"x-role": "admin"}, True),
        ({"suffix": "min"}, {"x-role": "admin"}, True),
        ({"suffix": "min"}, {"x-role": "user"}, False),
        ({"regex": "a.m.n"}, {"x-role": "admin"}, True),
        ({"regex": "a.m"}, {"x-role": "admin"}, False),
        ({"present": True}, {"x-role": ""}, True),
        ({"present": True}, {}, False),
        ({"present": True, "invert": True}, {}, True),
        ({"exact": "admin", "invert": True}, {"x-role": "user"}, True),
        ({"exact": "admin", "invert": True}, {"x-role": "admin"}, False),
    ],
)
def test_l7_headers(cond: dict[str, Any], headers: dict[str, str], ok: bool) -> None:
    p = policy(
        l7({"action": "allow", "http": {"headers": [{"name": "X-Role", **cond}]}}), mesh("deny")
    )
    assert p.header_names == frozenset({b"x-role"})
    assert p.decide(WEB, "GET", "/", headers).allowed is ok


def test_l7_all_conditions_must_hold() -> None:
    p = policy(
        l7(
            {
                "action": "allow",
                "http": {
                    "path": {"prefix": "/api"},
                    "methods": ["POST"],
                    "headers": [{"name": "x-a", "exact": "1"}, {"name": "x-b", "present": True}],
                },
            }
        ),
        mesh("deny"),
    )
    good = {"x-a": "1", "x-b": "y"}
    assert p.decide(WEB, "POST", "/api/x", good).allowed
    assert not p.decide(WEB, "GET", "/api/x", good).allowed
    assert not p.decide(WEB, "POST", "/other", good).allowed
    assert not p.decide(WEB, "POST", "/api/x", {"x-a": "1"}).allowed
    assert not p.decide(WEB, "POST", "/api/x", {"x-a": "2", "x-b": "y"}).allowed


def test_l4_only_treats_l7_as_deny() -> None:
    p = policy(l7({"action": "allow", "http": {"methods": ["GET"]}}), mesh("allow"))
    assert p.decide(WEB, "GET", "/").allowed
    d = p.decide(WEB, l4_only=True)
    assert not d.allowed and d.reason.startswith("Matched L7 intention")


def test_read_headers_joins_repeats_and_skips_others() -> None:
    heads = [(b"X-Role", b"a"), (b"Other", b"z"), (b"x-role", b"b")]
    assert authz.read_headers(frozenset({b"x-role"}), heads) == {"x-role": "a,b"}
    assert authz.read_headers(frozenset(), heads) == {}


# -- isolation ---------------------------------------------------------------------------


def test_isolated_namespace_refuses_other_namespaces_by_default() -> None:
    p = policy(mesh("allow", isolated=("payments",)), ns="payments", svc="ledger")
    assert p.isolated
    assert p.decide(PAY_WEB).allowed  # same namespace: the default action
    d = p.decide(WEB)
    assert not d.allowed and "isolated" in d.reason
    assert not p.decide(None).allowed


def test_isolated_namespace_lets_in_intentions_naming_the_callers_namespace() -> None:
    docs = [
        intention(
            "ledger",
            [{"name": "web", "namespace": "default", "action": "allow"}],
            namespace="payments",
        ),
        intention(
            "*", [{"name": "*", "namespace": "shop", "action": "allow"}], namespace="payments"
        ),
        mesh("allow", isolated=("payments",)),
    ]
    p = policy(*docs, ns="payments", svc="ledger")
    assert p.decide(WEB).allowed
    assert p.decide(SHOP_WEB).allowed
    assert not p.decide(BILLING).allowed  # default/billing: only the default action


def test_isolation_ignores_wildcard_namespaces_and_never_allows_a_deny() -> None:
    docs = [
        intention("ledger", [{"name": "*", "namespace": "*", "action": "allow"}], "payments"),
        intention("*", [{"name": "*", "namespace": "*", "action": "allow"}], "*"),
        mesh("allow", isolated=("payments",)),
    ]
    p = policy(*docs, ns="payments", svc="ledger")
    assert not p.decide(WEB).allowed
    assert p.decide(PAY_WEB).allowed
    # A mesh-wide allow naming default/* explicitly still is not of payments' own.
    p = policy(
        intention("*", [{"name": "*", "namespace": "default", "action": "allow"}], "*"),
        mesh("allow", isolated=("payments",)),
        ns="payments",
        svc="ledger",
    )
    assert not p.decide(WEB).allowed
    deny = policy(
        intention(
            "ledger", [{"name": "web", "namespace": "default", "action": "deny"}], "payments"
        ),
        mesh("allow", isolated=("payments",)),
        ns="payments",
        svc="ledger",
    )
    assert not deny.decide(WEB).allowed
    assert "isolated" not in deny.decide(WEB).reason


def test_isolation_applies_to_l7_allows_too() -> None:
    perms = [{"action": "allow", "http": {"methods": ["GET"]}}]
    ok = policy(
        intention(
            "ledger", [{"name": "web", "namespace": "default", "permissions": perms}], "payments"
        ),
        mesh("deny", isolated=("payments",)),
        ns="payments",
        svc="ledger",
    )
    assert ok.decide(WEB, "GET", "/").allowed
    assert not ok.decide(WEB, "POST", "/").allowed


def test_not_isolated_namespace_unaffected() -> None:
    p = policy(mesh("allow", isolated=("payments",)), ns="default", svc="api")
    assert not p.isolated and p.decide(PAY_WEB).allowed


# -- identities and schema ---------------------------------------------------------------


def test_source_of_spiffe_id() -> None:
    assert source_of_spiffe_id("spiffe://x.consul/ns/default/dc/dc1/svc/web") == WEB
    for bad in ("", "http://x/ns/a/dc/b/svc/c", "spiffe://x/ns/a/dc/b", "spiffe://x/ns//dc/b/svc/c",
                "spiffe://x/ns/a/dc/b/svc/c/d", "spiffe://x/agent/client/dc/b/id/c"):  # fmt: skip
        assert source_of_spiffe_id(bad) is None, bad


def problems(doc: dict[str, Any]) -> list[str]:
    try:
        res = Resource.from_dict({"apiVersion": API_VERSION, **doc})
    except SchemaError as exc:
        return [f"{p.path}: {p.message}" for p in exc.problems]
    return [f"{p.path}: {p.message}" for p in check_resource(res) if p.is_error]


def ixn(sources: Any, name: str = "api", namespace: str = "default") -> dict[str, Any]:
    return {
        "kind": "Intention",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"sources": sources},
    }


@pytest.mark.parametrize(
    ("doc", "want"),
    [
        (ixn([]), "spec.sources: at least one source"),
        (ixn([{"name": "web"}]), "spec.sources[0]: exactly one of action, permissions"),
        (
            ixn(
                [
                    {
                        "name": "web",
                        "action": "allow",
                        "permissions": [{"action": "deny", "http": {"methods": ["GET"]}}],
                    }
                ]
            ),
            "spec.sources[0]: exactly one of action, permissions",
        ),
        (ixn([{"name": "web", "action": "maybe"}]), "spec.sources[0].action: expected one of"),
        (ixn([{"name": "Web", "action": "allow"}]), "spec.sources[0].name: invalid service name"),
        (ixn([{"name": "web", "namespace": "*", "action": "allow"}]), "spec.sources[0].name"),
        (
            ixn([{"name": "web", "action": "allow"}, {"name": "web", "action": "deny"}]),
            "spec.sources[1]: source default/web is already listed at sources[0]",
        ),
        (
            ixn([{"name": "web", "permissions": [{"action": "allow", "http": {}}]}]),
            "spec.sources[0].permissions[0].http: an HTTP match needs",
        ),
        (
            ixn(
                [
                    {
                        "name": "web",
                        "permissions": [{"action": "allow", "http": {"path": {"regex": "(a)\\1"}}}],
                    }
                ]
            ),
            "spec.sources[0].permissions[0].http.path.regex: invalid regular expression",
        ),
        (
            ixn(
                [
                    {
                        "name": "web",
                        "permissions": [{"action": "allow", "http": {"methods": ["get"]}}],
                    }
                ]
            ),
            "spec.sources[0].permissions[0].http.methods[0]: unknown method 'get' (methods are",
        ),
        (
            ixn(
                [
                    {
                        "name": "web",
                        "permissions": [
                            {
                                "action": "allow",
                                "http": {"headers": [{"name": "x", "exact": "a", "prefix": "b"}]},
                            }
                        ],
                    }
                ]
            ),
            "spec.sources[0].permissions[0].http.headers[0]: exactly one of",
        ),
        (
            ixn(
                [
                    {
                        "name": "web",
                        "permissions": [{"action": "allow", "http": {"path": {"prefix": "x"}}}],
                    }
                ]
            ),
            "spec.sources[0].permissions[0].http.path.prefix: a path starts with '/'",
        ),
        (ixn([{"name": "web", "action": "allow"}], namespace="*"), "metadata.namespace"),
        (
            {"kind": "AuthorizationPolicy", "metadata": {"name": "x"}, "spec": {}},
            "kind: kind AuthorizationPolicy is not a Tether kind: use the Intention kind",
        ),
        (
            {
                "kind": "MeshConfig",
                "metadata": {"name": "mesh"},
                "spec": {"authorization": {"defaultAction": "block"}},
            },
            "spec.authorization.defaultAction: expected one of",
        ),
        (
            {
                "kind": "MeshConfig",
                "metadata": {"name": "mesh"},
                "spec": {"mtls": {"namespaces": {"pay": {"isolated": "yes"}}}},
            },
            "spec.mtls.namespaces.pay.isolated: expected a boolean",
        ),
    ],
)
def test_schema_refuses_with_field_paths(doc: dict[str, Any], want: str) -> None:
    got = problems(doc)
    assert any(p.startswith(want) for p in got), got


def test_wildcard_names_accepted_and_round_trip() -> None:
    for name, ns in (("*", "default"), ("*", "*"), ("api", "default")):
        doc = ixn([{"name": "*", "namespace": "*", "action": "deny"}], name, ns)
        assert problems(doc) == []
        res = Resource.from_dict({"apiVersion": API_VERSION, **doc})
        assert Resource.from_dict(res.to_dict()) == res


@pytest.mark.parametrize(
    ("raw", "normal"),
    [
        ("/a/b", "/a/b"),
        ("/a//b", "/a/b"),
        ("//admin", "/admin"),
        ("/a/./b", "/a/b"),
        ("/a/../b", "/b"),
        ("/../a", "/a"),
        ("/a/b/..", "/a/"),
        ("/a/b/.", "/a/b/"),
        ("/%2e%2e/admin", "/admin"),
        ("/a/%2E%2e/b", "/b"),
        ("/x%41y", "/xAy"),
        ("/a%2fb", "/a%2Fb"),  # an escaped slash stays escaped (Envoy's default)
        ("/a%zz", "/a%zz"),
        ("/", "/"),
    ],
)
def test_normalize_path(raw: str, normal: str) -> None:
    assert authz.normalize_path(raw) == normal


def test_apply_validation_names_file_line_and_field_of_an_intention() -> None:
    from controlplane.validation import validate

    text = """apiVersion: tether.dev/v1alpha1
kind: Intention
metadata: {name: api}
spec:
  sources:
    - name: web
      permissions:
        - action: allow
          http:
            path: {regex: "(a)\\\\1"}
"""
    result = validate([("ixn.yaml", text)])
    assert not result.ok
    (p,) = result.errors
    assert (p.file, p.line, p.path) == (
        "ixn.yaml",
        10,
        "spec.sources[0].permissions[0].http.path.regex",
    )
    assert "RE2" in p.message
