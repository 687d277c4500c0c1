"""Policy end to end with real processes: registry, control plane, sidecars, apps.

`frontend`'s sidecar calls `orders`, which has a v1 and a v2 instance (registry Meta
version=v1/v2). Policies are applied with `tether apply`, convergence is read with
`tether status`, and traffic goes through the frontend sidecar's outbound listener.
"""

from __future__ import annotations

import base64
import json
import os
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import consul
import pytest

from tests.conftest import ControlPlaneProcess, run_tether
from tests.polling import poll
from tests.sidecar_harness import ProcessMesh

pytestmark = pytest.mark.timeout(240)

SEED = "20261128"

POLICY = """
apiVersion: tether.dev/v1alpha1
kind: TrafficSplit
metadata: {name: orders, namespace: default}
spec:
  subsets:
    - {name: v1, selector: {version: v1}, weight: 90}
    - {name: v2, selector: {version: v2}, weight: 10}
---
apiVersion: tether.dev/v1alpha1
kind: Route
metadata: {name: orders, namespace: default}
spec:
  rules:
    - match:
        headers: [{name: x-canary, exact: "true"}]
      destination: {subset: v2}
"""

FRONTEND_DEFAULTS = """
apiVersion: tether.dev/v1alpha1
kind: ServiceDefaults
metadata: {name: frontend, namespace: default}
spec: {requestTimeout: 3s}
"""


def tether(cp: ControlPlaneProcess, *args: str, stdin: str | None = None) -> tuple[int, str]:
    done = run_tether(*args, env=dict(os.environ, TETHER_CONTROLPLANE=cp.url), stdin=stdin)
    return done.returncode, done.stdout + done.stderr


def sidecars_status(cp: ControlPlaneProcess) -> dict[str, dict[str, Any]]:
    code, out = tether(cp, "status", "-o", "json")
    assert code == 0, out
    return {r["id"]: r for r in json.loads(out)["sidecars"]}


def put_with_version(kv: Any, key: str, doc: dict[str, Any]) -> None:
    """A resource written straight into the KV, with the next config version in the same
    transaction, as the store writes it (the version sidecars are pushed is that counter)."""
    _, entry = kv.kv.get("tether/v1/version")
    version = int(entry["Value"]) + 1 if entry else 1
    ops = [
        {"KV": {"Verb": "set", "Key": k, "Value": base64.b64encode(v.encode()).decode()}}
        for k, v in ((key, json.dumps(doc)), ("tether/v1/version", str(version)))
    ]
    kv.txn.put(ops)


def wait(cond: Callable[[], Any], timeout: float, what: str) -> Any:
    """`tests.polling.poll` at the pace of `tether status` (it runs a process)."""
    return poll(cond, timeout, what, interval=0.1)


class Mesh(ProcessMesh):
    """`orders` v1 and v2 and `frontend`, each behind its sidecar; `calls` go from
    `frontend` to `orders`."""

    def __init__(self, tmp: Path) -> None:
        super().__init__(tmp, ["frontend", "orders-v1", "orders-v2"])
        self.frontend: Any = None
        self.orders: list[Any] = []
        self.callee = "orders"

    def start(self) -> None:
        super().start()
        seed = {"TETHER_POLICY_SEED": SEED}
        self.orders = [
            self.sidecar("orders", "orders-v1", "--version", "v1", env=seed),
            self.sidecar("orders", "orders-v2", "--version", "v2", env=seed),
        ]
        self.frontend = self.caller = self.sidecar("frontend", "frontend", env=seed)


@pytest.fixture
def mesh(tmp_path: Path) -> Iterator[Mesh]:
    m = Mesh(tmp_path)
    try:
        m.start()
        yield m
    finally:
        m.close()


def ids_of(recs: dict[str, dict[str, Any]], service: str) -> list[str]:
    return sorted(i for i, r in recs.items() if r["service"] == service and r["connected"])


def all_acked(m: Mesh, min_version: int = 0) -> dict[str, dict[str, Any]] | None:
    recs = sidecars_status(m.cp)
    ids = ids_of(recs, "frontend") + ids_of(recs, "orders")
    ok = len(ids) == 3 and all(
        i in recs and recs[i]["state"] == "acked" and recs[i]["acked_version"] >= min_version
        for i in ids
    )
    return recs if ok else None


def test_apply_split_header_route_nack_and_control_plane_outage(mesh: Mesh, tmp_path: Path) -> None:
    m = mesh
    # Before any policy: both orders instances share the traffic (round robin).
    before = m.calls(20)
    assert set(before) == {"orders-v1", "orders-v2"}, before
    baseline = wait(lambda: all_acked(m), 30, "every sidecar acked the empty config")
    # The frontend sidecar calls orders now: it told the control plane so.
    policy_file = tmp_path / "orders.yaml"
    policy_file.write_text(POLICY)
    code, out = tether(m.cp, "apply", "-f", str(policy_file))
    assert code == 0, out
    recs = wait(
        lambda: all_acked(m, 1 + max(r["acked_version"] for r in baseline.values())),
        30,
        "every affected sidecar acked the split",
    )
    (frontend_id,) = ids_of(recs, "frontend")
    order_ids = ids_of(recs, "orders")
    version = recs[frontend_id]["acked_version"]
    _, dump = m.frontend.admin("/config_dump")
    assert dump["policy"]["version"] == version and dump["policy"]["hash"]
    # 90/10, 1,000 sequential requests, split draws seeded (TETHER_POLICY_SEED):
    # Binomial(1000, 0.1) has sd 9.5; the bounds are 5 sd either side of 100.
    split = m.calls(1000)
    assert split["orders-v1"] + split["orders-v2"] == 1000, split
    assert 53 <= split["orders-v2"] <= 147, split
    # Header routing is exact.
    assert m.calls(50, {"x-canary": "true"}) == Counter({"orders-v2": 50})
    # A change to frontend's own policy goes to frontend's sidecar only.
    sent = {i: (recs[i]["sent_version"], recs[i]["sent_hash"]) for i in order_ids}
    defaults_file = tmp_path / "frontend.yaml"
    defaults_file.write_text(FRONTEND_DEFAULTS)
    code, out = tether(m.cp, "apply", "-f", str(defaults_file))
    assert code == 0, out

    def frontend_moved() -> dict[str, dict[str, Any]] | None:
        recs = sidecars_status(m.cp)
        rec = recs[frontend_id]
        return recs if rec["state"] == "acked" and rec["acked_version"] > version else None

    recs = wait(frontend_moved, 30, "frontend acked its new defaults")
    time.sleep(0.5)
    recs = sidecars_status(m.cp)
    assert {i: (recs[i]["sent_version"], recs[i]["sent_hash"]) for i in order_ids} == sent
    version = recs[frontend_id]["acked_version"]

    # A bad document through `tether apply`: refused with its path and line, nothing
    # stored, nothing pushed.
    bad_file = tmp_path / "bad.yaml"
    bad_file.write_text(POLICY.replace("weight: 10", "weight: 20"))
    code, out = tether(m.cp, "apply", "-f", str(bad_file))
    assert code != 0 and "bad.yaml:" in out and "weight" in out, out
    time.sleep(0.5)
    after = sidecars_status(m.cp)
    assert {i: after[i]["sent_hash"] for i in recs} == {i: recs[i]["sent_hash"] for i in recs}

    # A document the sidecars cannot apply (written into the KV behind the API's back:
    # the regex does not compile): NACK, visible in `tether status`, old config serving.
    kv = consul.Consul(host="127.0.0.1", port=m.registry.port)
    try:
        bad = {
            "apiVersion": "tether.dev/v1alpha1",
            "kind": "Route",
            "metadata": {"name": "orders", "namespace": "default"},
            "spec": {"rules": [{"match": {"path": {"regex": "(unclosed"}}}]},
        }
        put_with_version(kv, "tether/v1/resources/Route/default/orders", bad)

        def nacked() -> dict[str, Any] | None:
            rec = sidecars_status(m.cp).get(frontend_id)
            return rec if rec and rec["state"] == "nacked" else None

        rec = wait(nacked, 30, "the frontend sidecar nacked")
        assert "regex" in rec["error"] and rec["acked_version"] == version
        code, table = tether(m.cp, "status")
        assert code == 0 and "nacked" in table and "regex" in table, table
        assert m.calls(20, {"x-canary": "true"}) == Counter({"orders-v2": 20})

        # Control plane killed: traffic is unaffected (the old routes still apply).
        m.cp.kill9()
        assert m.calls(20, {"x-canary": "true"}) == Counter({"orders-v2": 20})
        during = m.calls(200)
        assert during["orders-v1"] > during["orders-v2"] > 0, during
        # A fix made while it is away (straight into the KV), then it comes back:
        # the sidecars reconnect and converge on the fixed config.
        good = dict(bad, spec={"rules": [{"match": {"path": {"prefix": "/v2"}},
                                          "destination": {"subset": "v2"}}]})  # fmt: skip
        put_with_version(kv, "tether/v1/resources/Route/default/orders", good)
    finally:
        kv.http.session.close()
    m.cp.start()
    wait(lambda: all_acked(m, version + 1), 60, "sidecars converged after the restart")
    assert m.calls(20, path="/v2/x") == Counter({"orders-v2": 20})
    assert (m.calls(20, {"x-canary": "true"}))["orders-v1"] > 0
