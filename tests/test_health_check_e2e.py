"""Active health checks over real processes: a registry, a control plane, two instances
of `orders` (bench/chaos_app.py, each behind its sidecar, strict mTLS) and a client's
sidecar. `orders`' ServiceDefaults asks callers to probe `/ready`; the registry's own
check of each app (`/health`) keeps passing throughout, so what takes an instance out of
rotation here is the client sidecar's active check alone, and its probes pass the
instance's strict inbound sidecar as the client's requests do.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ControlPlaneProcess, RegistryProcess, run_tether
from tests.sidecar_harness import ProcessSet, Sidecar, poll
from tests.test_resilience_acceptance import Instance

pytestmark = pytest.mark.timeout(180)

POLICY = """\
apiVersion: tether.dev/v1alpha1
kind: ServiceDefaults
metadata:
  name: orders
spec:
  loadBalancer: {policy: round_robin}
  healthCheck:
    path: /ready
    interval: 200ms
    timeout: 150ms
    unhealthyThreshold: 2
    healthyThreshold: 2
"""


def endpoint(sidecar: Sidecar, inst: Instance) -> dict[str, Any]:
    cluster = sidecar.cluster("orders") or {"endpoints": []}
    for ep in cluster["endpoints"]:
        if ep["port"] == inst.sidecar.ports["inbound"]:
            return dict(ep)
    return {}


def metric(sidecar: Sidecar, line_start: str) -> float:
    _, text = sidecar.admin("/stats/prometheus")
    for line in text.splitlines():
        if line.startswith(line_start):
            return float(line.rsplit(" ", 1)[1])
    return -1.0


def test_an_app_failing_its_health_path_stops_receiving_traffic_and_returns(
    tmp_path: Path,
) -> None:
    reg = RegistryProcess(tmp_path / "reg")
    reg.start()
    cp = ControlPlaneProcess(reg.port, tmp_path / "cp.log")
    procs = ProcessSet(tmp_path, reg.port)
    try:
        cp.start()
        policy = tmp_path / "orders.yaml"
        policy.write_text(POLICY)
        env = dict(os.environ, TETHER_CONTROLPLANE=cp.url)
        done = run_tether("apply", "-f", str(policy), env=env)
        assert done.returncode == 0, done.stdout + done.stderr
        a, b = (Instance(procs, tmp_path, n, cp) for n in ("a", "b"))
        client = procs.sidecar("loadgen", procs.app("loadgen"), "--controlplane", cp.url)

        def configured() -> bool:
            called = client.call("http://orders/")[0] == 200
            _, dump = client.admin("/config_dump")
            kinds = {r["kind"] for r in (dump["policy"] or {}).get("resources", [])}
            return called and "ServiceDefaults" in kinds

        poll(configured, 60, "the client's sidecar runs the policy", interval=0.2)
        poll(lambda: len(client.endpoint_ids("orders")) == 2, 30, "the client sees 2")

        def probed(inst: Instance) -> bool:
            check = endpoint(client, inst).get("health_check") or {}
            return check.get("healthy") is True and check.get("probes", 0) >= 2

        # Probes pass the strict inbound sidecars (mTLS with the client's identity).
        poll(lambda: probed(a) and probed(b), 30, "both instances probed healthy")

        b.control(ready=0)
        poll(lambda: endpoint(client, b).get("health") == "check_failing", 30, "b held out")
        ep = endpoint(client, b)
        assert ep["health_check"]["healthy"] is False
        assert ep["health_check"]["last_error"] == "status 503"
        # The registry still says b passes: only the active check holds it out.
        assert b.sidecar.instance_id in client.endpoint_ids("orders")
        b_hits, a_hits = b.hits(), a.hits()
        statuses = [client.call("http://orders/")[0] for _ in range(30)]
        assert statuses == [200] * 30
        assert b.hits() == b_hits and a.hits() == a_hits + 30
        failing = 'tether_health_check_failing{destination="orders.default"}'
        assert metric(client, failing) == 1
        failures = 'tether_health_check_probes_total{destination="orders.default",result="failure"}'
        assert metric(client, failures) >= 2

        b.control(ready=1)
        poll(lambda: endpoint(client, b).get("health") == "passing", 30, "b back")
        b_hits = b.hits()
        statuses = [client.call("http://orders/")[0] for _ in range(30)]
        assert statuses == [200] * 30
        assert b.hits() >= b_hits + 10  # round robin over both again
        assert metric(client, failing) == 0
    finally:
        procs.close()
        cp.stop()
        reg.stop()
