"""HTTP/2 streams are traced and access-logged as HTTP/1 requests are.

Real listeners on 127.0.0.1 (outbound → inbound → an h2c app, tests/h2_peers.py), each
with its own `Tracing` on the SDK's in-memory exporter and its own access log file: a
stream continues its caller's `traceparent` (or B3), each hop's server span is the
child of the hop before's client span, every attempt has its client span and sends its
context upstream, and `end` writes one access-log line per stream.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from proxy.access_log import AccessLog
from proxy.balance import Endpoint
from proxy.cluster import Cluster, StaticDirectory
from proxy.listener import Listener, start_inbound, start_outbound
from proxy.stats import ProxyStats
from proxy.trace_context import SamplingSpec
from proxy.tracing import Tracing
from tests.h2_peers import H2App, H2Client
from tests.test_h2_resilience import GrpcApp, Mesh, _mesh
from tests.test_h2_resilience import closing as closing  # the fixture

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"


def tracing(service: str, ratio: float = 1.0) -> Tracing:
    return Tracing(
        InMemorySpanExporter(), SamplingSpec(ratio, True), service=service, namespace="default"
    )


def spans(t: Tracing) -> list[Any]:
    t.provider.force_flush()
    exporter = t.processor.span_exporter
    assert isinstance(exporter, InMemorySpanExporter)
    return list(exporter.get_finished_spans())


def of_kind(found: list[Any], kind: SpanKind) -> list[Any]:
    return [s for s in found if s.kind == kind]


def hexid(n: int, width: int) -> str:
    return f"{n:0{width}x}"


@dataclass
class Hops:
    app: H2App
    inbound: Listener
    outbound: Listener
    traces: tuple[Tracing, Tracing]  # outbound's ("a"), inbound's ("b")
    logs: tuple[AccessLog, AccessLog]
    paths: tuple[Path, Path]


@pytest.fixture
async def hops(tmp_path: Path) -> AsyncIterator[Hops]:
    app = await H2App("app-0").start()
    inbound = await start_inbound(app.port, stats=ProxyStats(), port=0, app_protocol="http2")
    orders = Cluster("orders", "default")
    orders.set_endpoints([Endpoint("orders-0", "127.0.0.1", inbound.port)])
    outbound = await start_outbound(
        StaticDirectory([orders]), stats=ProxyStats(), port=0, egress="deny"
    )
    traces = (tracing("a"), tracing("b"))
    paths = (tmp_path / "out.log", tmp_path / "in.log")
    logs = (AccessLog(str(paths[0]), source="a.default"), AccessLog(str(paths[1])))
    for listener, name, t, log in zip(
        (outbound, inbound), ("outbound", "inbound"), traces, logs, strict=True
    ):
        listener.proxy.tracer = t.for_listener(name)
        listener.proxy.access_log = log.for_listener(name)
        log.start()
    yield Hops(app, inbound, outbound, traces, logs, paths)
    await outbound.aclose()
    await inbound.aclose()
    await app.aclose()
    for log in logs:
        await log.aclose()
    for t in traces:
        t.shutdown()


def lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


async def test_a_stream_continues_its_callers_trace_across_both_hops(hops: Hops) -> None:
    client = await H2Client().connect(hops.outbound.port)
    try:
        incoming = [(b"traceparent", f"00-{TRACE}-{PARENT}-01".encode())]
        r = await client.request(
            "/echo?x=1", "orders", method="POST", body=b"hello", headers=incoming
        )
        assert r.status == 200 and bytes(r.body) == b"hello"
    finally:
        await client.aclose()
    a, b = spans(hops.traces[0]), spans(hops.traces[1])
    (a_server,) = of_kind(a, SpanKind.SERVER)
    (a_client,) = of_kind(a, SpanKind.CLIENT)
    (b_server,) = of_kind(b, SpanKind.SERVER)
    (b_client,) = of_kind(b, SpanKind.CLIENT)
    for span in (a_server, a_client, b_server, b_client):
        assert hexid(span.context.trace_id, 32) == TRACE
    # The caller's span → a's server span → its client span → b's server span → its client.
    assert hexid(a_server.parent.span_id, 16) == PARENT
    assert a_client.parent.span_id == a_server.context.span_id
    assert b_server.parent.span_id == a_client.context.span_id
    assert b_client.parent.span_id == b_server.context.span_id
    for server in (a_server, b_server):
        attrs = server.attributes
        assert attrs["network.protocol.version"] == "2"
        assert attrs["http.request.method"] == "POST" and attrs["url.path"] == "/echo"
        assert attrs["http.response.status_code"] == 200
        assert attrs["tether.outcome"] == "Completed" and attrs["tether.attempts"] == 1
    assert a_server.attributes["tether.destination.service"] == "orders"
    assert a_client.attributes["tether.endpoint"] == f"127.0.0.1:{hops.inbound.port}"
    assert b_client.attributes["http.response.status_code"] == 200
    # The app got b's client span as its parent, and only that context (one traceparent).
    (seen,) = hops.app.seen
    tps = [v for n, v in seen if n == b"traceparent"]
    assert tps == [f"00-{TRACE}-{hexid(b_client.context.span_id, 16)}-01".encode()]
    # One access-log line per stream on each hop, with the trace's id.
    for log in hops.logs:
        await log.aclose()
    (out,) = lines(hops.paths[0])
    (inb,) = lines(hops.paths[1])
    for line, listener in ((out, "outbound"), (inb, "inbound")):
        assert line["listener"] == listener and line["protocol"] == "HTTP/2"
        assert line["trace_id"] == TRACE and line["status"] == 200
        assert (line["method"], line["path"], line["authority"]) == ("POST", "/echo", "orders")
        assert line["outcome"] == "Completed" and line["reason"] == ""
        assert line["attempts"] == 1 and line["bytes_in"] == 5 and line["bytes_out"] == 5
    assert out["source"] == "a.default" and out["destination"] == "orders.default"
    assert out["upstream"] == f"127.0.0.1:{hops.inbound.port}"
    assert out["request_id"] == inb["request_id"] and out["request_id"]


async def test_b3_callers_and_unsampled_roots_over_h2(hops: Hops) -> None:
    # a samples no root of its own (ratio 0); b follows the decision a sends on.
    a0 = tracing("a0", ratio=0.0)
    hops.outbound.proxy.tracer = a0.for_listener("outbound")
    client = await H2Client().connect(hops.outbound.port)
    try:
        # A root that is not sampled: no span anywhere, the decision (flags 00) goes on.
        r = await client.request("/who", "orders")
        assert r.status == 200
        # A B3 caller that sampled: continued (B3 in, traceparent and b3 out).
        b3 = [(b"b3", f"{TRACE}-{PARENT}-1".encode())]
        r = await client.request("/who", "orders", headers=b3)
        assert r.status == 200
    finally:
        await client.aclose()
        a0.shutdown()
    unsampled, sampled = hops.app.seen
    (tp,) = [v for n, v in unsampled if n == b"traceparent"]
    assert tp.endswith(b"-00") and len(tp) == 55
    assert spans(hops.traces[1]) and not [
        s for s in spans(hops.traces[1]) if hexid(s.context.trace_id, 32) == tp[3:35].decode()
    ]
    (b_client,) = of_kind(spans(hops.traces[1]), SpanKind.CLIENT)
    assert hexid(b_client.context.trace_id, 32) == TRACE
    sid = hexid(b_client.context.span_id, 16)
    fields = dict(sampled)
    assert fields[b"traceparent"] == f"00-{TRACE}-{sid}-01".encode()
    assert fields[b"b3"] == f"{TRACE}-{sid}-1".encode()
    # Both streams logged on the inbound hop; the unsampled one under its root's id.
    for log in hops.logs:
        await log.aclose()
    ids = [line["trace_id"] for line in lines(hops.paths[1])]
    assert ids == [tp[3:35].decode(), TRACE]


def _call(channel: grpc.Channel, n: int) -> list[Any]:
    call = channel.unary_unary("/t.S/U")
    meta = (("traceparent", f"00-{TRACE}-{PARENT}-01"),)
    out = []
    for _ in range(n):
        try:
            out.append(call(b"x", timeout=10, metadata=meta))
        except grpc.RpcError as e:
            out.append(e.code())
    return out


async def test_each_retried_attempt_of_a_grpc_call_has_its_client_span(
    closing: list[Mesh], tmp_path: Path
) -> None:
    down, up = GrpcApp("down", mode="unavailable"), GrpcApp("up")
    mesh = await _mesh([down, up], {"retries": {"attempts": 3, "retryOn": ["unavailable"]}})
    closing.append(mesh)
    t = tracing("a")
    log = AccessLog(str(tmp_path / "out.log"))
    mesh.outbound.proxy.tracer = t.for_listener("outbound")
    mesh.outbound.proxy.access_log = log.for_listener("outbound")
    log.start()
    try:
        channel = mesh.channel()
        out = await asyncio.to_thread(_call, channel, 4)
        channel.close()
        assert out == [b"up:x"] * 4
        assert down.attempts  # round robin: some calls went to `down` first
        found = spans(t)
    finally:
        await log.aclose()
        t.shutdown()
    servers = of_kind(found, SpanKind.SERVER)
    clients = of_kind(found, SpanKind.CLIENT)
    assert len(servers) == 4 and len(clients) == 4 + len(down.attempts)
    retried = 0
    for server in servers:
        mine = sorted(
            (c for c in clients if c.parent.span_id == server.context.span_id),
            key=lambda c: c.attributes["tether.attempt"],
        )
        assert server.attributes["tether.attempts"] == len(mine)
        assert server.attributes["http.response.status_code"] == 200
        if len(mine) == 2:
            retried += 1
            first, second = mine
            assert first.attributes["tether.endpoint"] == f"127.0.0.1:{mesh.inbounds[0].port}"
            assert first.attributes["error.type"] == "grpc-status 14"  # UNAVAILABLE
            assert second.attributes["http.request.resend_count"] == 1
    assert retried == len(down.attempts)
    attempts = sorted(line["attempts"] for line in lines(tmp_path / "out.log"))
    assert attempts == sorted([1] * (4 - retried) + [2] * retried)
