"""End to end with the control plane: `tether sidecar --controlplane URL` routes by the
policy `tether apply` stores (a split between versions, a header route to v2)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import ControlPlaneProcess, RegistryProcess, run_tether
from tests.sidecar_harness import ProcessSet, poll

pytestmark = pytest.mark.timeout(90)

POLICY = """
apiVersion: tether.dev/v1alpha1
kind: Route
metadata: {name: b, namespace: default}
spec:
  rules:
    - match:
        headers: [{name: x-canary, exact: "true"}]
      destination: {subset: v2}
---
apiVersion: tether.dev/v1alpha1
kind: TrafficSplit
metadata: {name: b, namespace: default}
spec:
  subsets:
    - {name: v1, selector: {version: v1}, weight: 100}
    - {name: v2, selector: {version: v2}, weight: 0}
"""


def test_sidecar_follows_pushed_policy(
    registry_process: Callable[..., RegistryProcess], tmp_path: Path
) -> None:
    reg = registry_process()
    env = dict(os.environ, CONSUL_HTTP_ADDR=f"127.0.0.1:{reg.port}")
    cp = ControlPlaneProcess(reg.port, tmp_path / "cp.log")
    cp_url = cp.url
    procs = ProcessSet(tmp_path, reg.port)
    try:
        cp.start()
        procs.sidecar("b", procs.app("b-v1"), "--version", "v1")
        procs.sidecar("b", procs.app("b-v2"), "--version", "v2")
        sa = procs.sidecar("a", procs.app("a"), "--controlplane", cp_url)

        def names(headers: dict[str, str] | None = None, n: int = 4) -> set[str]:
            return {json.loads(sa.call("http://b/who", headers)[2])["name"] for _ in range(n)}

        assert names() == {"b-v1", "b-v2"}  # no policy yet: round robin over both
        policy = tmp_path / "b.yaml"
        policy.write_text(POLICY)
        applied = run_tether(
            "apply", "-f", str(policy), "--controlplane", cp_url, env=env, timeout=30
        )
        assert applied.returncode == 0, applied.stderr

        def acked() -> bool:
            state = sa.admin("/config_dump")[1]["controlplane"]
            return bool(state["connected"] and state["acks"] >= 1 and not state["nacks"])

        poll(acked, 15, "the sidecar ACKs the pushed policy")
        poll(lambda: names() == {"b-v1"}, 10, "the split sends everything to v1")
        assert names({"x-canary": "true"}) == {"b-v2"}  # the header route wins
    finally:
        procs.close()
        cp.stop()
