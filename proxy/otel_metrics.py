"""The sidecar's metrics over OTLP/HTTP, when `OTEL_METRICS_EXPORTER=otlp` asks for them.

Imported only then (docs/metrics.md, "Over OTLP"), so a sidecar without it never loads
the OpenTelemetry SDK's metrics. The families are the ones `/stats/prometheus` shows,
with the same names (a counter without its `_total`, as OpenTelemetry names a monotonic
sum) and the same labels as attributes:

- counters: `ObservableCounter`s (monotonic cumulative sums);
- gauges: `ObservableGauge`s;
- histograms: OTLP explicit-bucket histograms with the same fixed bounds, cumulative.
  The SDK has no asynchronous histogram, so these points are built here from the
  snapshot and added to what the reader collected, in `_WithHistograms.export`.

Collection runs on the SDK's `PeriodicExportingMetricReader` thread (its interval is
`OTEL_METRIC_EXPORT_INTERVAL`, its timeout `OTEL_METRIC_EXPORT_TIMEOUT`; the OTLP exporter
reads `OTEL_EXPORTER_OTLP_*` itself). That thread never reads loop-owned state: at each
collection it asks the event loop for the Prometheus text (the same call the admin
listener makes, run on the loop between two requests) and works on that snapshot, so
every family of one export comes from the same moment. Nothing runs on the request path.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    Histogram,
    HistogramDataPoint,
    Metric,
    MetricExporter,
    MetricExportResult,
    MetricsData,
    PeriodicExportingMetricReader,
    ResourceMetrics,
    ScopeMetrics,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.util.instrumentation import InstrumentationScope

log = logging.getLogger("tether.otel_metrics")

SCOPE = "tether.sidecar"
# How long the reader thread waits for the loop's snapshot before skipping a collection.
SNAPSHOT_TIMEOUT = 5.0

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')

Labels = tuple[tuple[str, str], ...]


@dataclass
class HistogramSeries:
    bounds: list[float] = field(default_factory=list)
    cumulative: list[int] = field(default_factory=list)  # per bound, then +Inf
    sum: float = 0.0
    count: int = 0


@dataclass
class Family:
    name: str  # the OTLP name: a counter's Prometheus name without `_total`
    kind: str  # counter, gauge or histogram
    help: str = ""
    samples: dict[Labels, float] = field(default_factory=dict)
    histograms: dict[Labels, HistogramSeries] = field(default_factory=dict)


def parse(text: str) -> dict[str, Family]:
    """The families of the sidecar's own Prometheus text (proxy/stats.py's format), by
    OTLP name. Untyped samples are ignored."""
    families: dict[str, Family] = {}
    by_prom: dict[str, Family] = {}
    helps: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("# HELP "):
            name, _, rest = line[7:].partition(" ")
            helps[name] = rest
            continue
        if line.startswith("# TYPE "):
            name, _, kind = line[7:].partition(" ")
            kind = kind.strip()
            if kind not in ("counter", "gauge", "histogram"):
                continue
            otlp = name[: -len("_total")] if kind == "counter" and name.endswith("_total") else name
            fam = families.get(otlp)
            if fam is None:
                fam = families[otlp] = Family(otlp, kind, helps.get(name, ""))
            by_prom[name] = fam
            continue
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        if m is None:
            continue
        sname, body, raw = m.groups()
        labels = [(k, v.replace('\\"', '"').replace("\\\\", "\\")) for k, v in
                  _LABEL.findall(body or "")]  # fmt: skip
        value = float(raw)
        fam = by_prom.get(sname)
        if fam is not None and fam.kind != "histogram":
            key = tuple(sorted(labels))
            fam.samples[key] = fam.samples.get(key, 0.0) + value
            continue
        for suffix in ("_bucket", "_sum", "_count"):
            if sname.endswith(suffix) and sname[: -len(suffix)] in by_prom:
                fam = by_prom[sname[: -len(suffix)]]
                break
        else:
            continue
        if fam.kind != "histogram":
            continue
        le = next((v for k, v in labels if k == "le"), None)
        key = tuple(sorted((k, v) for k, v in labels if k != "le"))
        series = fam.histograms.setdefault(key, HistogramSeries())
        if suffix == "_bucket" and le is not None:
            if le != "+Inf":
                series.bounds.append(float(le))
            series.cumulative.append(int(value))
        elif suffix == "_sum":
            series.sum = value
        elif suffix == "_count":
            series.count = int(value)
    return families


def histogram_point(series: HistogramSeries, start: int, now: int, attrs: Labels) -> Any:
    """An OTLP explicit-bucket point: per-bucket counts (Prometheus' are cumulative)."""
    counts = [b - a for a, b in zip([0, *series.cumulative], series.cumulative, strict=False)]
    return HistogramDataPoint(
        attributes=dict(attrs),
        start_time_unix_nano=start,
        time_unix_nano=now,
        count=series.count,
        sum=series.sum,
        bucket_counts=counts,
        explicit_bounds=list(series.bounds),
        # Not kept by the sidecar: left out of the OTLP point (both are optional there).
        min=None,  # type: ignore[arg-type]
        max=None,  # type: ignore[arg-type]
    )


class _WithHistograms(MetricExporter):
    """The OTLP exporter, with the snapshot's histograms added to each export."""

    def __init__(self, inner: MetricExporter, owner: OtelMetrics) -> None:
        super().__init__(
            preferred_temporality=inner._preferred_temporality,
            preferred_aggregation=inner._preferred_aggregation,
        )
        self.inner = inner
        self.owner = owner

    def export(
        self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any
    ) -> MetricExportResult:
        extra = self.owner.histogram_metrics()
        # The collection is over (the SDK released its locks): the next one takes a new
        # snapshot, and families seen for the first time get their instruments now.
        self.owner.collected()
        if extra:
            resource = self.owner.resource
            rms = list(metrics_data.resource_metrics)
            scope = InstrumentationScope(SCOPE)
            added = False
            for i, rm in enumerate(rms):
                sms = list(rm.scope_metrics)
                for j, sm in enumerate(sms):
                    if sm.scope.name == SCOPE:
                        sms[j] = ScopeMetrics(sm.scope, [*sm.metrics, *extra], sm.schema_url)
                        added = True
                rms[i] = ResourceMetrics(rm.resource, sms, rm.schema_url)
            if not added:
                rms.append(ResourceMetrics(resource, [ScopeMetrics(scope, extra, "")], ""))
            metrics_data = MetricsData(resource_metrics=rms)
        return self.inner.export(metrics_data, timeout_millis=timeout_millis, **kwargs)

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        return self.inner.force_flush(timeout_millis)

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
        self.inner.shutdown(timeout_millis=timeout_millis, **kwargs)


class OtelMetrics:
    """One sidecar's OTLP metrics: a MeterProvider, its periodic reader, and the
    snapshot its callbacks read. `render` returns the Prometheus text and is called on
    `loop` (an asyncio loop: anything with `call_soon_threadsafe`)."""

    def __init__(
        self,
        render: Callable[[], str],
        loop: Any,
        *,
        service: str,
        namespace: str,
        zone: str = "",
        exporter: MetricExporter | None = None,
    ) -> None:
        self.render = render
        self.loop = loop
        self.lock = threading.RLock()
        self.families: dict[str, Family] = {}
        self.snapshot_ns = 0
        self.start_ns = time.time_ns()
        self.collections = 0
        self.failures = 0
        attrs: dict[str, Any] = {
            "service.name": service,
            "service.namespace": namespace,
            "service.instance.id": f"{service}-{os.getpid()}",
            "tether.component": "sidecar",
        }
        if zone:
            attrs["cloud.availability_zone"] = zone
        self.resource = Resource.create(attrs)
        if exporter is None:
            from opentelemetry.exporter.otlp.proto.http.metric_exporter import (
                OTLPMetricExporter,
            )

            exporter = OTLPMetricExporter()
        self.reader = PeriodicExportingMetricReader(_WithHistograms(exporter, self))
        self.provider = MeterProvider(resource=self.resource, metric_readers=[self.reader])
        self.meter = self.provider.get_meter(SCOPE)
        self._instruments: dict[str, str] = {}  # OTLP name -> kind
        # Made on the loop (the sidecar's start): the families known then get their
        # instruments at once; the first collection takes a fresh snapshot.
        self.families = parse(render())
        self.stale = True
        self._make_instruments()

    # -- on the reader thread -------------------------------------------------------

    def refresh(self) -> None:
        """The loop's Prometheus text, parsed: the snapshot this collection reads."""
        fut: concurrent.futures.Future[str] = concurrent.futures.Future()

        def take() -> None:
            if fut.set_running_or_notify_cancel():
                try:
                    fut.set_result(self.render())
                except Exception as exc:
                    fut.set_exception(exc)

        try:
            self.loop.call_soon_threadsafe(take)
            text = fut.result(SNAPSHOT_TIMEOUT)
        except Exception as exc:
            # The loop is closed or too busy (or rendering failed): this collection
            # sends the previous snapshot (a warning each time).
            fut.cancel()
            self.failures += 1
            log.warning("metrics snapshot not taken (%s): exporting the previous one", exc)
            return
        self.families = parse(text)
        self.snapshot_ns = time.time_ns()
        self.collections += 1

    def collected(self) -> None:
        """An export is under way: the next collection reads a new snapshot."""
        with self.lock:
            self.stale = True
            self._make_instruments()

    def _make_instruments(self) -> None:
        for fam in list(self.families.values()):
            if fam.name not in self._instruments and fam.kind != "histogram":
                self._instrument(fam)

    def _instrument(self, fam: Family) -> None:
        self._instruments[fam.name] = fam.kind
        callback = self._callback(fam.name)
        if fam.kind == "counter":
            self.meter.create_observable_counter(
                fam.name, callbacks=[callback], description=fam.help
            )
        else:
            self.meter.create_observable_gauge(fam.name, callbacks=[callback], description=fam.help)

    def _callback(self, name: str) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def observe(options: CallbackOptions) -> Iterable[Observation]:
            # The first callback of a collection takes its snapshot (from the loop);
            # the others read the same one.
            with self.lock:
                if self.stale:
                    self.stale = False
                    self.refresh()
                fam = self.families.get(name)
            if fam is None:
                return []
            return [
                Observation(int(v) if v.is_integer() else v, dict(labels))
                for labels, v in fam.samples.items()
            ]

        return observe

    def histogram_metrics(self) -> Sequence[Metric]:
        """The snapshot's histograms as OTLP metrics (cumulative, the same bounds)."""
        out: list[Metric] = []
        now = self.snapshot_ns or time.time_ns()
        for fam in self.families.values():
            if fam.kind != "histogram" or not fam.histograms:
                continue
            points = [
                histogram_point(series, self.start_ns, now, labels)
                for labels, series in fam.histograms.items()
            ]
            data = Histogram(
                data_points=points, aggregation_temporality=AggregationTemporality.CUMULATIVE
            )
            out.append(Metric(name=fam.name, description=fam.help, unit="", data=data))
        return out

    # -- lifecycle ------------------------------------------------------------------

    def force_flush(self) -> bool:
        """Collect and export now (blocks: tests, and the final export)."""
        return bool(self.provider.force_flush())

    def shutdown(self) -> None:
        """One last export, then stop the reader's thread (blocks: run it off the loop)."""
        self.provider.shutdown()

    def __repr__(self) -> str:
        interval = self.reader._export_interval_millis
        return f"<OtelMetrics families={len(self.families)} interval={interval:.0f}ms>"


def from_env(
    env: Mapping[str, str],
    render: Callable[[], str],
    loop: Any,
    *,
    service: str,
    namespace: str,
    zone: str = "",
) -> OtelMetrics:
    """The sidecar's OTLP metrics, once proxy/sidecar.py's `otel_metrics_requested`
    found them asked for (it decides without importing this module); the exporter and
    the reader read their `OTEL_*` variables from the process environment."""
    return OtelMetrics(render, loop, service=service, namespace=namespace, zone=zone)
