"""Tracing through the OpenTelemetry SDK: a server span per request, a client span per attempt.

Imported only when tracing is on (`OTEL_TRACES_EXPORTER=otlp`, or a test's exporter), so
a sidecar without tracing never loads the SDK. Per request, `ListenerTracing.begin` runs
in plain code (proxy/trace_context.py, part of the compiled build): find the incoming
context, decide; only a sampled request reaches `Tracing.start` and gets a
`SampledTrace`, the one object here that makes SDK spans:

- the server span (kind SERVER) starts when the request head arrived, as the child of
  the incoming context (or as a new trace's root), and ends at the exchange's
  `end(outcome)`;
- a client span (kind CLIENT) per attempt to the upstream, a child of the server span,
  from `attempt_start` (the exchange's `_acquire`) to `attempt_end` (a failed attempt
  that is sent again) or the end; each attempt's request carries its own client span's
  id in `traceparent` (and in `b3` when the caller spoke B3), so the next sidecar's
  server span is that client span's child.

Attributes follow OpenTelemetry's HTTP semantic conventions, plus the mesh's own under
`tether.*` (docs/metrics.md lists them all). Spans are exported by the SDK's
`BatchSpanProcessor` (its own thread: `OTEL_BSP_*` honoured) to OTLP over HTTP/protobuf
(`OTEL_EXPORTER_OTLP_*` honoured, as the exporter documents them).
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Protocol

from opentelemetry import trace as otel
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_ON
from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, TraceFlags
from opentelemetry.trace.span import TraceState
from opentelemetry.trace.status import Status, StatusCode

from proxy import outcome as outcomes
from proxy.stats import split_destination
from proxy.trace_context import (
    ListenerTracing,
    Parent,
    SamplingSpec,
    UnsampledIds,
    path_of,
    sampling_from_env,
    traceparent_line,
    tracing_requested,
    with_line,
)

if TYPE_CHECKING:
    from proxy.exchange import Exchange
    from proxy.h2_exchange import H2Exchange

SCOPE = "tether.sidecar"
__all__ = ["ListenerTracing", "SampledTrace", "Tracing", "exporter_from_env", "from_env"]


class MeshSource(Protocol):
    """Where the applied MeshConfig is (proxy/policy.py's Policy)."""

    @property
    def mesh(self) -> Any: ...


def exporter_from_env(env: Mapping[str, str]) -> SpanExporter | None:
    """The exporter `OTEL_TRACES_EXPORTER` names: `otlp` (over HTTP/protobuf; the
    exporter reads `OTEL_EXPORTER_OTLP_*` itself), or None when tracing is off. An
    exporter or protocol the sidecar does not speak raises ValueError."""
    if not tracing_requested(env):
        return None
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter()


class Tracing:
    """One sidecar's tracer: its SDK provider, sampling, and who it speaks for."""

    def __init__(
        self,
        exporter: SpanExporter,
        sampling: SamplingSpec,
        *,
        service: str,
        namespace: str,
        zone: str = "",
        rng: random.Random | None = None,
        mesh: MeshSource | None = None,
    ) -> None:
        # The environment's sampler (`sampling`) wins; without one, MeshConfig's ratio
        # (read from `mesh.mesh` when the applied MeshConfig changes) does.
        self.sampling = sampling
        self.mesh = mesh
        self._mesh_seen: Any = None
        self._mesh_sampling: SamplingSpec | None = None
        self.service = service
        self.namespace = namespace
        self.zone = zone
        self.rng = rng if rng is not None else random.Random()
        attrs: dict[str, Any] = {
            "service.name": service,
            "service.namespace": namespace,
            "service.instance.id": f"{service}-{os.getpid()}",
            "tether.component": "sidecar",
        }
        if zone:
            attrs["cloud.availability_zone"] = zone
        # Our decision is made before any span exists: the SDK records what it is given.
        self.provider = TracerProvider(resource=Resource.create(attrs), sampler=ALWAYS_ON)
        self.processor = BatchSpanProcessor(exporter)
        self.provider.add_span_processor(self.processor)
        self.tracer = self.provider.get_tracer(SCOPE)
        self.sampled = 0  # requests recorded
        self.unsampled_ids = UnsampledIds(self.rng)

    def for_listener(self, listener: str) -> ListenerTracing:
        return ListenerTracing(self, listener)

    def start(
        self, lt: ListenerTracing, ex: Exchange | H2Exchange, parent: Parent | None
    ) -> SampledTrace:
        """The spans of a request `lt.begin` decided to sample (`parent`: the caller's
        context it continues, None for a new trace)."""
        self.sampled += 1
        return SampledTrace(lt, ex, parent)

    def current(self) -> SamplingSpec:
        """The sampling in force: MeshConfig's, when it has one and the environment set
        no sampler, else the environment's (or OpenTelemetry's default)."""
        source = self.mesh
        if source is None:
            return self.sampling
        mesh = source.mesh
        if mesh is not self._mesh_seen:
            self._mesh_seen = mesh
            tracing = getattr(mesh, "tracing", None)
            self._mesh_sampling = (
                SamplingSpec(tracing.sampling_ratio, True) if tracing is not None else None
            )
        return self._mesh_sampling or self.sampling

    def shutdown(self) -> None:
        """Export what is pending and stop the exporter's thread (blocks: at exit)."""
        self.provider.shutdown()

    def __repr__(self) -> str:
        s = self.sampling
        return (
            f"<Tracing {self.service}.{self.namespace} ratio={s.ratio}"
            f"{' parent-based' if s.parent_based else ''} sampled={self.sampled}>"
        )


def from_env(
    env: Mapping[str, str],
    *,
    service: str,
    namespace: str,
    zone: str = "",
    mesh: MeshSource | None = None,
) -> Tracing | None:
    """The sidecar's tracing as the environment configures it (None: off). MeshConfig's
    ratio (`mesh`) applies only when the environment chose no sampler."""
    exporter = exporter_from_env(env)
    if exporter is None:
        return None
    return Tracing(
        exporter,
        sampling_from_env(env, None),
        service=service,
        namespace=namespace,
        zone=zone,
        mesh=mesh if not env.get("OTEL_TRACES_SAMPLER") else None,
    )


def _status(code: int) -> Status | None:
    return Status(StatusCode.ERROR) if code >= 500 or code == 0 else None


class SampledTrace:
    """The spans of one sampled request (the only per-request object that touches the SDK)."""

    __slots__ = ("attempts", "b3", "client", "lt", "server")

    def __init__(
        self, lt: ListenerTracing, ex: Exchange | H2Exchange, parent: Parent | None
    ) -> None:
        self.lt = lt
        tracing = lt.tracing
        head = ex.head
        ctx = None
        if parent is not None:
            state = TraceState.from_header([parent.tracestate.decode("latin-1")]) if (
                parent.tracestate
            ) else None  # fmt: skip
            remote = SpanContext(
                int(parent.trace_id, 16),
                int(parent.span_id, 16),
                is_remote=True,
                trace_flags=TraceFlags(TraceFlags.SAMPLED),
                trace_state=state,
            )
            ctx = otel.set_span_in_context(NonRecordingSpan(remote))
        self.b3 = parent is not None and parent.b3
        method = head.method.decode("latin-1")
        path = path_of(head.target)
        attrs: dict[str, Any] = {
            "http.request.method": method,
            "url.path": path.decode("latin-1")[:256],
            "url.scheme": "http",
            "network.protocol.version": head.version,
            "network.peer.address": ex.conn.peer.address.decode("latin-1"),
            "tether.listener": lt.listener,
        }
        if head.host is not None:
            host, _, port = head.host.decode("latin-1").rpartition(":")
            if host and port.isdigit():
                attrs["server.address"], attrs["server.port"] = host, int(port)
            else:
                attrs["server.address"] = head.host.decode("latin-1")
        if tracing.zone:
            attrs["tether.zone"] = tracing.zone
        if lt.listener == "inbound":
            attrs["tether.destination.service"] = tracing.service
            attrs["tether.destination.namespace"] = tracing.namespace
            # The caller, from its verified mTLS identity (never from a header); a
            # plaintext caller has none and the attributes are left out.
            source = ex.conn.peer.source
            if source:
                name, _, ns = source.rpartition(".")
                attrs["tether.source.service"] = name
                attrs["tether.source.namespace"] = ns
        else:
            attrs["tether.source.service"] = tracing.service
            attrs["tether.source.namespace"] = tracing.namespace
        # The span began when the head arrived (the exchange's start, on its clock).
        start = time.time_ns() - int((ex.server.clock() - ex.start) * 1e9)
        self.server = tracing.tracer.start_span(
            method, context=ctx, kind=SpanKind.SERVER, attributes=attrs, start_time=start
        )
        self.client: Any = None
        self.attempts = 0

    def trace_id(self) -> bytes:
        return b"%032x" % self.server.get_span_context().trace_id

    def attempt_start(self, ex: Exchange | H2Exchange, data: bytes) -> bytes:
        """A client span for the attempt about to be sent; `data` (the request head as
        forwarded) gets that span's context."""
        trace_id, span_id = self._client_span(ex)
        data = with_line(data, traceparent_line(trace_id, span_id, True))
        if self.b3:
            data = with_line(data, b"b3: %s-%s-1\r\n" % (trace_id, span_id))
        return data

    def attempt_fields(self, ex: Exchange | H2Exchange) -> list[tuple[bytes, bytes]]:
        """`attempt_start` for an HTTP/2 stream: the fields its attempt's request gets."""
        trace_id, span_id = self._client_span(ex)
        fields = [(b"traceparent", b"00-%s-%s-01" % (trace_id, span_id))]
        if self.b3:
            fields.append((b"b3", b"%s-%s-1" % (trace_id, span_id)))
        return fields

    def _client_span(self, ex: Exchange | H2Exchange) -> tuple[bytes, bytes]:
        """Start the attempt's client span (ending the previous one): its (trace id, span
        id), as hex."""
        if self.client is not None:
            self.attempt_end(ex, "")
        self.attempts = n = self.attempts + 1
        tracing = self.lt.tracing
        route = ex.route
        method = ex.head.method.decode("latin-1")
        attrs: dict[str, Any] = {"http.request.method": method, "tether.attempt": n}
        if n > 1:
            attrs["http.request.resend_count"] = n - 1
        if route is not None:
            ep = route.endpoint
            if ep is not None:
                attrs["server.address"] = attrs["network.peer.address"] = ep.host
                attrs["server.port"] = attrs["network.peer.port"] = ep.port
                attrs["tether.endpoint"] = f"{ep.host}:{ep.port}"
                if ep.zone:
                    attrs["tether.endpoint.zone"] = ep.zone
            elif route.pool is not None:
                attrs["server.address"] = route.pool.host
                attrs["server.port"] = route.pool.port
        ctx = otel.set_span_in_context(self.server)
        self.client = span = tracing.tracer.start_span(
            method, context=ctx, kind=SpanKind.CLIENT, attributes=attrs
        )
        sc = span.get_span_context()
        return b"%032x" % sc.trace_id, b"%016x" % sc.span_id

    def hedge_start(self, ex: Exchange, data: bytes, route: Any) -> tuple[bytes, Any]:
        """A hedged attempt (proxy/hedging.py) races the exchange's own: its client span
        is its own, kept by the hedge (`hedge_end`, or `hedge_adopt` when it wins)."""
        own, saved = self.client, ex.route
        self.client = None
        ex.route = route  # the span's endpoint attributes are the hedge's
        try:
            data = self.attempt_start(ex, data)
        finally:
            ex.route = saved
        span, self.client = self.client, own
        span.set_attribute("tether.hedge", True)
        return data, span

    def hedge_end(self, span: Any, reason: str) -> None:
        """The hedged attempt lost the race or failed (`reason`, a local-reply reason)."""
        if reason:
            span.set_attributes({"tether.reason": reason, "error.type": reason})
            span.set_status(Status(StatusCode.ERROR, reason))
        span.end()

    def hedge_adopt(self, span: Any) -> None:
        """The exchange took the hedge's attempt over: its span is the exchange's
        current attempt's (the exchange's own ended when it gave its attempt up)."""
        if self.client is not None:
            self.hedge_end(self.client, "hedge_lost")
        self.client = span

    def attempt_end(self, ex: Exchange | H2Exchange, reason: str) -> None:
        """The attempt failed (`reason`, a local-reply reason) and another may follow;
        "" when it ends for the request's end."""
        span = self.client
        if span is None:
            return
        self.client = None
        if reason:
            span.set_attribute("tether.reason", reason)
            span.set_attribute("error.type", reason)
            span.set_status(Status(StatusCode.ERROR, reason))
        span.end()

    def end(self, ex: Exchange | H2Exchange, now: float) -> None:
        """The exchange ended: the last attempt's span, then the server span (their
        attributes set at once: each `set_attribute` takes the span's lock)."""
        outcome = ex.outcome
        status = outcome.status
        reason = outcome.reason
        route = ex.route
        server = self.server
        span = self.client
        if span is not None:
            self.client = None
            if isinstance(outcome, outcomes.Completed):
                span.set_attribute("http.response.status_code", status)
                st = _status(status)
                if st is not None:
                    span.set_status(st)
            elif reason:
                span.set_attributes({"tether.reason": reason, "error.type": reason})
                span.set_status(Status(StatusCode.ERROR, reason))
            span.end()
        attrs: dict[str, Any] = {"tether.outcome": outcome.kind}
        if status:
            attrs["http.response.status_code"] = status
        if self.attempts:
            attrs["tether.attempts"] = self.attempts
        if reason:
            attrs["tether.reason"] = attrs["error.type"] = reason
        ds = route.dstats if route is not None else None
        if ds is not None:
            if self.lt.listener != "inbound":
                service, subset = split_destination(ds.name)
                name, _, ns = service.partition(".")
                attrs["tether.destination.service"] = name
                if ns:
                    attrs["tether.destination.namespace"] = ns
                if subset:
                    attrs["tether.destination.subset"] = subset
            if ds.route:
                attrs["tether.route"] = ds.route
        server.set_attributes(attrs)
        st = _status(status)
        if st is not None:
            server.set_status(st)
        server.end()
