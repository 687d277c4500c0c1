"""HTTP/2 and gRPC through the mesh: h2c clients, per-stream balancing, flow control,
gRPC local replies, CONNECT from grpcio's http_proxy, and hostile HTTP/2 input.

In-process tests run real listeners (outbound → inbound → app) on 127.0.0.1 with real
HTTP/2 peers (tests/h2_peers.py, on `h2`) and real grpcio servers and clients; the
last test runs two real sidecar processes with the registry.
"""

from __future__ import annotations

import asyncio
import json
import socket
import struct
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from h2.errors import ErrorCodes
from hpack import Encoder

from proxy import grpc as grpc_codes
from proxy.balance import Endpoint
from proxy.cluster import Cluster, StaticDirectory
from proxy.downstream import TimeoutPolicy
from proxy.h2_downstream import PREFACE, ResetBudget
from proxy.h2_link import MAX_HEADER_LIST_SIZE, STREAM_WINDOW
from proxy.listener import Listener, start_inbound, start_outbound
from proxy.pool import PoolPolicy
from proxy.stats import ProxyStats
from tests.conftest import RegistryProcess
from tests.h2_peers import H2App, H2Client
from tests.polling import until
from tests.sidecar_harness import ProcessSet

GRPC = [(b"content-type", b"application/grpc"), (b"te", b"trailers")]


@dataclass
class H2Mesh:
    apps: list[H2App]
    inbounds: list[Listener]
    outbound: Listener
    directory: StaticDirectory


async def _mesh(
    n: int = 3, *, pool_policy: PoolPolicy | None = None, timeouts: TimeoutPolicy | None = None
) -> H2Mesh:
    apps = [await H2App(f"app-{i}").start() for i in range(n)]
    inbounds = [
        await start_inbound(a.port, stats=ProxyStats(), port=0, app_protocol="http2") for a in apps
    ]
    orders = Cluster("orders", "default")
    orders.set_endpoints(
        [Endpoint(f"orders-{i}", "127.0.0.1", ib.port) for i, ib in enumerate(inbounds)]
    )
    dead = Cluster("dead", "default")  # an endpoint nobody listens on
    dead.set_endpoints([Endpoint("dead-1", "127.0.0.1", _closed_port())])
    empty = Cluster("empty", "default")
    directory = StaticDirectory([orders, dead, empty])
    outbound = await start_outbound(
        directory,
        stats=ProxyStats(),
        port=0,
        egress="deny",
        pool_policy=pool_policy,
        timeouts=timeouts,
    )
    return H2Mesh(apps, inbounds, outbound, directory)


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port: int = s.getsockname()[1]
    s.close()
    return port


@pytest.fixture
async def mesh() -> AsyncIterator[H2Mesh]:
    m = await _mesh()
    yield m
    await m.outbound.aclose()
    for ib in m.inbounds:
        await ib.aclose()
    for a in m.apps:
        await a.aclose()


async def test_h2c_streams_of_one_connection_spread_over_every_instance(mesh: H2Mesh) -> None:
    client = await H2Client().connect(mesh.outbound.port)
    try:
        responses = await asyncio.gather(*(client.request("/who", "orders") for _ in range(9)))
        assert [r.status for r in responses] == [200] * 9
        names = sorted(bytes(r.body).decode() for r in responses)
        # Round robin per stream: one client connection, every instance three times.
        assert names == ["app-0"] * 3 + ["app-1"] * 3 + ["app-2"] * 3
        assert [a.streams for a in mesh.apps] == [3, 3, 3]
        # Each hop carried its streams on one pooled connection.
        assert [a.connections for a in mesh.apps] == [1, 1, 1]
        # The pool gauges count them (summed per destination, idle once streams ended).
        text = mesh.outbound.proxy.stats.render_prometheus()
        assert (
            'tether_upstream_pool_connections{destination="orders.default",state="idle"} 3' in text
        )
        seen = responses[0].headers
        assert seen[b"x-seen-authority"] == b"orders"
        assert seen[b"x-seen-xff"].startswith(b"127.0.0.1")
    finally:
        await client.aclose()


async def test_bodies_and_trailers_pass_both_ways(mesh: H2Mesh) -> None:
    client = await H2Client().connect(mesh.outbound.port)
    try:
        body = bytes(range(256)) * 800  # 200 KiB: several frames and window updates
        r = await client.request(
            "/echo", "orders", method="POST", body=body, trailers=[(b"x-check", b"42")]
        )
        assert r.status == 200 and bytes(r.body) == body
        assert r.trailers == {b"x-check": b"42"}
        big = await client.request("/big?n=3000000", "orders")
        assert big.status == 200 and len(big.body) == 3_000_000
    finally:
        await client.aclose()


async def test_http1_still_works_on_the_same_listener(mesh: H2Mesh) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", mesh.outbound.port)
    writer.write(b"GET / HTTP/1.1\r\nHost: nowhere\r\n\r\n")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 404") and b"unknown_service" in head
    writer.close()


async def test_local_replies_to_an_h2_caller_are_json_with_a_reason(mesh: H2Mesh) -> None:
    client = await H2Client().connect(mesh.outbound.port)
    try:
        r = await client.request("/x", "nope")
        assert r.status == 404 and r.headers[b"x-tether-error"] == b"unknown_service"
        assert b'"error": "unknown_service"' in bytes(r.body)
    finally:
        await client.aclose()


@pytest.mark.parametrize(
    ("authority", "code", "reason"),
    [
        ("nope", grpc_codes.UNAVAILABLE, "unknown_service"),
        ("empty", grpc_codes.UNAVAILABLE, "no_healthy_upstream"),
        ("dead", grpc_codes.UNAVAILABLE, "upstream_connect_error"),
        ("example.com", grpc_codes.PERMISSION_DENIED, "egress_denied"),
    ],
)
async def test_grpc_callers_get_grpc_errors(
    mesh: H2Mesh, authority: str, code: int, reason: str
) -> None:
    client = await H2Client().connect(mesh.outbound.port)
    try:
        r = await client.request("/t.S/U", authority, method="POST", headers=GRPC)
        # Trailers-Only: HTTP 200, the status in the only HEADERS frame.
        assert r.status == 200 and r.reset is None
        assert r.headers[b"content-type"] == b"application/grpc"
        assert r.headers[b"grpc-status"] == b"%d" % code
        assert r.headers[b"x-tether-error"] == reason.encode()
        assert r.headers[b"grpc-message"]
    finally:
        await client.aclose()


async def test_grpc_timeout_is_the_deadline() -> None:
    m = await _mesh(1, timeouts=TimeoutPolicy(request=30.0))
    client = await H2Client().connect(m.outbound.port)
    try:
        r = await client.request(
            "/slow?s=5", "orders", method="POST", headers=[*GRPC, (b"grpc-timeout", b"200m")]
        )
        assert r.headers[b"grpc-status"] == b"%d" % grpc_codes.DEADLINE_EXCEEDED
        assert r.headers[b"x-tether-error"] == b"request_timeout"
        # The upstream stream was cancelled, not left running.
        await until(lambda: m.apps[0].resets == 1, what="the app saw its stream reset")
    finally:
        await client.aclose()
        await m.outbound.aclose()


async def test_overflow_is_resource_exhausted() -> None:
    m = await _mesh(1, pool_policy=PoolPolicy(max_pending=0))
    client = await H2Client().connect(m.outbound.port)
    try:
        r = await client.request("/t.S/U", "orders", method="POST", headers=GRPC)
        assert r.headers[b"grpc-status"] == b"%d" % grpc_codes.RESOURCE_EXHAUSTED
        assert r.headers[b"x-tether-error"] == b"overflow"
    finally:
        await client.aclose()
        await m.outbound.aclose()


async def test_a_slow_reader_stalls_only_its_stream_and_holds_bounded_memory(
    mesh: H2Mesh,
) -> None:
    slow = await H2Client(auto_ack=False).connect(mesh.outbound.port)
    fast = await H2Client().connect(mesh.outbound.port)
    try:
        size = 8_000_000
        big = slow.start(f"/big?n={size}", "orders")
        await until(lambda: len(big.body) >= 65535 - 16384, what="the first window arrived")
        # Other streams, on the same client connection and on another, still complete.
        other = await slow.request("/who", "orders")
        assert other.status == 200
        more = await asyncio.gather(*(fast.request("/who", "orders") for _ in range(6)))
        assert all(r.status == 200 for r in more)
        # What the sidecars hold for the stalled stream is bounded by the windows: the
        # app still has almost all of its body waiting to be sent.
        outbound_h2 = mesh.outbound.proxy.h2
        assert outbound_h2 is not None
        held = sum(c.queued(big.stream_id) for c in outbound_h2.connections)
        assert held <= STREAM_WINDOW
        assert not big.done.is_set() and len(big.body) < 2 * STREAM_WINDOW
        # Reading again drains it to the end.
        slow.auto_ack = True
        slow.ack(big.stream_id, len(big.body))
        await asyncio.wait_for(big.done.wait(), 20)
        assert len(big.body) == size
    finally:
        await slow.aclose()
        await fast.aclose()


async def _raw_h2(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(PREFACE + _frame(4, 0, 0, b""))  # preface + empty SETTINGS
    return reader, writer


def _frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
    return (
        struct.pack(">I", len(payload))[1:]
        + bytes([kind, flags])
        + struct.pack(">I", stream)
        + payload
    )


async def _goaway(reader: asyncio.StreamReader) -> int:
    """Read frames until GOAWAY; its error code."""
    while True:
        head = await asyncio.wait_for(reader.readexactly(9), 5)
        length = int.from_bytes(head[:3], "big")
        payload = await asyncio.wait_for(reader.readexactly(length), 5)
        if head[3] == 7:
            return int.from_bytes(payload[4:8], "big")


async def test_a_malformed_frame_closes_the_connection_with_its_error_code(
    mesh: H2Mesh,
) -> None:
    reader, writer = await _raw_h2(mesh.outbound.port)
    # SETTINGS whose length is not a multiple of 6: FRAME_SIZE_ERROR (RFC 9113 6.5).
    writer.write(_frame(4, 0, 0, b"\x00\x01\x00"))
    assert await _goaway(reader) == ErrorCodes.FRAME_SIZE_ERROR
    assert await asyncio.wait_for(reader.read(), 5) == b""
    reader, writer = await _raw_h2(mesh.outbound.port)
    # DATA on stream 0: PROTOCOL_ERROR; and nothing reached an app.
    writer.write(_frame(0, 1, 0, b"hello"))
    assert await _goaway(reader) == ErrorCodes.PROTOCOL_ERROR
    assert sum(a.streams for a in mesh.apps) == 0


async def test_an_hpack_bomb_is_refused_before_its_fields_are_built(mesh: H2Mesh) -> None:
    reader, writer = await _raw_h2(mesh.outbound.port)
    enc = Encoder()
    big = (b"x-bomb", b"a" * 4000)
    # One 4 KB field in the dynamic table, then referenced by one byte each: a few KB on
    # the wire that would decode to 4 MB.
    block = enc.encode(
        [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"), (b":authority", b"orders")]
        + [big] * 1000
    )
    assert len(block) < 16384
    writer.write(_frame(1, 0x5, 1, block))  # HEADERS, END_STREAM|END_HEADERS, stream 1
    code = await _goaway(reader)
    assert code in (ErrorCodes.ENHANCE_YOUR_CALM, ErrorCodes.COMPRESSION_ERROR)
    assert sum(a.streams for a in mesh.apps) == 0
    assert len(block) * 200 > MAX_HEADER_LIST_SIZE


async def test_rapid_reset_is_cut_off(mesh: H2Mesh) -> None:
    client = await H2Client().connect(mesh.outbound.port)
    conn = client.conn
    opened = 0
    try:
        for _ in range(20):  # up to 1,000 streams opened and reset at once, 50 per write
            if client.closed.is_set() or client.goaway is not None:
                break
            for _ in range(50):
                sid = conn.get_next_available_stream_id()
                conn.send_headers(
                    sid,
                    [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"orders"),
                     (b":path", b"/slow?s=1")],
                )  # fmt: skip
                conn.reset_stream(sid, ErrorCodes.CANCEL)
                opened += 1
            client.flush()
            await asyncio.sleep(0)
        await asyncio.wait_for(client.closed.wait(), 5)
        assert client.goaway is not None
        assert client.goaway.error_code == ErrorCodes.ENHANCE_YOUR_CALM
        # The budget (a burst of 200) was spent well before all were forwarded.
        assert sum(a.streams for a in mesh.apps) <= 260 < opened
    finally:
        await client.aclose()
    # The listener serves the next client as usual.
    again = await H2Client().connect(mesh.outbound.port)
    try:
        assert (await again.request("/who", "orders")).status == 200
    finally:
        await again.aclose()


def test_reset_budget_refills_at_its_rate() -> None:
    budget = ResetBudget(rate=10.0, burst=3.0, now=100.0)
    assert [budget.take(100.0) for _ in range(4)] == [True, True, True, False]
    assert budget.take(100.05) is False  # half a token
    assert budget.take(100.2) is True
    assert budget.take(200.0) and budget.take(200.0) and budget.take(200.0)
    assert budget.take(200.0) is False


def test_grpc_timeout_and_status_mapping() -> None:
    assert grpc_codes.parse_timeout(b"200m") == pytest.approx(0.2)
    assert grpc_codes.parse_timeout(b"1S") == 1.0 and grpc_codes.parse_timeout(b"2H") == 7200.0
    for bad in (b"", b"m", b"1x", b"123456789S", b"-1S"):
        assert grpc_codes.parse_timeout(bad) is None
    assert grpc_codes.is_grpc(b"application/grpc") and grpc_codes.is_grpc(b"application/grpc+proto")
    assert not grpc_codes.is_grpc(b"application/grpc-web") and not grpc_codes.is_grpc(None)
    assert grpc_codes.status_for("overflow", 503) == grpc_codes.RESOURCE_EXHAUSTED
    assert grpc_codes.status_for("upstream_timeout", 504) == grpc_codes.DEADLINE_EXCEEDED
    assert grpc_codes.status_for("request_timeout", 504) == grpc_codes.DEADLINE_EXCEEDED
    assert grpc_codes.status_for("upstream_connect_timeout", 503) == grpc_codes.UNAVAILABLE
    assert grpc_codes.status_for("forbidden_by_policy", 403) == grpc_codes.PERMISSION_DENIED
    assert grpc_codes.status_for("forbidden", 403) == grpc_codes.PERMISSION_DENIED
    assert grpc_codes.status_for("something_new", 503) == grpc_codes.UNAVAILABLE


# -- gRPC with grpcio ------------------------------------------------------------------


def grpc_server(name: str) -> tuple[grpc.Server, int]:
    """A grpcio server with generic handlers (bytes in, bytes out): unary `U`, server
    streaming `SS` (N messages), bidi `B` (each message reversed), `F` (fails)."""

    def unary(req: bytes, ctx: Any) -> bytes:
        return name.encode() + b":" + req

    def server_stream(req: bytes, ctx: Any) -> Iterator[bytes]:
        for i in range(int(req)):
            yield b"%d" % i

    def bidi(requests: Iterator[bytes], ctx: Any) -> Iterator[bytes]:
        for m in requests:
            yield m[::-1]

    def fail(req: bytes, ctx: Any) -> bytes:
        ctx.abort(grpc.StatusCode.NOT_FOUND, "nothing here")
        return b""

    handler = grpc.method_handlers_generic_handler(
        "t.S",
        {
            "U": grpc.unary_unary_rpc_method_handler(unary),
            "SS": grpc.unary_stream_rpc_method_handler(server_stream),
            "B": grpc.stream_stream_rpc_method_handler(bidi),
            "F": grpc.unary_unary_rpc_method_handler(fail),
        },
    )
    server = grpc.server(futures.ThreadPoolExecutor(4))
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, port


def grpc_calls(channel: grpc.Channel) -> dict[str, Any]:
    """Unary, server streaming, bidi and a failing call on `channel`."""
    unary = channel.unary_unary("/t.S/U")
    out: dict[str, Any] = {"unary": [unary(b"x", timeout=10) for _ in range(6)]}
    out["server_stream"] = list(channel.unary_stream("/t.S/SS")(b"50", timeout=10))
    out["bidi"] = list(channel.stream_stream("/t.S/B")(iter([b"abc", b"def", b"ghi"]), timeout=10))
    try:
        channel.unary_unary("/t.S/F")(b"", timeout=10)
    except grpc.RpcError as e:
        out["fail"] = (e.code(), e.details())
    return out


def _check(out: dict[str, Any], names: set[str]) -> None:
    # Six unary calls on one channel (one connection) reached every instance.
    assert {r.split(b":")[0].decode() for r in out["unary"]} == names
    assert out["server_stream"] == [b"%d" % i for i in range(50)]
    assert out["bidi"] == [b"cba", b"fed", b"ihg"]
    # grpc-status and grpc-message from the server's trailers, end to end.
    assert out["fail"] == (grpc.StatusCode.NOT_FOUND, "nothing here")


async def _grpc_mesh() -> tuple[list[grpc.Server], list[Listener], Listener]:
    servers = [grpc_server(f"g{i}") for i in range(3)]
    inbounds = [
        await start_inbound(port, stats=ProxyStats(), port=0, app_protocol="grpc")
        for _, port in servers
    ]
    greeter = Cluster("greeter", "default")
    greeter.set_endpoints(
        [Endpoint(f"g-{i}", "127.0.0.1", ib.port) for i, ib in enumerate(inbounds)]
    )
    outbound = await start_outbound(StaticDirectory([greeter]), stats=ProxyStats(), port=0)
    return [s for s, _ in servers], inbounds, outbound


async def test_grpcio_by_authority_and_through_http_proxy_connect() -> None:
    servers, inbounds, outbound = await _grpc_mesh()
    try:
        # The service named by :authority on the outbound listener.
        by_authority = grpc.insecure_channel(
            f"127.0.0.1:{outbound.port}", options=[("grpc.default_authority", "greeter")]
        )
        out = await asyncio.to_thread(grpc_calls, by_authority)
        by_authority.close()
        _check(out, {"g0", "g1", "g2"})
        # grpcio honouring a proxy: CONNECT greeter:80 (a name no resolver knows), then
        # h2 inside, each stream routed here.
        proxied = grpc.insecure_channel(
            "greeter:80", options=[("grpc.http_proxy", f"http://127.0.0.1:{outbound.port}")]
        )
        out = await asyncio.to_thread(grpc_calls, proxied)
        proxied.close()
        _check(out, {"g0", "g1", "g2"})
        assert outbound.proxy.h2 is not None and len(outbound.proxy.h2.pools) == 3
    finally:
        await outbound.aclose()
        for ib in inbounds:
            await ib.aclose()
        for s in servers:
            s.stop(0)


# -- two real sidecar processes ---------------------------------------------------------


class _GrpcApp:
    def __init__(self, name: str) -> None:
        self.server, self.port = grpc_server(name)


@pytest.fixture
def procs(registry_process: Callable[..., RegistryProcess], tmp_path: Path) -> Iterator[ProcessSet]:
    reg = registry_process()
    ps = ProcessSet(tmp_path, reg.port)
    try:
        yield ps
    finally:
        ps.close()


@pytest.mark.timeout(120)
def test_grpcio_through_two_sidecar_processes_by_service_name(procs: ProcessSet) -> None:
    apps = [_GrpcApp(f"greeter-{i}") for i in range(2)]
    try:
        for app in apps:
            procs.sidecar("greeter", app, "--app-protocol", "grpc", health_path=None)
        caller_app = _GrpcApp("caller")
        caller = procs.sidecar("caller", caller_app, health_path=None)
        channel = grpc.insecure_channel(
            "greeter:80",
            options=[("grpc.http_proxy", f"http://127.0.0.1:{caller.ports['outbound']}")],
        )
        out = grpc_calls(channel)
        channel.close()
        # The sidecar's default balancer (peak EWMA) may favour one instance over six
        # calls; per-stream spreading is shown with round robin in-process above.
        _check(out, {r.split(b":")[0].decode() for r in out["unary"]})
        assert {r.split(b":")[0] for r in out["unary"]} <= {b"greeter-0", b"greeter-1"}
        caller_app.server.stop(0)
    finally:
        for app in apps:
            app.server.stop(0)


async def test_a_grpc_stream_outlives_a_policy_push() -> None:
    from proxy.policy import Policy
    from proxy.policy_router import start_policy_outbound
    from wire import push as protocol

    servers = [grpc_server("g0")]
    inbound = await start_inbound(servers[0][1], stats=ProxyStats(), port=0, app_protocol="grpc")
    greeter = Cluster("greeter", "default")
    greeter.set_endpoints([Endpoint("g-0", "127.0.0.1", inbound.port)])
    directory = StaticDirectory([greeter])
    policy = Policy(directory)
    outbound = await start_policy_outbound(directory, policy, port=0)

    def snapshot(version: int, value: str) -> protocol.Snapshot:
        docs = [
            {
                "apiVersion": "tether.dev/v1alpha1",
                "kind": "Route",
                "metadata": {"name": "greeter", "namespace": "default"},
                "spec": {"rules": [{"responseHeaders": {"set": {"x-policy": value}}}]},
            }
        ]
        text = protocol.canonical_json(docs)
        return protocol.Snapshot(version, protocol.content_hash(text), f"n{version}", tuple(docs))

    import queue
    import threading

    sent: queue.Queue[bytes | None] = queue.Queue()
    got: list[bytes] = []
    first = threading.Event()
    meta: list[Any] = []

    def bidi() -> None:
        channel = grpc.insecure_channel(
            f"127.0.0.1:{outbound.port}", options=[("grpc.default_authority", "greeter")]
        )
        call = channel.stream_stream("/t.S/B")(iter(sent.get, None), timeout=20)
        for message in call:
            got.append(message)
            first.set()
        meta.append(dict(call.initial_metadata()))
        meta.append(call.code())
        channel.close()

    try:
        await policy.apply(snapshot(1, "one"))
        thread = threading.Thread(target=bidi)
        thread.start()
        sent.put(b"abc")
        await until(first.is_set, what="the first reply")
        # A push while the stream is open: it goes on under the policy it started with.
        await policy.apply(snapshot(2, "two"))
        assert policy.version == 2
        sent.put(b"def")
        sent.put(None)
        await asyncio.to_thread(thread.join, 20)
        assert got == [b"cba", b"fed"]
        assert meta[0].get("x-policy") == "one" and meta[1] == grpc.StatusCode.OK
        # A new call sees the new policy.
        channel = grpc.insecure_channel(
            f"127.0.0.1:{outbound.port}", options=[("grpc.default_authority", "greeter")]
        )
        _, call = await asyncio.to_thread(channel.unary_unary("/t.S/U").with_call, b"x", timeout=10)
        assert dict(call.initial_metadata()).get("x-policy") == "two"
        channel.close()
    finally:
        await outbound.aclose()
        await inbound.aclose()
        servers[0][0].stop(0)


async def test_h2_to_an_http1_app_is_bridged() -> None:
    from aiohttp import web

    async def handler(request: web.Request) -> web.Response:
        body = await request.read()
        return web.json_response(
            {
                "path": request.path_qs,
                "len": len(body),
                "chunked": request.headers.get("Transfer-Encoding") == "chunked",
                "host": request.host,
                "te": request.headers.get("TE"),
            }
        )

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    inbound = await start_inbound(port, stats=ProxyStats(), port=0)  # protocol http
    web_cluster = Cluster("web", "default")
    web_cluster.set_endpoints([Endpoint("web-1", "127.0.0.1", inbound.port)])
    outbound = await start_outbound(StaticDirectory([web_cluster]), stats=ProxyStats(), port=0)
    client = await H2Client().connect(outbound.port)
    try:
        r = await client.request("/a?b=1", "web", headers=[(b"te", b"trailers")])
        assert r.status == 200
        assert json.loads(bytes(r.body)) == {
            "path": "/a?b=1",
            "len": 0,
            "chunked": False,
            "host": "web",
            "te": None,
        }
        # A body of unknown length goes chunked; many streams share the app's pool.
        posts = await asyncio.gather(
            *(client.request("/p", "web", method="POST", body=b"z" * 300_000) for _ in range(3))
        )
        for p in posts:
            assert json.loads(bytes(p.body))["len"] == 300_000
            assert json.loads(bytes(p.body))["chunked"] is True
        assert inbound.proxy.h2 is not None and not inbound.proxy.h2.pools
    finally:
        await client.aclose()
        await outbound.aclose()
        await inbound.aclose()
        await runner.cleanup()


async def test_settings_limits_are_advertised_and_enforced(mesh: H2Mesh) -> None:
    client = await H2Client().connect(mesh.outbound.port)
    try:
        await until(lambda: client.conn.remote_settings.max_concurrent_streams == 128)
        settings = client.conn.remote_settings
        assert settings.max_header_list_size == MAX_HEADER_LIST_SIZE
        assert settings.initial_window_size == STREAM_WINDOW
        assert settings.max_frame_size == 16384
        # A header section over the limit (literal, in CONTINUATION frames): refused
        # before any of it is forwarded, the connection closed with ENHANCE_YOUR_CALM.
        r = client.start("/who", "orders", headers=[(b"x-big", b"v" * 70_000)])
        await asyncio.wait_for(client.closed.wait(), 5)
        assert client.goaway is not None
        assert client.goaway.error_code == ErrorCodes.ENHANCE_YOUR_CALM
        assert r.status == 0 and sum(a.streams for a in mesh.apps) == 0
    finally:
        await client.aclose()
    # More streams than MAX_CONCURRENT_STREAMS: the connection is refused (h2 treats it
    # as a connection error); the ones within the limit were forwarded.
    reader, writer = await _raw_h2(mesh.outbound.port)
    enc = Encoder()
    for i in range(130):
        block = enc.encode(
            [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/slow?s=2"),
             (b":authority", b"orders")]
        )  # fmt: skip
        writer.write(_frame(1, 0x5, 1 + 2 * i, block))
    assert await _goaway(reader) == ErrorCodes.PROTOCOL_ERROR
    assert sum(a.streams for a in mesh.apps) <= 128


async def test_frames_after_an_upstream_goaway_end_the_connection_quietly() -> None:
    # gRPC servers that stop send GOAWAY, then PING: h2 refuses anything after a GOAWAY,
    # and the sidecar must not answer that with a GOAWAY blaming the server.
    got: list[bytes] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(len(PREFACE))
        goaway = struct.pack(">II", 0, 0)  # last stream 0, NO_ERROR
        writer.write(_frame(4, 0, 0, b"") + _frame(7, 0, 0, goaway) + _frame(6, 0, 0, b"p" * 8))
        while data := await reader.read(65536):
            got.append(data)
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    app_port = server.sockets[0].getsockname()[1]
    inbound = await start_inbound(app_port, stats=ProxyStats(), port=0, app_protocol="http2")
    client = await H2Client().connect(inbound.port)
    try:
        r = await client.request("/x", "app")
        # Before or after the request went out, depending on when the GOAWAY is read.
        assert r.status == 502
        assert r.headers[b"x-tether-error"] in (b"upstream_reset", b"upstream_connect_error")
        sent = b"".join(got)
        # Frames the sidecar sent the server after the preface: no GOAWAY among them.
        kinds = []
        i = len(PREFACE) if sent.startswith(PREFACE) else 0
        while i + 9 <= len(sent):
            length = int.from_bytes(sent[i : i + 3], "big")
            kinds.append(sent[i + 3])
            i += 9 + length
        assert 7 not in kinds
        assert inbound.proxy.stats.local_replies.get("h2_protocol_error") is None
    finally:
        await client.aclose()
        await inbound.aclose()
        server.close()


async def test_drain_says_goaway_and_lets_streams_in_flight_finish(mesh: H2Mesh) -> None:
    client = await H2Client().connect(mesh.outbound.port)
    try:
        # An inbound sidecar draining: its GOAWAY reaches the outbound sidecar's pooled
        # connection, whose stream in flight still completes.
        first = client.start("/slow?s=0.5", "orders")
        await until(lambda: sum(a.streams for a in mesh.apps) == 1, what="the stream is up")
        busy = next(i for i, a in enumerate(mesh.apps) if a.streams)
        assert await mesh.inbounds[busy].drain(5.0)
        await asyncio.wait_for(first.done.wait(), 5)
        assert first.status == 200 and first.reset is None
        # The outbound listener draining: GOAWAY to its client, the stream finishes.
        slow = client.start("/slow?s=0.5", "orders")
        await until(lambda: sum(a.streams for a in mesh.apps) == 2, what="the stream is up")
        clean = await mesh.outbound.drain(5.0)
        assert clean
        # Drained: the sidecar wrote the response and closed; the client reads it.
        await asyncio.wait_for(slow.done.wait(), 5)
        assert slow.status == 200 and bytes(slow.body).startswith(b"app-")
        assert client.goaway is not None and client.goaway.error_code == ErrorCodes.NO_ERROR
    finally:
        await client.aclose()


async def test_an_upstream_graceful_goaway_lets_its_stream_in_flight_finish() -> None:
    # A raw HTTP/2 server: takes stream 1, says GOAWAY (NO_ERROR, last stream 1), then
    # answers stream 1. h2 alone would close the connection at the GOAWAY and cut it.
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(len(PREFACE))
        while True:
            head = await reader.readexactly(9)
            await reader.readexactly(int.from_bytes(head[:3], "big"))
            if head[3] == 1:  # HEADERS: the request
                break
        stream = int.from_bytes(head[5:9], "big") & 0x7FFFFFFF
        block = Encoder().encode([(b":status", b"200"), (b"content-length", b"4")])
        writer.write(
            _frame(4, 0, 0, b"")
            + _frame(7, 0, 0, struct.pack(">II", stream, 0))
            + _frame(1, 0x4, stream, block)
            + _frame(0, 0x1, stream, b"done")
        )
        await writer.drain()
        await reader.read()  # until the sidecar closes the connection
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    app_port = server.sockets[0].getsockname()[1]
    inbound = await start_inbound(app_port, stats=ProxyStats(), port=0, app_protocol="http2")
    client = await H2Client().connect(inbound.port)
    try:
        r = await client.request("/x", "app")
        assert r.status == 200 and bytes(r.body) == b"done"
        # The pooled connection took no new stream after the GOAWAY and closed.
        await until(
            lambda: all(not p.conns for p in inbound.proxy.h2.pools.values()),  # type: ignore[union-attr]
            what="the upstream connection closed",
        )
    finally:
        await client.aclose()
        await inbound.aclose()
        server.close()


def test_the_goaway_override_is_checked_against_the_h2_release() -> None:
    from h2.connection import H2Connection

    from proxy import h2_link

    assert h2_link.goaway_support("4.4.1", H2Connection) == ""
    assert "not among the releases verified" in h2_link.goaway_support("5.0.0", H2Connection)
    assert "not a release number" in h2_link.goaway_support("dev", H2Connection)

    class Changed:
        def _receive_goaway_frame(self, frame: object, extra: object) -> None: ...

    assert "not (self, frame)" in h2_link.goaway_support("4.4.0", Changed)
    assert "has no _receive_goaway_frame" in h2_link.goaway_support("4.2.0", object)
    # On this (verified) release the connection class has the override.
    assert h2_link.GRACEFUL_GOAWAY
    assert "_receive_goaway_frame" in vars(h2_link.GracefulH2Connection)
