"""Observability: the `stats` push message, the control plane's aggregation (edges,
services, quantiles, several replicas), `tether top`, and the sidecar's Prometheus
output checked against docs/metrics.md, over real processes."""

from __future__ import annotations

import json
import os
import re
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from controlplane.meshstats import Aggregate, Counts, MeshStats, render
from proxy import push_codec as wire
from proxy.stats import ProxyStats
from tests.conftest import ControlPlaneProcess, RegistryProcess, run_tether
from tests.sidecar_harness import ROOT, ProcessSet, poll

BUCKETS = len(wire.LATENCY_BOUNDS) + 1


def row(dest: str, ok: int, bad: int = 0, listener: str = "outbound", subset: str = "") -> Any:
    buckets = [0] * BUCKETS
    buckets[4] = ok + bad  # (5 ms, 10 ms]
    return wire.StatsRow(listener, dest, subset, (0, 0, ok, 0, 0, bad), tuple(buckets), 0.008)


def test_stats_message_round_trips_and_bad_reports_are_refused() -> None:
    msg = wire.Stats(2.0, (row("orders.default", 9, 1, subset="v2"),))
    assert wire.decode(wire.encode(msg)) == msg
    good = json.loads(wire.encode(msg))
    for change, error in [
        (lambda m: m["rows"][0].update(classes=[0, 0, -1, 0, 0, 0]), "classes must be 6"),
        (lambda m: m["rows"][0].update(buckets=[1]), f"buckets must be {BUCKETS}"),
        (lambda m: m["rows"][0].update(destination=""), "listener and destination"),
        (lambda m: m.update(seconds=0), "seconds must be"),
        (lambda m: m.update(rows=[m["rows"][0]] * (wire.MAX_STATS_ROWS + 1)), "more than 256"),
    ]:
        bad = json.loads(json.dumps(good))
        change(bad)
        with pytest.raises(wire.PushProtocolError, match=error):
            wire.decode(json.dumps(bad))


def test_proxy_stats_report_is_deltas_per_destination_and_subset() -> None:
    stats = ProxyStats(source="a.default")
    assert stats.report(0.0) is None  # the first call only marks the start
    stats.destination("outbound", "b.default/v2").record(200, 0.003)
    stats.destination("outbound", "b.default/v2").record(503, 0.003)
    first = stats.report(2.0)
    assert first is not None and first.seconds == 2.0
    (r,) = first.rows
    assert (r.destination, r.subset, r.classes) == ("b.default", "v2", (0, 0, 1, 0, 0, 1))
    assert sum(r.buckets) == 2
    second = stats.report(4.0)
    assert second is not None and second.rows == ()  # nothing new: an empty report


def test_quantiles_interpolate_within_buckets_as_prometheus_does() -> None:
    c = Counts()
    c.buckets[4] = 100  # all in (5 ms, 10 ms]
    assert c.quantile(0.5) == pytest.approx(0.0075)
    assert c.quantile(0.99) == pytest.approx(0.00995)
    c.buckets[-1] = 100  # half above 10 s: p99 is the last finite bound
    assert c.quantile(0.99) == pytest.approx(10.0)
    assert Counts().quantile(0.5) is None


def test_mesh_stats_aggregates_edges_and_expires_the_window() -> None:
    now = [100.0]
    mesh = MeshStats(window=10.0, clock=lambda: now[0])
    # Two frontend sidecars each report 2 s with 20 requests to orders; one 5xx.
    mesh.record(
        "default/frontend/1", "frontend.default", wire.Stats(2.0, (row("orders.default", 20),))
    )
    mesh.record(
        "default/frontend/2", "frontend.default", wire.Stats(2.0, (row("orders.default", 19, 1),))
    )
    mesh.record(
        "default/orders/1", "orders.default", wire.Stats(2.0, (row("app", 40, listener="inbound"),))
    )
    out = render(mesh.aggregate())
    (edge,) = out["edges"]
    assert (edge["source"], edge["destination"]) == ("frontend.default", "orders.default")
    assert edge["rps"] == 20.0 and edge["requests"] == 40 and edge["sidecars"] == 2
    assert edge["success_rate"] == pytest.approx(39 / 40)
    services = {s["service"]: s for s in out["services"]}
    assert services["orders.default"]["rps"] == 20.0
    assert services["frontend.default"]["requests"] == 0  # known from the edge only
    # Another replica's aggregate, as read from the KV, adds up.
    other = Aggregate.from_dict(json.loads(json.dumps(mesh.aggregate().to_dict())))
    merged = mesh.aggregate()
    merged.merge(other)
    assert render(merged)["edges"][0]["rps"] == 40.0
    now[0] += 11  # past the window: nothing left
    assert render(mesh.aggregate()) == {"services": [], "edges": []}


# -- over real processes -----------------------------------------------------------------

pytestmark_e2e = pytest.mark.timeout(120)


def documented_metrics() -> dict[str, str]:
    """name -> type from the table in docs/metrics.md (the exposed ones only)."""
    text = (ROOT / "docs" / "metrics.md").read_text()
    section = text.split("## The sidecar's metrics", 1)[1].split("Planned,", 1)[0]
    return dict(re.findall(r"^\| `(tether_\w+)` \| (\w+) \|", section, re.M))


def http_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return json.loads(resp.read())


@pytestmark_e2e
def test_stats_reach_the_control_plane_top_and_prometheus(
    registry_process: Callable[..., RegistryProcess], tmp_path: Path
) -> None:
    reg = registry_process()
    env = dict(os.environ, CONSUL_HTTP_ADDR=f"127.0.0.1:{reg.port}")
    cp = ControlPlaneProcess(reg.port, tmp_path / "cp.log")
    procs = ProcessSet(tmp_path, reg.port)
    try:
        cp.start()
        b_app = procs.app("b-v1")
        procs.sidecar("b", b_app, "--version", "v1", "--controlplane", cp.url)
        sa = procs.sidecar("a", procs.app("a"), "--controlplane", cp.url)
        for _ in range(30):
            assert sa.call("http://b/who")[0] == 200
        # Egress to two addresses (the app answers on one; the other refuses), and a name
        # that is no service: none of them may become a label value of its own.
        status, headers, body = sa.call(f"http://127.0.0.1:{b_app.port}/who")
        assert "x-tether-error" not in headers, (status, headers, body)
        assert sa.call(f"http://127.0.0.2:{b_app.port}/who")[0] >= 500
        assert sa.call("http://nosuchservice/")[1]["x-tether-error"] == "unknown_service"

        def edge() -> dict[str, Any] | None:
            stats = http_json(f"{cp.url}/api/v1/stats")
            served = {s["service"]: s["requests"] for s in stats["services"]}
            if served.get("b.default", 0) < 30:  # b's own report, of what it handed its app
                return None
            for e in stats["edges"]:
                ends = (e["source"], e["destination"])
                if ends == ("a.default", "b.default") and e["requests"] >= 30:
                    return dict(e, services=stats["services"])
            return None

        got = poll(edge, 20, "a -> b in the control plane's stats", interval=0.2)
        assert got["rps"] > 0 and got["success_rate"] == 1.0
        assert 0 < got["p50_ms"] <= got["p99_ms"] < 10_000

        top = run_tether("top", "--once", "--controlplane", cp.url, env=env, timeout=30)
        assert top.returncode == 0, top.stderr
        lines = [line for line in top.stdout.splitlines() if "a.default" in line]
        assert any("b.default" in line and "100.0%" in line for line in lines), top.stdout

        _, text = sa.admin("/stats/prometheus")
        families = {f.name: f for f in text_string_to_metric_families(text)}
        assert {n: f.type for n, f in families.items()} == documented_metrics()
        values = {v for f in families.values() for s in f.samples for v in s.labels.values()}
        assert not [v for v in values if "127.0.0." in v or "nosuch" in v]
        requests = families["tether_requests"].samples
        assert any(
            s.labels == {
                "source": "a.default", "listener": "outbound", "destination": "b.default",
                "subset": "", "status_class": "2xx"} and s.value == 30
            for s in requests
        ), requests  # fmt: skip
        assert sum(s.value for s in requests if s.labels["destination"] == "egress") == 2
        replies = families["tether_local_replies"].samples
        assert any(s.labels["reason"] == "unknown_service" for s in replies), replies
        (connected,) = families["tether_controlplane_connected"].samples
        assert connected.value == 1
    finally:
        procs.close()
        cp.stop()
