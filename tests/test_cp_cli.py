"""`tether apply/get/diff/delete` against a real control-plane process and registry process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import ROOT, ControlPlaneProcess, RegistryProcess, free_port, run_tether

EXAMPLES = ROOT / "tether" / "demo" / "policies"
HEAD = "apiVersion: tether.dev/v1alpha1\n"


class Tether:
    """Runs `tether ...` as the operator would, against one control plane."""

    def __init__(self, url: str) -> None:
        self.url = url

    def __call__(
        self, *args: str, stdin: str | None = None, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        e = {**os.environ, "TETHER_CONTROLPLANE": self.url, **(env or {})}
        e.pop("CONSUL_HTTP_TOKEN", None)
        return run_tether(*args, env=e, stdin=stdin)

    def api(self, path: str) -> Any:
        with urllib.request.urlopen(f"{self.url}/api/v1{path}", timeout=10) as resp:
            return json.loads(resp.read())


@pytest.fixture
def tether(registry_process: Callable[..., RegistryProcess], tmp_path: Path) -> Iterator[Tether]:
    reg = registry_process()
    cp = ControlPlaneProcess(reg.port, tmp_path / "cp.log")
    try:
        cp.start()
        yield Tether(cp.url)
    finally:
        cp.stop()
    assert cp.proc is not None
    assert cp.proc.returncode in (0, -signal.SIGTERM), cp.proc.returncode


def test_apply_get_diff_delete(tether: Tether, tmp_path: Path) -> None:
    r = tether("apply", "-f", str(EXAMPLES))
    assert r.returncode == 0, r.stderr
    assert "trafficsplit default/orders created" in r.stdout
    assert "route default/orders created" in r.stdout
    assert "meshconfig mesh created" in r.stdout
    assert "+    weight: 90" in r.stdout  # the diff is shown
    assert "no instance of service default/orders is registered" in r.stderr
    assert "config version 1" in r.stdout  # the version this apply produced

    r = tether("get", "trafficsplit", "orders", "-o", "yaml")
    assert r.returncode == 0, r.stderr
    doc = yaml.safe_load(r.stdout)
    assert [(s["name"], s["weight"]) for s in doc["spec"]["subsets"]] == [("v1", 90), ("v2", 10)]
    r = tether("get", "route", "-o", "json")
    (route,) = json.loads(r.stdout)
    assert route["spec"]["rules"][0]["destination"] == {"subset": "v2"}
    r = tether("get", "ts")
    assert "orders" in r.stdout and "v1=90 v2=10" in r.stdout
    r = tether("get", "servicedefaults", "-A")
    assert [line.split()[1] for line in r.stdout.splitlines()[1:]] == [
        "frontend",
        "inventory",
        "orders",
    ]

    promoted = tmp_path / "promote.yaml"
    promoted.write_text(
        (EXAMPLES / "orders.yaml")
        .read_text()
        .replace("weight: 90", "weight: 50")
        .replace("weight: 10", "weight: 50")
    )
    r = tether("diff", "-f", str(promoted))
    assert r.returncode == 1  # differences, as kubectl diff
    assert "-    weight: 90\n" in r.stdout and "+    weight: 50\n" in r.stdout
    r = tether("apply", "-f", str(promoted), "--dry-run")
    assert r.returncode == 0 and "trafficsplit default/orders configured (dry run)" in r.stdout
    assert (
        tether.api("/resources/TrafficSplit/default/orders")["spec"]["subsets"][0]["weight"] == 90
    )
    r = tether("apply", "-f", "-", stdin=promoted.read_text())
    assert r.returncode == 0 and "trafficsplit default/orders configured" in r.stdout
    assert "servicedefaults default/orders unchanged" in r.stdout
    r = tether("diff", "-f", str(promoted))
    assert r.returncode == 0 and r.stdout == ""

    r = tether("delete", "route", "orders")
    assert r.returncode == 0 and "route default/orders deleted" in r.stdout
    r = tether("get", "route", "orders")
    assert r.returncode == 1 and "not found" in r.stderr
    r = tether("delete", "-f", str(EXAMPLES / "services.yaml"))
    assert r.returncode == 0, r.stderr
    assert "meshconfig mesh deleted" in r.stdout
    left = tether.api("/resources")["items"]
    assert sorted(d["kind"] for d in left) == ["ServiceDefaults", "TrafficSplit"]


def test_rejections_name_file_document_path_and_line(tether: Tether, tmp_path: Path) -> None:
    assert tether("apply", "-f", str(EXAMPLES)).returncode == 0
    version = tether.api("/version")["version"]

    bad = tmp_path / "bad.yaml"
    bad.write_text(
        HEAD
        + "kind: ServiceDefaults\nmetadata: {name: orders}\nspec: {protocol: tcp}\n---\n"
        + HEAD
        + "kind: TrafficSplit\nmetadata:\n  name: orders\nspec:\n  subsets:\n"
        "    - name: v1\n      selector: {version: v1}\n      weight: 80\n"
        "    - name: v2\n      selector: {version: v2}\n      weight: 10\n"
    )
    r = tether("apply", "-f", str(bad))
    assert r.returncode == 1
    assert (
        f"{bad}:11: document 2 (TrafficSplit default/orders): spec.subsets: "
        "weights sum to 90, not 100"
    ) in r.stderr
    assert "nothing was changed" in r.stderr
    # Found by the control plane (needs the stored resources), reported the same way.
    route = tmp_path / "route.yaml"
    route.write_text(
        HEAD + "kind: Route\nmetadata: {name: orders}\nspec:\n  rules:\n"
        "    - match: {path: {prefix: /beta}}\n      destination: {subset: v3}\n"
    )
    r = tether("apply", "-f", str(route))
    assert r.returncode == 1
    assert (
        f"{route}:7: document 1 (Route default/orders): spec.rules[0].destination.subset: "
        "subset 'v3' is not defined by TrafficSplit default/orders"
    ) in r.stderr
    r = tether("apply", "-f", str(tmp_path / "missing.yaml"))
    assert r.returncode == 1 and "missing.yaml" in r.stderr
    later = tmp_path / "retry.yaml"
    later.write_text(HEAD + "kind: RetryPolicy\nmetadata: {name: orders}\nspec: {}\n")
    r = tether("apply", "-f", str(later))
    assert r.returncode == 1 and "kind RetryPolicy is not supported yet" in r.stderr
    # Nothing changed.
    assert tether.api("/version")["version"] == version
    r = tether("get", "sd", "orders", "-o", "json")
    assert json.loads(r.stdout)["spec"].get("protocol", "http") == "http"


def test_finding_the_control_plane(tether: Tether) -> None:
    r = tether("get", "route", "--controlplane", tether.url, env={"TETHER_CONTROLPLANE": ""})
    assert r.returncode == 0 and "no Route resources" in r.stderr
    r = tether("get", "route", env={"TETHER_CONTROLPLANE": f"http://127.0.0.1:{free_port()}"})
    assert r.returncode == 1 and "Error: control plane at http://127.0.0.1:" in r.stderr
    r = tether("get", "frobnicators")
    assert r.returncode == 1 and "unknown kind 'frobnicators'" in r.stderr


def test_what_was_applied_comes_back_defaults_included(tether: Tether) -> None:
    """Fields written with their default value are kept, as Kubernetes keeps them."""
    r = tether("apply", "-f", str(EXAMPLES / "services.yaml"))
    assert r.returncode == 0, r.stderr
    mesh = yaml.safe_load(tether("get", "meshconfig", "mesh", "-o", "yaml").stdout)
    assert mesh["spec"] == {"egress": {"mode": "allow"}, "connectTimeout": "5s",
                            "requestTimeout": "15s"}  # fmt: skip
    r = tether("get", "sd", "frontend", "-o", "yaml")
    frontend = yaml.safe_load(r.stdout)
    assert frontend["spec"] == {"protocol": "http", "loadBalancer": {"policy": "round_robin"}}
    # On request, what is in force: every default filled in.
    r = tether("get", "sd", "frontend", "-o", "json", "--show-defaults")
    full = json.loads(r.stdout)
    assert full["metadata"]["generation"] == 1 and full["spec"]["protocol"] == "http"
    assert full["spec"]["loadBalancer"]["policy"] == "round_robin"
    assert full["spec"]["loadBalancer"]["locality"] is True and full["spec"]["opaquePorts"] == []
    r = tether("get", "mc", "-o", "yaml", "--show-defaults")
    (mesh_full,) = yaml.safe_load_all(r.stdout)
    assert mesh_full["spec"]["egress"] == {"mode": "allow", "hosts": []}
    # Applying the same again changes nothing; leaving the default out is a change.
    r = tether("apply", "-f", str(EXAMPLES / "services.yaml"))
    assert "meshconfig mesh unchanged" in r.stdout, r.stdout
    r = tether(
        "apply", "-f", "-", stdin=HEAD + "kind: MeshConfig\nmetadata: {name: mesh}\nspec: {}\n"
    )
    assert "meshconfig mesh configured" in r.stdout and "-  connectTimeout: 5s" in r.stdout
    assert yaml.safe_load(tether("get", "meshconfig", "mesh", "-o", "yaml").stdout)["spec"] == {}


def test_a_service_nobody_registered_is_a_warning(tether: Tether) -> None:
    doc = HEAD + "kind: ServiceDefaults\nmetadata: {name: paymnets}\nspec: {protocol: http}\n"
    r = tether("apply", "-f", "-", stdin=doc)
    assert r.returncode == 0 and "servicedefaults default/paymnets created" in r.stdout
    assert "warning" in r.stderr and "no instance of service default/paymnets" in r.stderr
    assert "metadata.name" in r.stderr


def test_operator_usage_is_consistent(tether: Tether, tmp_path: Path) -> None:
    # No arguments: a usage error (exit 2) for both.
    for args in (("apply",), ("delete",), ("delete", "route")):
        r = tether(*args)
        assert r.returncode == 2 and "Usage: tether" in r.stderr, (args, r.stderr)
    # Empty input is an error, not a silent success.
    for text in ("", "# nothing here\n"):
        r = tether("apply", "-f", "-", stdin=text)
        assert r.returncode == 1 and "Error: no documents in <stdin>" in r.stderr, r.stderr
    # -h is --help.
    for args in (("-h",), ("apply", "-h"), ("status", "-h")):
        r = tether(*args)
        assert r.returncode == 0 and r.stdout.startswith("Usage: tether"), r
    # -n/--namespace on apply: documents without one go there; another one is refused.
    sd = HEAD + "kind: ServiceDefaults\nmetadata: {name: orders}\nspec: {protocol: http}\n"
    r = tether("apply", "-n", "shop", "-f", "-", stdin=sd)
    assert r.returncode == 0 and "servicedefaults shop/orders created" in r.stdout, r.stderr
    got = tether.api("/resources/ServiceDefaults/shop/orders")
    assert got["metadata"]["namespace"] == "shop" and got["spec"] == {"protocol": "http"}
    elsewhere = HEAD + "kind: ServiceDefaults\nmetadata: {name: a, namespace: x}\nspec: {}\n"
    r = tether("apply", "-n", "shop", "-f", "-", stdin=elsewhere)
    assert r.returncode == 1 and "namespace 'x', not 'shop'" in r.stderr
    # diff names a mesh-wide resource as the API does (`_`, not `-`).
    mesh = HEAD + "kind: MeshConfig\nmetadata: {name: mesh}\nspec: {connectTimeout: 2s}\n"
    r = tether("diff", "-f", "-", stdin=mesh)
    assert r.returncode == 1 and "b/MeshConfig/_/mesh" in r.stdout, r.stdout
    # Every error line reads the same.
    r = tether("get", "frobnicators")
    assert "Error: unknown kind" in r.stderr
    # A control plane not found: the hint says how to get or point at one.
    r = tether("status", env={"TETHER_CONTROLPLANE": f"http://127.0.0.1:{free_port()}"})
    assert r.returncode == 1 and "tether controlplane" in r.stderr
    assert "TETHER_CONTROLPLANE" in r.stderr and r.stderr.startswith("Error: ")


def test_ports_are_range_checked_on_every_command() -> None:
    env = dict(os.environ)
    for args in (
        ("registry", "--port", "99999"),
        ("controlplane", "--port", "70000"),
        ("up", "--registry-port", "70000"),
        ("up", "--controlplane-port", "-1"),
        ("sidecar", "--service", "a", "--app-port", "65536"),
    ):
        r = run_tether(*args, env=env)
        assert r.returncode == 2, (args, r.stderr)
        assert "Usage: tether" in r.stderr and "is not in the range 0<=x<=65535" in r.stderr


def test_a_malformed_consul_http_addr_is_a_usage_error() -> None:
    for addr in ("127.0.0.1:x", "http://", "127.0.0.1:99999", "a:1/path"):
        env = dict(os.environ, CONSUL_HTTP_ADDR=addr)
        r = run_tether("controlplane", "--port", "0", env=env)
        assert r.returncode == 2 and "CONSUL_HTTP_ADDR" in r.stderr, (addr, r.stderr)
        r = run_tether("sidecar", "--service", "a", "--app-port", "1", env=env)
        assert r.returncode == 2 and "CONSUL_HTTP_ADDR" in r.stderr, (addr, r.stderr)


def test_up_flags_that_need_the_control_plane() -> None:
    r = run_tether("up", "--no-controlplane", "--policies", str(EXAMPLES), env=dict(os.environ))
    assert r.returncode == 2 and "--policies needs the control plane" in r.stderr
