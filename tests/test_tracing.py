"""Tracing: trace context parsing and sampling (pure), spans per exchange and per attempt
(the sans-IO exchange with the SDK's in-memory exporter), and over real processes: one
trace from app A through both sidecars to app B, a retry's two client spans, sampling
and B3 conversion, all exported over OTLP/HTTP to a collector stand-in."""

from __future__ import annotations

import http.client
import json
import os
import random
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from prometheus_client.parser import text_string_to_metric_families

from proxy import local_reply
from proxy.exchange import ENDED, Exchange
from proxy.trace_context import (
    DEFAULT_SAMPLING,
    Parent,
    SamplingSpec,
    UnsampledIds,
    check_env,
    decide,
    find_parent,
    parse_b3_single,
    parse_fields,
    parse_traceparent,
    sampling_from_env,
)
from proxy.tracing import Tracing
from tests.conftest import ControlPlaneProcess, RegistryProcess, run_tether
from tests.fakes import parse_request
from tests.otlp_collector import Collector, Span
from tests.sidecar_harness import ROOT, ProcessSet, poll
from tests.test_access_log import read_log
from tests.test_exchange import World

TP = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"

# -- trace context (pure) ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        (TP, True),
        (TP[:-2] + b"00", True),
        (b"  " + TP + b" ", True),  # OWS around a field value is not part of it
        (TP.upper(), False),  # hex is lower case
        (b"ff" + TP[2:], False),  # version ff is invalid
        (TP + b"-extra", False),  # version 00 has exactly four parts
        (b"01" + TP[2:] + b"-what-comes-later", True),  # later versions may add fields
        (b"01" + TP[2:] + b"x", False),
        (b"00-" + b"0" * 32 + TP[35:], False),  # all-zero trace id
        (TP[:36] + b"0" * 16 + TP[52:], False),  # all-zero parent id
        (TP[:-3], False),
        (TP.replace(b"-", b"_"), False),
        (b"00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01", False),
    ],
)
def test_traceparent_parsing_follows_w3c(value: bytes, ok: bool) -> None:
    parent = parse_traceparent(value)
    assert (parent is not None) == ok
    if parent is not None:
        assert parent.trace_id == TRACE.encode() and parent.span_id == b"00f067aa0ba902b7"


def test_sampled_flag_is_the_low_bit() -> None:
    for flags, sampled in ((b"01", True), (b"00", False), (b"03", True), (b"02", False)):
        parent = parse_traceparent(TP[:-2] + flags)
        assert parent is not None and parent.sampled is sampled


def test_b3_single_and_multi_convert() -> None:
    p = parse_b3_single(b"80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1-05e3ac9a4f6e3b90")
    assert p == Parent(b"80f198ee56343ba864fe8b2a57d3eff7", b"e457b5a2e4d86bd1", True, None, True)
    # A 64-bit trace id is left-padded; `d` (debug) samples; no state defers to us.
    p = parse_b3_single(b"64fe8b2a57d3eff7-e457b5a2e4d86bd1-d")
    assert p is not None and p.trace_id == b"0" * 16 + b"64fe8b2a57d3eff7" and p.sampled
    p = parse_b3_single(b"64fe8b2a57d3eff7-e457b5a2e4d86bd1")
    assert p is not None and p.sampled is None
    assert parse_b3_single(b"64fe8b2a57d3eff7-e457b5a2e4d86bd1-x") is None
    assert parse_b3_single(b"1") is None
    multi = [
        (b"X-B3-TraceId", b"64fe8b2a57d3eff7"),
        (b"X-B3-SpanId", b"e457b5a2e4d86bd1"),
        (b"X-B3-Sampled", b"0"),
    ]
    parent, present = parse_fields([(b"Host", b"b"), *multi])
    assert present and parent is not None and parent.sampled is False and parent.b3
    parent, _ = parse_fields([*multi[:2], (b"X-B3-Flags", b"1")])
    assert parent is not None and parent.sampled is True
    # `b3: 0` without ids still carries the caller's decision not to sample.
    parent, _ = parse_fields([(b"b3", b"0")])
    assert parent is not None and parent.sampled is False and not parent.trace_id
    # traceparent wins over B3; tracestate fields join in order.
    parent, _ = parse_fields(
        [(b"b3", b"0"), (b"Traceparent", TP), (b"tracestate", b"a=1"), (b"TraceState", b"b=2")]
    )
    assert parent is not None and parent.sampled and parent.tracestate == b"a=1,b=2"
    assert parse_fields([(b"Host", b"b"), (b"X-Request-Id", b"r")]) == (None, False)
    # An invalid traceparent is ignored (no parent), but it is still a trace field.
    assert parse_fields([(b"traceparent", b"garbage")]) == (None, True)


def test_the_codec_notes_trace_fields() -> None:
    head = parse_request(
        b"GET / HTTP/1.1\r\nHost: svc\r\nTraceParent: " + TP + b"\r\ntraceparent: x\r\n\r\n"
    )
    assert head.traceparent == TP and not head.b3  # the first one
    assert [n for n, _ in head.headers] == [b"Host", b"TraceParent", b"traceparent"]
    head = parse_request(b"GET / HTTP/1.1\r\nHost: svc\r\nX-B3-Sampled: 1\r\n\r\n")
    assert head.b3 and head.traceparent is None
    assert find_parent(head) == (None, True)  # a sampling state without ids: a new trace
    plain = parse_request(b"GET / HTTP/1.1\r\nHost: svc\r\nCookie: b3=1\r\n\r\n")
    assert not plain.b3 and plain.traceparent is None and find_parent(plain) == (None, False)


def test_a_cached_head_is_read_in_place() -> None:
    """A head that kept its field lines as bytes (the head cache's) is searched as bytes:
    its traceparent is read without making the field list, B3 makes it."""
    from proxy.heads import RequestHead

    def head(lines: bytes) -> RequestHead:
        return RequestHead(raw=b"Host: svc\r\n" + lines, method=b"GET", target=b"/", host=b"svc")

    h = head(b"TraceParent: " + TP[:-2] + b"00\r\nCookie: b3=1\r\n")
    parent, present = find_parent(h)
    assert present and parent is not None and parent.trace_id == TRACE.encode()
    assert parent.sampled is False and h.raw is not None  # the fast serialisation stays
    assert find_parent(head(b"Cookie: id=ab3f\r\n")) == (None, False)
    assert find_parent(head(b"tracestate: k=v\r\n")) == (None, True)
    h = head(b"X-B3-TraceId: " + TRACE.encode() + b"\r\nX-B3-SpanId: " + b"1" * 16 + b"\r\n")
    parent, _ = find_parent(h)
    assert parent is not None and parent.b3 and parent.sampled is None and h.raw is None


def test_sampling_environment_wins_over_mesh_config() -> None:
    assert sampling_from_env({}, None) == DEFAULT_SAMPLING
    assert sampling_from_env({}, 0.25) == SamplingSpec(0.25, True)
    env = {"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.01"}
    assert sampling_from_env(env, 0.5) == SamplingSpec(0.01, True)
    assert sampling_from_env({"OTEL_TRACES_SAMPLER": "always_off"}, 1.0) == SamplingSpec(0.0, False)
    assert sampling_from_env({"OTEL_TRACES_SAMPLER": "traceidratio"}, None).ratio == 1.0
    with pytest.raises(ValueError, match="OTEL_TRACES_SAMPLER='jaeger_remote'"):
        sampling_from_env({"OTEL_TRACES_SAMPLER": "jaeger_remote"}, None)
    with pytest.raises(ValueError, match="OTEL_TRACES_SAMPLER_ARG='2'"):
        sampling_from_env({**env, "OTEL_TRACES_SAMPLER_ARG": "2"}, None)
    with pytest.raises(ValueError, match="only otlp"):
        check_env({"OTEL_TRACES_EXPORTER": "zipkin"})
    with pytest.raises(ValueError, match="only http/protobuf"):
        check_env({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"})
    check_env({"OTEL_TRACES_EXPORTER": "none", "OTEL_TRACES_SAMPLER": "nonsense"})  # off


def test_decision_is_parent_based_then_ratio() -> None:
    ratio = SamplingSpec(0.01, True)
    yes, no = Parent(b"t", b"s", True), Parent(b"t", b"s", False)
    deferred = Parent(b"t", b"s", None)
    assert decide(ratio, yes, 0.99) and not decide(ratio, no, 0.0)
    assert decide(ratio, None, 0.005) and not decide(ratio, None, 0.01)
    assert decide(ratio, deferred, 0.001) and not decide(ratio, deferred, 0.5)
    plain = SamplingSpec(0.01, False)  # not parent-based: the ratio decides alone
    assert not decide(plain, yes, 0.5) and decide(plain, no, 0.001)


# -- the exchange's spans (sans-IO, the SDK's in-memory exporter) -----------------------


def traced_world(request: bytes, sampling: SamplingSpec, draw: float = 0.5) -> tuple[World, Any]:
    """test_exchange's World with tracing on (the SDK's in-memory exporter)."""
    exporter = InMemorySpanExporter()
    tracing = Tracing(exporter, sampling, service="a", namespace="default", zone="z1")
    tracing.rng = _FixedDraw(draw)
    w = World(request)
    w.server.tracer = tracing.for_listener("outbound")
    w.ex = Exchange(w.down, parse_request(request))
    return w, tracing


class _FixedDraw(random.Random):
    def __init__(self, draw: float) -> None:
        super().__init__(7)
        self.draw = draw

    def random(self) -> float:
        return self.draw


def _exported(tracing: Tracing) -> list[Any]:
    tracing.provider.force_flush()
    exporter = tracing.processor.span_exporter
    assert isinstance(exporter, InMemorySpanExporter)
    return list(exporter.get_finished_spans())


def _answer(w: World) -> None:
    w.upstream.codec.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    assert w.ex.state == ENDED


def test_a_retry_is_two_client_spans_under_one_server_span() -> None:
    get = (
        b"GET /items?id=7 HTTP/1.1\r\nHost: svc\r\ntraceparent: " + TP
        + b"\r\ntracestate: vendor=1\r\n\r\n"
    )  # fmt: skip
    w, tracing = traced_world(get, SamplingSpec(0.0, True))
    pool = w.pool(idle=2)
    for up in pool.idle:
        up.requests = 1  # reused keep-alive connections
    w.route(pool)
    w.ex.on_request_end(None)
    first = w.down.ubuf[0]
    w.ex.on_upstream_lost(w.upstream, local_reply.UPSTREAM_RESET, "closed")
    assert w.ex.retried and w.ex.attempts == 2
    second = w.down.ubuf[0]
    _answer(w)
    got = sorted(_exported(tracing), key=lambda s: s.start_time or 0)
    server = [s for s in got if s.kind == SpanKind.SERVER]
    clients = [s for s in got if s.kind == SpanKind.CLIENT]
    assert len(server) == 1 and len(clients) == 2
    (srv,) = server
    assert srv.context.trace_id == int(TRACE, 16)
    assert srv.parent is not None and srv.parent.span_id == 0x00F067AA0BA902B7
    for n, span in enumerate(clients, 1):
        assert span.parent is not None and span.parent.span_id == srv.context.span_id
        assert span.attributes is not None and span.attributes["tether.attempt"] == n
    a1, a2 = (c.attributes or {} for c in clients)
    assert a1["tether.reason"] == "upstream_reset" and "http.request.resend_count" not in a1
    assert a2["http.request.resend_count"] == 1 and a2["http.response.status_code"] == 200
    assert a2["tether.endpoint"] == "127.0.0.1:20001"
    attrs = srv.attributes or {}
    assert attrs["tether.attempts"] == 2 and attrs["url.path"] == "/items"
    assert attrs["tether.zone"] == "z1" and attrs["tether.destination.service"] == "svc"
    assert attrs["http.response.status_code"] == 200
    # Each attempt carried its own span's context; the caller's traceparent is gone.
    for data, span in ((first, clients[0]), (second, clients[1])):
        tp = b"00-%032x-%016x-01" % (span.context.trace_id, span.context.span_id)
        assert data.count(b"traceparent") == 1 and b"traceparent: " + tp + b"\r\n" in data
    assert w.ex.request_bytes.count(b"traceparent") == 0
    assert b"tracestate: vendor=1\r\n" in first  # kept as it came
    assert srv.parent.trace_state.get("vendor") == "1"


def _hedged_world(request: bytes) -> tuple[Any, Tracing]:
    """test_exchange_hedging's world (two endpoints, hedge after 50 ms) with tracing on."""
    from proxy.hedging import HedgeSpec, Hedging
    from proxy.retry import RetrySpec
    from tests.test_exchange_retry import RetryWorld

    w = RetryWorld(request, RetrySpec(on=8, attempts=3))
    assert w.res is not None
    w.res.hedging = Hedging(HedgeSpec(0.05), "svc.default")
    tracing = Tracing(
        InMemorySpanExporter(), SamplingSpec(1.0, True), service="a", namespace="default"
    )
    w.server.tracer = tracing.for_listener("outbound")
    w.ex = Exchange(w.down, parse_request(request))  # type: ignore[arg-type]
    w.ex.on_routed(w.routes[0])
    w.ex.on_request_end(None)
    w.down.flush()
    w.server.fire()  # the hedge's delay: sent to the other endpoint
    return w, tracing


OK5 = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"


@pytest.mark.parametrize("winner", ["hedge", "first"])
def test_a_hedge_is_its_own_client_span_whichever_head_wins(winner: str) -> None:
    get = b"GET /items HTTP/1.1\r\nHost: svc\r\ntraceparent: " + TP + b"\r\n\r\n"
    w, tracing = _hedged_world(get)
    first, hedge = w.ex.upstream, w.ex.hedge
    assert first is not None and hedge is not None and hedge.up is not None
    hedge_up = hedge.up
    (hedge_up if winner == "hedge" else first).data_received(OK5)
    assert w.ex.state == ENDED
    got = sorted(_exported(tracing), key=lambda s: s.start_time or 0)
    (srv,) = [s for s in got if s.kind == SpanKind.SERVER]
    own, hedged = [s for s in got if s.kind == SpanKind.CLIENT]
    for span in (own, hedged):
        assert span.parent is not None and span.parent.span_id == srv.context.span_id
    a_own, a_hedge = own.attributes or {}, hedged.attributes or {}
    assert a_own["tether.attempt"] == 1 and "tether.hedge" not in a_own
    assert a_hedge["tether.attempt"] == 2 and a_hedge["tether.hedge"] is True
    assert a_own["tether.endpoint"] == "127.0.0.1:20001"
    assert a_hedge["tether.endpoint"] == "127.0.0.1:20002"
    won, lost = (a_hedge, a_own) if winner == "hedge" else (a_own, a_hedge)
    assert won["http.response.status_code"] == 200 and "tether.reason" not in won
    assert lost["tether.reason"] == "hedge_lost"
    assert (srv.attributes or {})["tether.attempts"] == 2
    # The hedge's head carried its own span's context, once.
    tp = b"00-%032x-%016x-01" % (hedged.context.trace_id, hedged.context.span_id)
    sent = hedge_up.transport.data
    assert sent.count(b"traceparent") == 1 and b"traceparent: " + tp + b"\r\n" in sent


def test_unsampled_root_ids_count_up_past_each_block_of_256() -> None:
    ids = UnsampledIds(random.Random(7))
    lines = [ids.line() for _ in range(600)]
    parents = [parse_traceparent(line[len(b"traceparent: ") : -2]) for line in lines]
    assert all(p is not None and p.sampled is False for p in parents)
    trace_ids = [int(p.trace_id[16:], 16) for p in parents if p is not None]
    assert trace_ids == list(range(1, 601))  # the counter, across the table's wrap
    assert len({p.trace_id[:16] for p in parents if p is not None}) == 1


def test_unsampled_requests_make_no_spans_and_pass_the_decision_on() -> None:
    # No parent, the draw above the ratio: a traceparent with flag 00 goes upstream.
    w, tracing = traced_world(b"GET / HTTP/1.1\r\nHost: svc\r\n\r\n", SamplingSpec(0.01), 0.5)
    w.route(w.pool(idle=1))
    w.ex.on_request_end(None)
    head = w.down.ubuf[0]
    assert head.count(b"traceparent: 00-") == 1 and b"-00\r\n" in head
    _answer(w)
    # A caller's unsampled context goes on unchanged (no per-request object at all).
    unsampled = TP[:-2] + b"00"
    w2, tracing2 = traced_world(
        b"GET / HTTP/1.1\r\nHost: svc\r\ntraceparent: " + unsampled + b"\r\n\r\n",
        SamplingSpec(1.0),
    )
    assert w2.ex.trace is None
    w2.route(w2.pool(idle=1))
    w2.ex.on_request_end(None)
    assert b"traceparent: " + unsampled + b"\r\n" in w2.down.ubuf[0]
    _answer(w2)
    # Below the ratio a new trace starts here.
    w3, tracing3 = traced_world(b"GET / HTTP/1.1\r\nHost: svc\r\n\r\n", SamplingSpec(0.01), 0.001)
    w3.route(w3.pool(idle=1))
    w3.ex.on_request_end(None)
    _answer(w3)
    for t in (tracing, tracing2):
        assert _exported(t) == [] and t.sampled == 0
    spans = _exported(tracing3)
    assert sorted(s.kind.name for s in spans) == ["CLIENT", "SERVER"]
    (root,) = [s for s in spans if s.kind == SpanKind.SERVER]
    assert root.parent is None


def test_the_sdk_is_not_imported_without_tracing() -> None:
    """The modules a sidecar without tracing loads, with the access log on too."""
    code = (
        "import sys, proxy.sidecar, proxy.listener, proxy.policy_router, proxy.exchange,"
        " proxy.access_log, proxy.admin\n"
        "from proxy.sidecar import Sidecar, SidecarSpec\n"
        "sc = Sidecar(SidecarSpec(service='a', app_port=1))\n"
        "print(sorted(m for m in sys.modules if m.startswith('opentelemetry')))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


# -- over real processes --------------------------------------------------------------

pytestmark_e2e = pytest.mark.timeout(120)


@pytest.fixture
def collector() -> Iterator[Collector]:
    c = Collector()
    yield c
    c.close()


class TracedApp:
    """App B: an HTTP server that continues the caller's trace in an in-memory SDK."""

    def __init__(self, provider: TracerProvider) -> None:
        tracer = provider.get_tracer("app-b")
        self.seen: list[dict[str, str]] = []
        app = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                headers = {k.lower(): v for k, v in self.headers.items()}
                if self.path != "/health":
                    app.seen.append(headers)
                ctx = TraceContextTextMapPropagator().extract(headers)
                with tracer.start_as_current_span("app-b", context=ctx, kind=SpanKind.SERVER):
                    body = json.dumps({"name": "b", "headers": headers}).encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = int(self.server.server_address[1])
        self.name = "b"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def in_memory() -> tuple[TracerProvider, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider, exporter


def call(port: int, url: str, headers: dict[str, str]) -> tuple[int, dict[str, Any]]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", url, headers=headers)
        resp = conn.getresponse()
        body = resp.read()
        return resp.status, json.loads(body) if body.startswith(b"{") else {}
    finally:
        conn.close()


def at_least(collector: Collector, trace_id: str, n: int) -> list[Span] | None:
    spans = collector.trace(trace_id)
    return spans if len(spans) >= n else None


def by_kind(spans: list[Span], service: str, kind: str) -> list[Span]:
    return [s for s in spans if s.resource.get("service.name") == service and s.kind == kind]


@pytestmark_e2e
def test_one_trace_from_app_a_through_both_sidecars_to_app_b(
    registry_process: Callable[..., RegistryProcess], tmp_path: Path, collector: Collector
) -> None:
    reg = registry_process()
    provider, memory = in_memory()
    app_b = TracedApp(provider)
    procs = ProcessSet(tmp_path, reg.port)
    procs.closers.append(app_b.close)
    try:
        sb = procs.sidecar("b", app_b, "--zone", "z-b", env=collector.env())  # type: ignore[arg-type]
        sa = procs.sidecar("a", procs.app("a"), env=collector.env())
        # App A: a client span of its own, its context sent as traceparent.
        tracer = provider.get_tracer("app-a")
        with tracer.start_as_current_span("app-a", kind=SpanKind.CLIENT) as span_a:
            headers: dict[str, str] = {}
            TraceContextTextMapPropagator().inject(headers)
            status, body = call(sa.ports["outbound"], "http://b/who?x=1", headers)
        assert status == 200, body
        trace_id = f"{span_a.get_span_context().trace_id:032x}"
        spans = poll(
            lambda: at_least(collector, trace_id, 4),
            20,
            "the sidecars' four spans at the collector",
        )
        assert len(spans) == 4
        (a_srv,) = by_kind(spans, "a", "server")
        (a_cli,) = by_kind(spans, "a", "client")
        (b_srv,) = by_kind(spans, "b", "server")
        (b_cli,) = by_kind(spans, "b", "client")
        (app_b_span,) = [
            s
            for s in memory.get_finished_spans()
            if s.name == "app-b" and s.context.trace_id == int(trace_id, 16)
        ]
        # The chain: app A -> sidecar A (server, client) -> sidecar B (server, client) -> app B.
        assert a_srv.parent_id == f"{span_a.get_span_context().span_id:016x}"
        assert a_cli.parent_id == a_srv.span_id
        assert b_srv.parent_id == a_cli.span_id
        assert b_cli.parent_id == b_srv.span_id
        assert app_b_span.parent is not None
        assert f"{app_b_span.parent.span_id:016x}" == b_cli.span_id
        assert f"{app_b_span.context.trace_id:032x}" == trace_id
        # The app got exactly one traceparent: sidecar B's client span's.
        assert app_b.seen[-1]["traceparent"] == f"00-{trace_id}-{b_cli.span_id}-01"
        # Semantic-convention and mesh attributes.
        assert a_srv.attributes["http.request.method"] == "GET"
        assert a_srv.attributes["url.path"] == "/who"  # the query is not recorded
        assert a_srv.attributes["http.response.status_code"] == 200
        assert a_srv.attributes["tether.source.service"] == "a"
        assert a_srv.attributes["tether.destination.service"] == "b"
        assert a_srv.attributes["tether.destination.namespace"] == "default"
        assert a_srv.attributes["tether.outcome"] == "Completed"
        assert a_cli.attributes["tether.attempt"] == 1
        assert a_cli.attributes["server.port"] == sb.ports["inbound"]
        assert b_srv.attributes["tether.listener"] == "inbound"
        assert b_srv.attributes["tether.zone"] == "z-b"
        assert b_cli.attributes["server.port"] == app_b.port
        assert a_srv.resource["service.name"] == "a" and b_srv.resource["service.name"] == "b"
        assert {s.scope for s in spans} == {"tether.sidecar"}
        assert all(s.start_ns <= s.end_ns for s in spans)
        assert a_srv.start_ns <= a_cli.start_ns and a_cli.end_ns <= a_srv.end_ns
        assert collector.content_types == {"application/x-protobuf"}
    finally:
        procs.close()


class FlakyApp:
    """Answers the first request of each connection and keeps it open; a second request
    on the same connection is met with a close, as a server whose idle timeout raced
    the request would (the stale pooled connection the exchange sends again once)."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.name = "flaky"
        self.served = 0
        self.dropped = 0
        self.seen: list[bytes] = []
        self._conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self._conns.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        buf = b""
        answered = 0
        with conn:
            while True:
                try:
                    data = conn.recv(65536)
                except OSError:
                    return
                if not data:
                    return
                buf += data
                while b"\r\n\r\n" in buf:
                    head, buf = buf.split(b"\r\n\r\n", 1)
                    if answered and not head.startswith(b"GET /health"):
                        self.dropped += 1
                        return  # closes the connection without an answer
                    answered += 1
                    if not head.startswith(b"GET /health"):
                        self.served += 1
                        self.seen.append(head)
                    try:
                        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                    except OSError:
                        return  # the sidecar gave up on this connection first

    def close(self) -> None:
        self.sock.close()
        for c in self._conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


@pytestmark_e2e
def test_a_retry_over_real_processes_shows_two_client_spans(
    registry_process: Callable[..., RegistryProcess], tmp_path: Path, collector: Collector
) -> None:
    reg = registry_process()
    app = FlakyApp()
    procs = ProcessSet(tmp_path, reg.port)
    procs.closers.append(app.close)
    try:
        # Health checks (/health) are always answered: only requests the sidecar sends
        # again on a kept-alive connection are dropped.
        sb = procs.sidecar("b", app, env=collector.env())  # type: ignore[arg-type]
        sa = procs.sidecar("a", procs.app("a"))  # no tracing: the context passes through
        traces = []
        for i in range(2):
            trace_id = f"{i + 1:032x}"
            tp = f"00-{trace_id}-00f067aa0ba902b7-01"
            status, _ = call(sa.ports["outbound"], "http://b/item", {"traceparent": tp})
            assert status == 200
            traces.append(trace_id)
        assert app.dropped >= 1, "the stale connection was not provoked"
        spans = poll(
            lambda: at_least(collector, traces[1], 3),
            20,
            "the retried request's spans",
        )
        (srv,) = by_kind(spans, "b", "server")
        clients = sorted(by_kind(spans, "b", "client"), key=lambda s: s.start_ns)
        assert len(clients) == 2
        assert all(c.parent_id == srv.parent_id or c.parent_id == srv.span_id for c in clients)
        assert {c.parent_id for c in clients} == {srv.span_id}
        assert srv.parent_id == "00f067aa0ba902b7"
        assert [c.attributes["tether.attempt"] for c in clients] == [1, 2]
        assert clients[0].attributes["tether.reason"] == "upstream_reset"
        assert clients[0].status == 2
        assert clients[1].attributes["http.response.status_code"] == 200
        assert clients[1].attributes["http.request.resend_count"] == 1
        assert srv.attributes["tether.attempts"] == 2
        # The app saw the second attempt with that attempt's own span as parent.
        last = app.seen[-1].decode("latin-1").lower()
        assert f"traceparent: 00-{traces[1]}-{clients[1].span_id}-01" in last
        assert sb.proc.poll() is None
    finally:
        procs.close()


@pytestmark_e2e
def test_sampling_and_b3_over_otlp(
    registry_process: Callable[..., RegistryProcess], tmp_path: Path, collector: Collector
) -> None:
    reg = registry_process()
    procs = ProcessSet(tmp_path, reg.port)
    try:
        # Ratio 0 for new traces: only a caller's sampled decision records anything.
        env = dict(
            collector.env(),
            OTEL_TRACES_SAMPLER="parentbased_traceidratio",
            OTEL_TRACES_SAMPLER_ARG="0",
        )
        b_app = procs.app("b")
        procs.sidecar("b", b_app, env=env)
        sa = procs.sidecar("a", procs.app("a"), env=env)
        port = sa.ports["outbound"]

        # No parent: not sampled at A; B follows A's decision (flag 00), nothing recorded.
        _, body = call(port, "http://b/who", {})
        root = body["headers"]["traceparent"]
        assert root.startswith("00-") and root.endswith("-00")
        # A caller's unsampled context reaches the app unchanged.
        unsampled = f"00-{'a' * 32}-{'b' * 16}-00"
        _, body = call(port, "http://b/who", {"traceparent": unsampled, "tracestate": "k=v"})
        assert body["headers"]["traceparent"] == unsampled
        assert body["headers"]["tracestate"] == "k=v"
        # B3 multi, sampled: converted; the app gets traceparent and b3 for its id.
        b3 = {"X-B3-TraceId": "c" * 32, "X-B3-SpanId": "d" * 16, "X-B3-Sampled": "1"}
        _, body = call(port, "http://b/who", b3)
        got = body["headers"]
        assert not any(k.startswith("x-b3-") for k in got), got
        spans = poll(
            lambda: at_least(collector, "c" * 32, 4),
            20,
            "the B3 request's spans",
        )
        (b_cli,) = by_kind(spans, "b", "client")
        (a_srv,) = by_kind(spans, "a", "server")
        assert a_srv.parent_id == "d" * 16
        assert got["traceparent"] == f"00-{'c' * 32}-{b_cli.span_id}-01"
        assert got["b3"] == f"{'c' * 32}-{b_cli.span_id}-1"
        # B3 single with a 64-bit trace id.
        _, body = call(port, "http://b/who", {"b3": f"{'e' * 16}-{'f' * 16}-1"})
        assert body["headers"]["traceparent"].startswith(f"00-{'0' * 16}{'e' * 16}-")
        # A local reply is a server span with its reason, and no client span.
        call(port, "http://nosuchservice/", {"traceparent": f"00-{'9' * 32}-{'8' * 16}-01"})
        (reply,) = poll(lambda: collector.trace("9" * 32), 20, "the local reply's span")
        assert reply.kind == "server" and reply.attributes["tether.reason"]
        assert reply.attributes["http.response.status_code"] >= 400
        # Nothing from the unsampled requests reached the collector.
        assert collector.trace(root[3:35]) == [] and collector.trace("a" * 32) == []
    finally:
        procs.close()


ROUTE_AND_MESH = """
apiVersion: tether.dev/v1alpha1
kind: Route
metadata: {name: b, namespace: default}
spec:
  rules:
    - match: {path: {prefix: /api}}
      destination: {}
---
apiVersion: tether.dev/v1alpha1
kind: MeshConfig
metadata: {name: mesh}
spec:
  tracing: {samplingRatio: RATIO}
"""


@pytestmark_e2e
def test_route_label_and_mesh_config_sampling(
    registry_process: Callable[..., RegistryProcess], tmp_path: Path, collector: Collector
) -> None:
    """With a control plane: a Route rule names the requests it sent (metric label, span
    attribute, access-log field), and MeshConfig's samplingRatio decides for new traces
    when the environment chose no sampler."""
    reg = registry_process()
    env = dict(os.environ, CONSUL_HTTP_ADDR=f"127.0.0.1:{reg.port}")
    cp = ControlPlaneProcess(reg.port, tmp_path / "cp.log")
    procs = ProcessSet(tmp_path, reg.port)
    log = tmp_path / "a.log"
    try:
        cp.start()
        procs.sidecar("b", procs.app("b"), env=collector.env())
        sa = procs.sidecar(
            "a", procs.app("a"), "--controlplane", cp.url, "--access-log", str(log),
            env=collector.env(),
        )  # fmt: skip

        def apply(ratio: str) -> None:
            policy = tmp_path / "policy.yaml"
            policy.write_text(ROUTE_AND_MESH.replace("RATIO", ratio))
            done = run_tether("apply", "-f", str(policy), "--controlplane", cp.url, env=env)
            assert done.returncode == 0, done.stderr

            def applied() -> bool:
                resources = sa.admin("/config_dump")[1]["policy"]["resources"]
                kinds = {r["kind"]: r for r in resources}
                mesh = kinds.get("MeshConfig", {}).get("spec", {})
                return "Route" in kinds and mesh.get("tracing") == {"samplingRatio": float(ratio)}

            poll(applied, 15, "the sidecar runs the Route and the MeshConfig")

        assert sa.call("http://b/warm")[0] == 200  # a calls b: b's Route is pushed to it
        apply("0")
        _, _, raw = sa.call("http://b/api/items?id=1")
        tp = json.loads(raw)["headers"]["traceparent"]
        assert tp.endswith("-00")  # ratio 0: not sampled, the decision passed on
        assert sa.call("http://b/other")[0] == 200
        apply("1")
        _, _, raw = sa.call("http://b/api/items?id=2")
        sampled = json.loads(raw)["headers"]["traceparent"]
        assert sampled.endswith("-01")
        spans = poll(lambda: at_least(collector, sampled[3:35], 4), 20, "the sampled trace")
        (a_srv,) = by_kind(spans, "a", "server")
        assert a_srv.attributes["tether.route"] == "b.default#0"
        assert collector.trace(tp[3:35]) == []

        _, text = sa.admin("/stats/prometheus")
        requests = {
            (s.labels.get("route", ""), s.labels["status_class"]): s.value
            for f in text_string_to_metric_families(text)
            if f.name == "tether_requests"
            for s in f.samples
            if s.labels["destination"] == "b.default"
        }
        assert requests == {("b.default#0", "2xx"): 2, ("", "2xx"): 2}
        lines = poll(lambda: read_log(log, 4), 15, "a's access log")
        assert [line["route"] for line in lines] == [None, "b.default#0", None, "b.default#0"]
        assert lines[3]["trace_id"] == sampled[3:35] and lines[1]["trace_id"] == tp[3:35]
    finally:
        procs.close()
        cp.stop()
