"""A collector stand-in for tests: a real aiohttp server taking OTLP/HTTP (protobuf) traces
and metrics.

It runs its own event loop in a thread, so synchronous end-to-end tests can use it
beside the processes they start. `POST /v1/traces` is decoded with the OTLP proto
package (`ExportTraceServiceRequest`), as a collector does; every span is kept as a
`Span` with its resource's attributes, ids as hex. `POST /v1/metrics` is decoded as an
`ExportMetricsServiceRequest`; each export's data points are kept as `Point`s.
"""

from __future__ import annotations

import asyncio
import gzip
import threading
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue

KINDS = {1: "internal", 2: "server", 3: "client", 4: "producer", 5: "consumer"}


def _value(v: AnyValue) -> Any:
    which = v.WhichOneof("value")
    return getattr(v, which) if which else None


@dataclass
class Span:
    trace_id: str
    span_id: str
    parent_id: str
    name: str
    kind: str
    attributes: dict[str, Any]
    resource: dict[str, Any]
    status: int  # 0 unset, 1 ok, 2 error
    start_ns: int
    end_ns: int
    scope: str = ""
    events: list[str] = field(default_factory=list)


@dataclass
class Point:
    """One data point of an exported metric (`kind`: sum, gauge or histogram)."""

    name: str
    kind: str
    attributes: dict[str, Any]
    resource: dict[str, Any]
    value: float = 0.0
    monotonic: bool = False
    temporality: int = 0  # 1 delta, 2 cumulative
    count: int = 0
    sum: float = 0.0
    bucket_counts: list[int] = field(default_factory=list)
    explicit_bounds: list[float] = field(default_factory=list)
    has_min: bool = False
    scope: str = ""
    time_ns: int = 0


def _number(p: Any) -> float:
    return float(p.as_int) if p.WhichOneof("value") == "as_int" else float(p.as_double)


class Collector:
    """`endpoint` is what OTEL_EXPORTER_OTLP_ENDPOINT takes; `spans` what arrived."""

    def __init__(self) -> None:
        self.spans: list[Span] = []
        self.requests = 0
        self.content_types: set[str] = set()
        # Metrics: every export's points, in arrival order (one list per request).
        self.metric_exports: list[list[Point]] = []
        self.port = 0
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._runner: web.AppRunner | None = None
        started = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(started,), daemon=True)
        self._thread.start()
        if not started.wait(10):
            raise RuntimeError("the collector stand-in did not start")

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _run(self, started: threading.Event) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._start())
        started.set()
        self._loop.run_forever()

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_post("/v1/traces", self._traces)
        app.router.add_post("/v1/metrics", self._metrics)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def _traces(self, request: web.Request) -> web.Response:
        body = await request.read()
        if request.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        msg = ExportTraceServiceRequest()
        msg.ParseFromString(body)
        got: list[Span] = []
        for rs in msg.resource_spans:
            resource = {a.key: _value(a.value) for a in rs.resource.attributes}
            for ss in rs.scope_spans:
                for s in ss.spans:
                    got.append(
                        Span(
                            trace_id=s.trace_id.hex(),
                            span_id=s.span_id.hex(),
                            parent_id=s.parent_span_id.hex(),
                            name=s.name,
                            kind=KINDS.get(s.kind, str(s.kind)),
                            attributes={a.key: _value(a.value) for a in s.attributes},
                            resource=resource,
                            status=s.status.code,
                            start_ns=s.start_time_unix_nano,
                            end_ns=s.end_time_unix_nano,
                            scope=ss.scope.name,
                        )
                    )
        with self._lock:
            self.requests += 1
            self.content_types.add(request.headers.get("Content-Type", ""))
            self.spans.extend(got)
        return web.Response(
            body=ExportTraceServiceResponse().SerializeToString(),
            content_type="application/x-protobuf",
        )

    async def _metrics(self, request: web.Request) -> web.Response:
        body = await request.read()
        if request.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        msg = ExportMetricsServiceRequest()
        msg.ParseFromString(body)
        got: list[Point] = []
        for rm in msg.resource_metrics:
            resource = {a.key: _value(a.value) for a in rm.resource.attributes}
            for sm in rm.scope_metrics:
                for m in sm.metrics:
                    which = m.WhichOneof("data")
                    data = getattr(m, which)
                    for p in data.data_points:
                        point = Point(
                            name=m.name,
                            kind=which,
                            attributes={a.key: _value(a.value) for a in p.attributes},
                            resource=resource,
                            scope=sm.scope.name,
                            time_ns=p.time_unix_nano,
                        )
                        if which == "sum":
                            point.value = _number(p)
                            point.monotonic = data.is_monotonic
                            point.temporality = data.aggregation_temporality
                        elif which == "gauge":
                            point.value = _number(p)
                        elif which == "histogram":
                            point.temporality = data.aggregation_temporality
                            point.count, point.sum = p.count, p.sum
                            point.bucket_counts = list(p.bucket_counts)
                            point.explicit_bounds = list(p.explicit_bounds)
                            point.has_min = p.HasField("min")
                        got.append(point)
        with self._lock:
            self.requests += 1
            self.content_types.add(request.headers.get("Content-Type", ""))
            self.metric_exports.append(got)
        return web.Response(
            body=ExportMetricsServiceResponse().SerializeToString(),
            content_type="application/x-protobuf",
        )

    def last_metrics(self) -> list[Point]:
        """The points of the latest metrics export (empty before the first)."""
        with self._lock:
            return list(self.metric_exports[-1]) if self.metric_exports else []

    def trace(self, trace_id: str) -> list[Span]:
        with self._lock:
            return [s for s in self.spans if s.trace_id == trace_id]

    def close(self) -> None:
        async def stop() -> None:
            if self._runner is not None:
                await self._runner.cleanup()

        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def env(self) -> dict[str, str]:
        """What a sidecar's environment needs to export here, quickly."""
        return {
            "OTEL_TRACES_EXPORTER": "otlp",
            "OTEL_EXPORTER_OTLP_ENDPOINT": self.endpoint,
            "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
            "OTEL_BSP_SCHEDULE_DELAY": "100",
            "NO_PROXY": "127.0.0.1,localhost",
        }
