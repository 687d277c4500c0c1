"""Metrics over OTLP (proxy/otel_metrics.py): the Prometheus text's families as OTLP
points (pure), the environment's switch, the SDK left unimported without it, and a real
sidecar exporting to the collector stand-in the same counts /stats/prometheus shows."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.metrics.export import MetricExporter, MetricExportResult, MetricsData
from prometheus_client.parser import text_string_to_metric_families

from proxy.otel_metrics import OtelMetrics, histogram_point, parse
from proxy.sidecar import otel_metrics_requested
from proxy.stats import LATENCY_BOUNDS, ProxyStats
from tests.conftest import RegistryProcess
from tests.otlp_collector import Collector, Point
from tests.polling import poll
from tests.sidecar_harness import ROOT, ProcessSet
from tests.test_tracing import call


def test_parse_keeps_names_labels_and_bucket_bounds() -> None:
    stats = ProxyStats(source="a.default")
    ds = stats.destination("outbound", "b.default/v2", "b.default#0")
    for latency in (0.0001, 0.003, 0.003, 20.0):
        ds.record(200, latency)
    ds.record(503, 0.2)
    stats.downstream_active["outbound"] = 3
    families = parse(stats.render_prometheus())
    req = families["tether_requests"]
    assert req.kind == "counter"
    labels = (("destination", "b.default"), ("listener", "outbound"), ("route", "b.default#0"),
              ("source", "a.default"), ("status_class", "2xx"), ("subset", "v2"))  # fmt: skip
    assert req.samples[labels] == 4
    assert families["tether_downstream_connections_active"].kind == "gauge"
    assert families["tether_downstream_connections_active"].samples == {
        (("listener", "outbound"),): 3
    }
    hist = families["tether_request_duration_seconds"]
    assert hist.kind == "histogram"
    (series,) = hist.histograms.values()
    assert series.bounds == [float(b) for b in LATENCY_BOUNDS]
    assert series.count == 5 and series.sum == pytest.approx(20.2061, abs=1e-5)
    point = histogram_point(series, 1, 2, next(iter(hist.histograms)))
    # Per-bucket counts (OTLP), one more than the bounds (+Inf), the same total.
    assert len(point.bucket_counts) == len(LATENCY_BOUNDS) + 1
    assert sum(point.bucket_counts) == 5 and point.bucket_counts[-1] == 1
    assert point.bucket_counts == ds.buckets


class Capture(MetricExporter):
    """Keeps what the periodic reader exports (the SDK's own data, before OTLP)."""

    def __init__(self) -> None:
        super().__init__()
        self.exports: list[MetricsData] = []

    def export(
        self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any
    ) -> MetricExportResult:
        self.exports.append(metrics_data)
        return MetricExportResult.SUCCESS

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        return True

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
        pass


def _points(data: MetricsData) -> dict[str, list[Any]]:
    return {
        m.name: list(m.data.data_points)
        for rm in data.resource_metrics
        for sm in rm.scope_metrics
        for m in sm.metrics
    }


def test_collections_read_a_snapshot_the_loop_renders() -> None:
    """The reader's thread never renders: the loop does, between its callbacks. A
    family that appears later is exported from the export after the one that saw it."""
    loop = asyncio.new_event_loop()
    runner = threading.Thread(target=loop.run_forever, daemon=True)
    runner.start()
    stats = ProxyStats(source="a.default")
    ds = stats.destination("outbound", "b.default")
    rendered_on: set[int] = set()

    def render() -> str:
        rendered_on.add(threading.get_ident())
        return stats.render_prometheus()

    capture = Capture()

    async def make() -> OtelMetrics:
        ds.record(200, 0.01)
        return OtelMetrics(render, loop, service="a", namespace="default", exporter=capture)

    try:
        om = asyncio.run_coroutine_threadsafe(make(), loop).result(10)
        om.force_flush()
        first = _points(capture.exports[-1])
        (req,) = first["tether_requests"]
        assert req.value == 1 and req.attributes["status_class"] == "2xx"
        (hist,) = first["tether_request_duration_seconds"]
        assert hist.count == 1 and list(hist.explicit_bounds) == list(LATENCY_BOUNDS)
        loop.call_soon_threadsafe(ds.record, 503, 0.02)
        hedges = ["# TYPE tether_hedges_total counter", 'tether_hedges_total{destination="b"} 3']
        loop.call_soon_threadsafe(stats.resilience_sources.append, lambda: hedges)
        om.force_flush()
        second = _points(capture.exports[-1])
        assert sorted(p.value for p in second["tether_requests"]) == [1, 1]
        assert second["tether_request_duration_seconds"][0].count == 2
        assert "tether_hedges" not in second  # its instrument was made at this export
        om.force_flush()
        (hedge,) = _points(capture.exports[-1])["tether_hedges"]
        assert hedge.value == 3 and dict(hedge.attributes) == {"destination": "b"}
        om.shutdown()  # one last export, its snapshot from the loop too
        assert len(capture.exports) == 4
        assert rendered_on == {runner.ident}
    finally:
        loop.call_soon_threadsafe(loop.stop)
        runner.join(10)
        loop.close()


def test_the_environment_switch_warns_once_for_what_it_does_not_speak(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, "tether.sidecar")
    assert not otel_metrics_requested({})
    assert not otel_metrics_requested({"OTEL_METRICS_EXPORTER": "none"})
    assert otel_metrics_requested({"OTEL_METRICS_EXPORTER": "otlp"})
    assert caplog.records == []
    assert not otel_metrics_requested({"OTEL_METRICS_EXPORTER": "prometheus"})
    assert len(caplog.records) == 1 and "OTEL_METRICS_EXPORTER=prometheus" in caplog.text
    caplog.clear()
    assert otel_metrics_requested({"OTEL_METRICS_EXPORTER": "otlp,console"})
    assert len(caplog.records) == 1 and "console ignored" in caplog.text
    caplog.clear()
    env = {"OTEL_METRICS_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}
    assert not otel_metrics_requested(env)
    assert len(caplog.records) == 1 and "grpc" in caplog.text
    env["OTEL_EXPORTER_OTLP_METRICS_PROTOCOL"] = "http/protobuf"  # the signal's own wins
    assert otel_metrics_requested(env)


def test_the_sdk_is_not_imported_without_otlp_metrics() -> None:
    code = (
        "import sys, proxy.sidecar, proxy.stats, proxy.admin\n"
        "from proxy.sidecar import Sidecar, SidecarSpec, otel_metrics_requested\n"
        "sc = Sidecar(SidecarSpec(service='a', app_port=1))\n"
        "assert not otel_metrics_requested({'OTEL_METRICS_EXPORTER': 'bogus'})\n"
        "print(sorted(m for m in sys.modules if m.startswith('opentelemetry')"
        " or m == 'proxy.otel_metrics'))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


@pytest.fixture
def collector() -> Iterator[Collector]:
    c = Collector()
    yield c
    c.close()


def _requests(points: list[Point]) -> dict[tuple[str, str, str], float]:
    """The outbound listener's request counts (the test's own requests: the inbound
    listener's may grow with health checks between a scrape and an export)."""
    return {
        (p.attributes["listener"], p.attributes["destination"], p.attributes["status_class"]): (
            p.value
        )
        for p in points
        if p.name == "tether_requests" and p.attributes["listener"] != "inbound"
    }


@pytest.mark.timeout(120)
def test_a_sidecar_exports_over_otlp_what_prometheus_shows(
    registry_process: Callable[..., RegistryProcess], tmp_path: Path, collector: Collector
) -> None:
    reg = registry_process()
    procs = ProcessSet(tmp_path, reg.port)
    env = {
        "OTEL_METRICS_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_ENDPOINT": collector.endpoint,
        "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
        "OTEL_METRIC_EXPORT_INTERVAL": "200",
        "NO_PROXY": "127.0.0.1,localhost",
    }
    try:
        # An exporter the sidecar does not speak: one warning, and it runs.
        sb = procs.sidecar("b", procs.app("b"), env={"OTEL_METRICS_EXPORTER": "prometheus"})
        sa = procs.sidecar("a", procs.app("a"), env=env)
        port = sa.ports["outbound"]
        for _ in range(7):
            assert call(port, "http://b/who", {})[0] == 200
        assert call(port, "http://nosuchservice/", {})[0] >= 400
        _, text = sa.admin("/stats/prometheus")
        prom = {
            (s.labels["listener"], s.labels["destination"], s.labels["status_class"]): s.value
            for fam in text_string_to_metric_families(text)
            if fam.name == "tether_requests"
            for s in fam.samples
            if s.labels["listener"] != "inbound"
        }
        assert prom[("outbound", "b.default", "2xx")] == 7
        # Exports run every 200 ms: wait for one taken after these requests.
        points = poll(
            lambda: (p := collector.last_metrics()) and _requests(p) == prom and p,
            20,
            "an OTLP export with the requests /stats/prometheus shows",
        )
        assert collector.content_types == {"application/x-protobuf"}
        req = [p for p in points if p.name == "tether_requests"]
        assert all(p.kind == "sum" and p.monotonic and p.temporality == 2 for p in req)
        assert {p.resource["service.name"] for p in points} == {"a"}
        assert {p.scope for p in points} == {"tether.sidecar"}
        (hist,) = [
            p for p in points
            if p.name == "tether_request_duration_seconds"
            and p.attributes["destination"] == "b.default"
        ]  # fmt: skip
        assert hist.kind == "histogram" and hist.temporality == 2
        assert hist.explicit_bounds == [float(b) for b in LATENCY_BOUNDS]
        assert hist.count == 7 == sum(hist.bucket_counts) and not hist.has_min
        gauges = {p.name for p in points if p.kind == "gauge"}
        assert {"tether_downstream_connections_active", "tether_config_version"} <= gauges
        # Every Prometheus family with samples is exported, under the same name.
        names = {p.name for p in points}
        for fam in text_string_to_metric_families(text):
            if fam.samples:
                assert fam.name in names, fam.name
        # No labels made up: each point's attributes are a Prometheus sample's labels.
        assert "tether_local_replies" in names
        assert sa.proc.poll() is None and sb.proc.poll() is None
        assert sb.output().count("OTEL_METRICS_EXPORTER=prometheus: only otlp") == 1
        assert "metrics over OTLP" in sa.output() and "metrics over OTLP" not in sb.output()
    finally:
        procs.close()
