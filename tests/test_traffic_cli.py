"""`tether get all`, the traffic examples (`tether apply --dry-run`) and `tether explain`
against a real control-plane process and registry process."""

from __future__ import annotations

import json

import yaml

from tests.conftest import ROOT
from tests.test_cp_cli import EXAMPLES, Tether, tether  # noqa: F401  (the fixture)

TRAFFIC = ROOT / "tether" / "demo" / "policies" / "traffic"


def test_get_all_lists_every_kind(tether: Tether) -> None:  # noqa: F811
    r = tether("get")
    assert r.returncode == 0 and "no resources in namespace default" in r.stderr
    assert tether("apply", "-f", str(EXAMPLES)).returncode == 0
    r = tether("get", "all")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["KIND", "NAMESPACE", "NAME", "GENERATION", "SUMMARY"]
    rows = [line.split()[:3] for line in lines[1:]]
    stored = tether.api("/resources")["items"]
    assert len(rows) == len(stored)
    assert ["MeshConfig", "-", "mesh"] in rows
    assert ["TrafficSplit", "default", "orders"] in rows
    assert ["Route", "default", "orders"] in rows
    assert tether("get").stdout == r.stdout  # no KIND: the same
    docs = list(yaml.safe_load_all(tether("get", "all", "-o", "yaml").stdout))
    assert sorted(d["kind"] for d in docs) == sorted(d["kind"] for d in stored)
    assert len(json.loads(tether("get", "-A", "-o", "json").stdout)) == len(stored)
    r = tether("get", "all", "orders")
    assert r.returncode == 1 and "takes no NAME" in r.stderr


def test_traffic_examples_pass_a_dry_run(tether: Tether) -> None:  # noqa: F811
    r = tether("apply", "--dry-run", "-f", str(TRAFFIC))
    assert r.returncode == 0, r.stderr
    for name in ("payments", "search", "reports", "legacy-shop"):
        assert f"route default/{name} created (dry run)" in r.stdout
    assert "trafficsplit default/checkout created (dry run)" in r.stdout
    assert tether.api("/resources")["items"] == []


def test_explain_against_a_running_control_plane(tether: Tether) -> None:  # noqa: F811
    assert tether("apply", "-f", str(EXAMPLES)).returncode == 0
    r = tether(
        "explain", "http://orders/api/v1/items", "-H", "x-canary: true", "--from", "frontend"
    )
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "request: GET http://orders/api/v1/items from frontend.default"
    assert "  rules[0]: MATCHES (all conditions hold)" in lines
    assert "  destination: orders subset v2" in lines
    assert "timeouts: connect 1s, request 2s" in lines
    assert any(line.startswith("caller: no sidecar of frontend") for line in lines)
    r = tether("explain", "http://orders/", "-X", "DELETE")
    assert r.returncode == 0 and "  rules[0]: no: header x-canary is absent" in r.stdout
    r = tether("explain", "http://orders/", "-H", "broken")
    assert r.returncode == 2 and "expected 'Name: value'" in r.stderr
