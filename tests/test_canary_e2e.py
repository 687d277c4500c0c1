"""Canary analysis end to end: a real control plane drives a TrafficSplit's weights from
the stats real sidecars report while real traffic flows: a healthy v2 is promoted to
100%, a v2 failing 20% of requests is rolled back during its first step; the history
is in the resource's status (`tether get -o yaml`), `tether status` shows the state,
and re-applying the file leaves a running analysis alone."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import ControlPlaneProcess, RegistryProcess, run_tether
from tests.sidecar_harness import App, ProcessSet, Sidecar

pytestmark = pytest.mark.timeout(150)

SPLIT = """apiVersion: tether.dev/v1alpha1
kind: TrafficSplit
metadata: {{name: b}}
spec:
  subsets:
    - {{name: v1, selector: {{version: v1}}, weight: 100}}
    - {{name: v2, selector: {{version: v2}}, weight: 0}}
  analysis:
    canary: v2
    stable: v1
    steps: [50, 100]
    interval: {interval}
    minRequests: 10
    minSuccessRate: 95
"""


class FailingApp(App):
    """An app whose every fifth request (health checks aside) answers 500."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        handler = self.server.RequestHandlerClass
        original = handler.do_GET  # type: ignore[attr-defined]
        count = [0]

        def do_get(h: Any) -> None:
            if h.path != "/health":
                count[0] += 1
                if count[0] % 5 == 0:
                    h.send_response(500)
                    h.send_header("Content-Length", "0")
                    h.end_headers()
                    return
            original(h)

        handler.do_GET = do_get  # type: ignore[attr-defined]


def drive(sa: Sidecar, tether: Callable[..., Any], done: Callable[[Any], bool]) -> Any:
    """Send traffic to b through a until the TrafficSplit's status satisfies `done`
    (bounded: at most 20000 requests or 90 s)."""
    deadline = time.monotonic() + 90
    for i in range(20_000):
        sa.call("http://b/who", timeout=5)
        if i % 25 == 0:
            doc = yaml.safe_load(tether("get", "trafficsplit", "b", "-o", "yaml").stdout)
            if done(doc):
                return doc
        if time.monotonic() > deadline:
            break
    raise AssertionError(f"not reached: {doc.get('status')}")


def analysis(doc: Any) -> dict[str, Any]:
    return dict((doc.get("status") or {}).get("analysis") or {})


@pytest.mark.parametrize("healthy", [True, False], ids=["promoted", "rolled-back"])
def test_canary_analysis(
    healthy: bool, registry_process: Callable[..., RegistryProcess], tmp_path: Path
) -> None:
    reg = registry_process()
    cp = ControlPlaneProcess(reg.port, tmp_path / "cp.log")
    procs = ProcessSet(tmp_path, reg.port)
    env = dict(os.environ, CONSUL_HTTP_ADDR=f"127.0.0.1:{reg.port}", TETHER_CONTROLPLANE="")

    def tether(*args: str) -> Any:
        return run_tether(*args, "--controlplane", cp.url, env=env, timeout=30)

    try:
        cp.start()
        procs.sidecar("b", procs.app("b-v1"), "--version", "v1")
        v2 = procs.app("b-v2") if healthy else FailingApp("b-v2")
        procs.apps.append(v2)
        procs.sidecar("b", v2, "--version", "v2")
        sa = procs.sidecar("a", procs.app("a"), "--controlplane", cp.url)
        policy = tmp_path / "b.yaml"
        # A failing canary is judged within its first step, however long that is.
        policy.write_text(SPLIT.format(interval="2s" if healthy else "10m"))
        applied = tether("apply", "-f", str(policy))
        assert applied.returncode == 0, applied.stderr

        if healthy:
            doc = drive(sa, tether, lambda d: analysis(d).get("step") == 1)
            again = tether("apply", "-f", str(policy))  # the user's file, unchanged
            assert again.returncode == 0 and "unchanged" in again.stdout
            doc = drive(sa, tether, lambda d: analysis(d).get("phase") == "Promoted")
            an = analysis(doc)
            assert an["weights"] == {"v1": 0, "v2": 100}
            events = [h["event"] for h in an["history"]]
            assert events == ["started", "advanced", "promoted"]  # not restarted
            assert all(h["requests"] >= 10 for h in an["history"][1:])
            # The spec as written, the live weights in the status.
            assert [s["weight"] for s in doc["spec"]["subsets"]] == [100, 0]
            # Every request now reaches v2.
            names = {sa.call("http://b/who")[2] for _ in range(20)}
            assert all(b'"b-v2"' in n for n in names)
        else:
            doc = drive(sa, tether, lambda d: analysis(d).get("phase") == "RolledBack")
            an = analysis(doc)
            assert an["weights"] == {"v1": 100, "v2": 0}
            assert an["step"] == 0  # within the first step's interval
            last = an["history"][-1]
            assert [h["event"] for h in an["history"]] == ["started", "rolled back"]
            assert last["requests"] >= 10 and last["successRate"] < 0.95
            assert "below 95%" in last["reason"]
        want = "Promoted" if healthy else "RolledBack"
        table = tether("get", "ts").stdout
        live = "v1=0 v2=100" if healthy else "v1=100 v2=0"
        assert f"v1=100 v2=0 (analysis {want}: {live})" in table, table
        status = tether("status")
        assert status.returncode == 0, status.stderr
        assert f"canary default/b: {want}" in status.stdout
    finally:
        procs.close()
        cp.stop()
