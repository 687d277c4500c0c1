"""The proxy path over real sockets: client → outbound → inbound → app, and raw upstreams."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from proxy.downstream import TimeoutPolicy
from proxy.listener import start_outbound, start_tcp_proxy
from proxy.stats import ProxyStats
from tests.sidecar_harness import Mesh

# ---------------------------------------------------------------------------------------
# upstreams


async def _app_handler(request: web.Request) -> web.StreamResponse:
    path = request.match_info["tail"]
    if path.startswith("status/"):
        code = int(path.split("/")[1])
        return web.Response(status=code, headers={"ETag": '"x"'} if code == 304 else None)
    if path == "ws":
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for msg in ws:
            if msg.type == aiohttp.WSMsgType.TEXT:
                await ws.send_str("echo:" + msg.data)
            elif msg.type == aiohttp.WSMsgType.BINARY:
                await ws.send_bytes(msg.data[::-1])
        return ws
    if path == "slow":
        await asyncio.sleep(float(request.query.get("s", "0.3")))
    body = await request.read()
    peer = request.transport.get_extra_info("peername") if request.transport else None
    return web.json_response(
        {
            "method": request.method,
            "path": request.path_qs,
            "headers": [[k, v] for k, v in request.raw_headers_str()],
            "body_len": len(body),
            "peer_port": peer[1] if peer else 0,
        }
    )


def _raw_headers_str(self: web.Request) -> list[tuple[str, str]]:
    return [(k.decode(), v.decode()) for k, v in self.raw_headers]


web.Request.raw_headers_str = _raw_headers_str  # type: ignore[attr-defined]


@dataclass
class RawUpstream:
    """A scripted upstream: records every byte received, answers with `reply(data)`."""

    reply: Callable[[RawUpstream, bytes], Awaitable[bytes | None]]
    received: bytearray = field(default_factory=bytearray)
    close_after: bool = False
    connections: int = 0
    port: int = 0
    server: asyncio.Server | None = None

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    break
                self.received += data
                out = await self.reply(self, data)
                if out is None:
                    writer.close()
                    return
                if out:
                    writer.write(out)
                    await writer.drain()
                    if self.close_after:
                        break
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    async def aclose(self) -> None:
        assert self.server is not None
        self.server.close()


async def _ok(up: RawUpstream, data: bytes) -> bytes | None:
    if b"\r\n\r\n" in data:
        return b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    return b""


@pytest.fixture
async def app_port() -> AsyncIterator[int]:
    app = web.Application(client_max_size=1024**3)
    app.router.add_route("*", "/{tail:.*}", _app_handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    assert site._server is not None
    yield site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    await runner.cleanup()


TIMEOUTS = TimeoutPolicy(header_read=0.5, idle=1.0, request=0.6, connect=0.5)


@pytest.fixture
async def mesh(app_port: int) -> AsyncIterator[Mesh]:
    m = await Mesh.static(app_port, TIMEOUTS)
    try:
        yield m
    finally:
        await m.aclose()


# ---------------------------------------------------------------------------------------
# a raw HTTP/1.1 client


class RawClient:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, port: int) -> RawClient:
        r, w = await asyncio.open_connection("127.0.0.1", port)
        return cls(r, w)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def response(
        self, head_request: bool = False, timeout: float = 5.0
    ) -> tuple[int, dict[str, list[str]], bytes, dict[str, str]]:
        """One response: status, headers (lowercase → values), body, trailers."""

        async def read() -> tuple[int, dict[str, list[str]], bytes, dict[str, str]]:
            head = await self.reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            status = int(lines[0].split(" ")[1])
            headers: dict[str, list[str]] = {}
            for line in lines[1:]:
                if line:
                    k, _, v = line.partition(":")
                    headers.setdefault(k.strip().lower(), []).append(v.strip())
            trailers: dict[str, str] = {}
            if head_request or status in (204, 304) or 100 <= status < 200:
                return status, headers, b"", trailers
            if "content-length" in headers:
                body = await self.reader.readexactly(int(headers["content-length"][0]))
            elif headers.get("transfer-encoding") == ["chunked"]:
                body = b""
                while True:
                    size = int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16)
                    if size == 0:
                        break
                    body += await self.reader.readexactly(size)
                    assert await self.reader.readexactly(2) == b"\r\n"
                while True:
                    line = await self.reader.readuntil(b"\r\n")
                    if line == b"\r\n":
                        break
                    k, _, v = line.decode().partition(":")
                    trailers[k.strip().lower()] = v.strip()
            else:
                body = await self.reader.read()
            return status, headers, body, trailers

        return await asyncio.wait_for(read(), timeout)

    async def closed(self, timeout: float = 3.0) -> bool:
        try:
            data = await asyncio.wait_for(self.reader.read(1), timeout)
        except (ConnectionError, TimeoutError):
            return False
        return data == b""

    def close(self) -> None:
        self.writer.close()


async def request(
    port: int, data: bytes, head_request: bool = False
) -> tuple[int, dict[str, list[str]], bytes, dict[str, str]]:
    c = await RawClient.open(port)
    try:
        await c.send(data)
        return await c.response(head_request)
    finally:
        c.close()


def app_seen(body: bytes) -> dict[str, Any]:
    seen = json.loads(body)
    seen["h"] = {k.lower(): v for k, v in seen["headers"]}
    seen["all"] = [(k.lower(), v) for k, v in seen["headers"]]
    return seen


# ---------------------------------------------------------------------------------------
# the normal path


async def test_keep_alive_both_hops_and_pooled_upstream(mesh: Mesh) -> None:
    c = await RawClient.open(mesh.outbound.port)
    peer_ports = set()
    for i in range(5):
        await c.send(b"GET /n/%d HTTP/1.1\r\nHost: orders\r\n\r\n" % i)
        status, headers, body, _ = await c.response()
        assert status == 200
        seen = app_seen(body)
        assert seen["path"] == f"/n/{i}"
        peer_ports.add(seen["peer_port"])
        assert headers["via"] == ["1.1 tether", "1.1 tether"]
    c.close()
    # Sequential requests reuse one pooled connection inbound → app.
    assert len(peer_ports) == 1
    pools = mesh.inbound.pools()
    assert len(pools) == 1 and len(pools[0].idle) == 1
    assert repr(pools[0]).startswith("<Pool app idle=1 busy=0 connecting=0 pending=0")
    text = mesh.stats.render_prometheus()
    labels = 'listener="outbound",destination="orders.default",subset="",status_class="2xx"'
    assert f"{labels}}} 5" in text


async def test_absolute_form_namespaces_and_forwarded_headers(mesh: Mesh) -> None:
    status, _, body, _ = await request(
        mesh.outbound.port,
        b"GET http://billing.payments:8080/p?q=1 HTTP/1.1\r\nHost: wrong\r\n"
        b"Connection: keep-alive, X-Secret\r\nX-Secret: s\r\nKeep-Alive: 5\r\nTE: trailers\r\n"
        b"Proxy-Connection: keep-alive\r\nX-Forwarded-For: 10.1.1.1\r\nX-Request-Id: abc-123\r\n"
        b"X-Keep: k\r\n\r\n",
    )
    assert status == 200
    seen = app_seen(body)
    h = seen["h"]
    assert seen["path"] == "/p?q=1"
    assert h["host"] == "billing.payments:8080"  # the URI's authority replaces Host
    for hop in ("x-secret", "keep-alive", "te", "proxy-connection", "connection"):
        assert hop not in h, hop
    assert h["x-keep"] == "k"
    assert h["x-request-id"] == "abc-123"
    assert h["x-forwarded-for"] == "10.1.1.1, 127.0.0.1, 127.0.0.1"
    assert h["x-forwarded-proto"] == "http"
    assert [v for k, v in seen["all"] if k == "via"] == ["1.1 tether", "1.1 tether"]


async def test_request_id_generated_once_and_kept_across_hops(mesh: Mesh) -> None:
    ids = set()
    for _ in range(3):
        _status, _headers, body, _ = await request(
            mesh.outbound.port, b"GET / HTTP/1.1\r\nHost: orders\r\n\r\n"
        )
        rid = app_seen(body)["h"]["x-request-id"]
        assert len(rid) == 36 and rid.count("-") == 4
        ids.add(rid)
    assert len(ids) == 3


async def test_chunked_request_and_response_with_trailers(mesh: Mesh) -> None:
    async def reply(up: RawUpstream, data: bytes) -> bytes | None:
        if not bytes(up.received).endswith(b"\r\n\r\n") or b"0\r\n" not in up.received:
            return b""
        return (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-Digest\r\n\r\n"
            b"3\r\nabc\r\n4\r\ndefg\r\n0\r\nX-Digest: d1\r\n\r\n"
        )

    up = RawUpstream(reply)
    await up.start()
    mesh.add_cluster("raw", up.port)
    c = await RawClient.open(mesh.outbound.port)
    await c.send(
        b"POST /up HTTP/1.1\r\nHost: raw\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5;ext=1\r\nhello\r\n1\r\n!\r\n0\r\nX-Sum: s1\r\n\r\n"
    )
    status, headers, body, trailers = await c.response()
    assert status == 200 and body == b"abcdefg" and trailers == {"x-digest": "d1"}
    assert headers["transfer-encoding"] == ["chunked"]
    got = bytes(up.received)
    head, _, sent_body = got.partition(b"\r\n\r\n")
    assert b"Transfer-Encoding: chunked" in head
    assert sent_body == b"5\r\nhello\r\n1\r\n!\r\n0\r\nX-Sum: s1\r\n\r\n"
    # The same client connection still works.
    await c.send(b"GET / HTTP/1.1\r\nHost: orders\r\n\r\n")
    assert (await c.response())[0] == 200
    c.close()
    await up.aclose()


async def test_close_delimited_response_becomes_chunked_for_http11(mesh: Mesh) -> None:
    async def reply(up: RawUpstream, data: bytes) -> bytes | None:
        return b"HTTP/1.0 200 OK\r\n\r\nuntil close" if b"\r\n\r\n" in data else b""

    up = RawUpstream(reply, close_after=True)
    await up.start()
    mesh.add_cluster("raw10", up.port)
    c = await RawClient.open(mesh.outbound.port)
    for _ in range(2):
        await c.send(b"GET / HTTP/1.1\r\nHost: raw10\r\n\r\n")
        status, headers, body, _ = await c.response()
        assert status == 200 and body == b"until close"
        assert headers["transfer-encoding"] == ["chunked"]
    c.close()
    await up.aclose()


async def test_expect_100_continue_is_relayed(mesh: Mesh) -> None:
    c = await RawClient.open(mesh.outbound.port)
    await c.send(
        b"POST /e HTTP/1.1\r\nHost: orders\r\nExpect: 100-continue\r\nContent-Length: 4\r\n\r\n"
    )
    status, _, _, _ = await c.response()
    assert status == 100
    await c.send(b"data")
    status, _, body, _ = await c.response()
    assert status == 200 and app_seen(body)["body_len"] == 4
    c.close()


async def test_head_204_304_have_no_body_and_keep_the_connection(mesh: Mesh) -> None:
    c = await RawClient.open(mesh.outbound.port)
    await c.send(b"HEAD /h HTTP/1.1\r\nHost: orders\r\n\r\n")
    status, headers, _, _ = await c.response(head_request=True)
    assert status == 200 and int(headers["content-length"][0]) > 0
    for code in (204, 304):
        await c.send(b"GET /status/%d HTTP/1.1\r\nHost: orders\r\n\r\n" % code)
        status, headers, _, _ = await c.response()
        assert status == code and "transfer-encoding" not in headers
    await c.send(b"GET /after HTTP/1.1\r\nHost: orders\r\n\r\n")
    status, _, body, _ = await c.response()
    assert status == 200 and app_seen(body)["path"] == "/after"
    c.close()


async def test_pipelined_requests_answer_in_order(mesh: Mesh) -> None:
    c = await RawClient.open(mesh.outbound.port)
    await c.send(
        b"GET /slow?s=0.1 HTTP/1.1\r\nHost: orders\r\n\r\n"
        b"POST /two HTTP/1.1\r\nHost: orders\r\nContent-Length: 3\r\n\r\nabc"
        b"GET /three HTTP/1.1\r\nHost: orders\r\n\r\n"
    )
    paths = [app_seen((await c.response())[2])["path"] for _ in range(3)]
    assert paths == ["/slow?s=0.1", "/two", "/three"]
    c.close()


async def test_http10_client_gets_close_or_keep_alive(mesh: Mesh) -> None:
    status, headers, _body, _ = await request(
        mesh.outbound.port, b"GET /x HTTP/1.0\r\nHost: orders\r\n\r\n"
    )
    assert status == 200 and headers["connection"] == ["close"]
    c = await RawClient.open(mesh.outbound.port)
    await c.send(b"GET /x HTTP/1.0\r\nHost: orders\r\nConnection: keep-alive\r\n\r\n")
    status, headers, _, _ = await c.response()
    assert headers["connection"] == ["keep-alive"]
    await c.send(b"GET /y HTTP/1.0\r\nHost: orders\r\n\r\n")
    assert (await c.response())[0] == 200
    assert await c.closed()


async def test_websocket_upgrade_through_both_hops(mesh: Mesh) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(
            f"http://127.0.0.1:{mesh.outbound.port}/ws", headers={"Host": "orders"}
        ) as ws:
            for i in range(3):
                await ws.send_str(f"m{i}")
                assert (await ws.receive(timeout=5)).data == f"echo:m{i}"
            await ws.send_bytes(b"\x01\x02\x03" * 50000)
            msg = await ws.receive(timeout=5)
            assert msg.data == (b"\x01\x02\x03" * 50000)[::-1]
        # Also through HTTP_PROXY style absolute-form.
        async with session.ws_connect(
            "http://orders/ws", proxy=f"http://127.0.0.1:{mesh.outbound.port}"
        ) as ws:
            await ws.send_str("p")
            assert (await ws.receive(timeout=5)).data == "echo:p"
    assert mesh.stats.tunnels_total >= 4  # two tunnels per connection (two hops)


async def test_aiohttp_client_through_http_proxy(mesh: Mesh) -> None:
    async with aiohttp.ClientSession() as session:
        proxy = f"http://127.0.0.1:{mesh.outbound.port}"
        for i in range(20):
            async with session.post(
                f"http://orders/c{i}", data=os.urandom(1000 * i), proxy=proxy
            ) as resp:
                assert resp.status == 200
                assert (await resp.json())["body_len"] == 1000 * i


# ---------------------------------------------------------------------------------------
# tunnels


async def _echo_server() -> tuple[asyncio.Server, int]:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def test_connect_tunnels_to_egress_host(mesh: Mesh) -> None:
    server, port = await _echo_server()
    c = await RawClient.open(mesh.outbound.port)
    await c.send(b"CONNECT 127.0.0.1:%d HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n\r\nearly" % (port, port))
    head = await asyncio.wait_for(c.reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 200")
    assert await asyncio.wait_for(c.reader.readexactly(5), 5) == b"early"
    payload = os.urandom(300_000)
    await c.send(payload)
    assert await asyncio.wait_for(c.reader.readexactly(len(payload)), 5) == payload
    c.writer.write_eof()
    assert await c.closed()
    server.close()
    # CONNECT to a closed port answers 502 upstream_connect_error.
    status, headers, _body, _ = await request(
        mesh.outbound.port, b"CONNECT 127.0.0.1:1 HTTP/1.1\r\nHost: 127.0.0.1:1\r\n\r\n"
    )
    assert status == 502 and headers["x-tether-error"] == ["upstream_connect_error"]
    # CONNECT to a mesh name is not tunnelled: answered here, and the requests that
    # follow on the connection are routed one by one (to `orders`, by their Host).
    c = await RawClient.open(mesh.outbound.port)
    await c.send(
        b"CONNECT orders:80 HTTP/1.1\r\nHost: orders:80\r\n\r\n"
        b"GET /inside HTTP/1.1\r\nHost: orders\r\n\r\n"
    )
    head = await asyncio.wait_for(c.reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 200")
    head = await asyncio.wait_for(c.reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 200") and b"x-tether-error" not in head.lower()
    c.writer.close()


async def test_connect_keeps_what_a_server_says_first(mesh: Mesh) -> None:
    async def banner(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"SSH-2.0-banner\r\n")
        await writer.drain()
        writer.write(await reader.readexactly(4))
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(banner, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    c = await RawClient.open(mesh.outbound.port)
    await asyncio.sleep(0)
    await c.send(b"CONNECT 127.0.0.1:%d HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n\r\n" % (port, port))
    head = await asyncio.wait_for(c.reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 200")
    assert await asyncio.wait_for(c.reader.readuntil(b"\r\n"), 5) == b"SSH-2.0-banner\r\n"
    await c.send(b"ping")
    assert await asyncio.wait_for(c.reader.readexactly(4), 5) == b"ping"
    assert await c.closed()
    server.close()


async def test_opaque_tcp_port() -> None:
    server, port = await _echo_server()
    tcp = await start_tcp_proxy(lambda: ("127.0.0.1", port))
    r, w = await asyncio.open_connection("127.0.0.1", tcp.port)
    w.write(b"raw bytes \x00\xff")
    await w.drain()
    assert await asyncio.wait_for(r.readexactly(12), 5) == b"raw bytes \x00\xff"
    w.close()
    await tcp.aclose()
    server.close()


# ---------------------------------------------------------------------------------------
# local replies


async def _assert_local(port: int, data: bytes, status: int, reason: str) -> dict[str, list[str]]:
    got, headers, body, _ = await request(port, data)
    assert got == status, (got, body)
    assert headers["x-tether-error"] == [reason]
    assert headers["content-type"] == ["application/json"]
    doc = json.loads(body)
    assert doc["error"] == reason and doc["message"]
    return headers


async def test_local_replies(mesh: Mesh) -> None:
    port = mesh.outbound.port
    await _assert_local(port, b"GET / HTTP/1.1\r\nHost: nosuch\r\n\r\n", 404, "unknown_service")
    await _assert_local(port, b"GET / HTTP/1.1\r\nHost: empty\r\n\r\n", 503, "no_healthy_upstream")
    # A closed port: connection refused.
    s, closed_port = await _echo_server()
    s.close()
    await s.wait_closed()
    mesh.add_cluster("dead", closed_port)
    await _assert_local(
        port, b"GET / HTTP/1.1\r\nHost: dead\r\n\r\n", 502, "upstream_connect_error"
    )

    async def hang_up(up: RawUpstream, data: bytes) -> bytes | None:
        return None

    async def never(up: RawUpstream, data: bytes) -> bytes | None:
        await asyncio.sleep(30)
        return b""

    reset = RawUpstream(hang_up)
    silent = RawUpstream(never)
    await reset.start()
    await silent.start()
    mesh.add_cluster("reset", reset.port)
    mesh.add_cluster("silent", silent.port)
    await _assert_local(port, b"GET / HTTP/1.1\r\nHost: reset\r\n\r\n", 502, "upstream_reset")
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    await _assert_local(port, b"GET / HTTP/1.1\r\nHost: silent\r\n\r\n", 504, "request_timeout")
    assert 0.5 <= loop.time() - t0 < 3.0
    await reset.aclose()
    await silent.aclose()
    text = mesh.stats.render_prometheus()
    assert (
        'tether_local_replies_total{listener="none",destination="none",subset="",'
        'reason="unknown_service"} 1'
    ) in text


async def test_egress_allowed_and_denied(mesh: Mesh) -> None:
    up = RawUpstream(_ok)
    await up.start()
    # An IP literal or a dotted name the directory does not know is egress.
    status, _, body, _ = await request(
        mesh.outbound.port,
        b"GET http://127.0.0.1:%d/x HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n\r\n" % (up.port, up.port),
    )
    assert status == 200 and body == b"ok"
    assert b"GET /x HTTP/1.1\r\n" in up.received
    stats = ProxyStats()
    deny = await start_outbound(mesh.directory, stats=stats, port=0, egress="deny")
    await _assert_local(
        deny.port,
        b"GET http://example.com/ HTTP/1.1\r\nHost: example.com\r\n\r\n",
        403,
        "egress_denied",
    )
    # Mesh names still work with egress denied.
    status, _, _, _ = await request(deny.port, b"GET / HTTP/1.1\r\nHost: orders\r\n\r\n")
    assert status == 200
    # A request to the proxy itself would loop.
    await _assert_local(
        mesh.outbound.port,
        b"GET / HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n\r\n" % mesh.outbound.port,
        508,
        "proxy_loop",
    )
    await deny.aclose()
    await up.aclose()


# ---------------------------------------------------------------------------------------
# malformed input: 400/431, connection closed, nothing forwarded

_H = b"Host: raw\r\n"
_TE = b"Transfer-Encoding: chunked\r\n"
MALFORMED = {
    "cl+te": (b"POST / HTTP/1.1\r\n" + _H + b"Content-Length: 3\r\n" + _TE + b"\r\n0\r\n\r\n", 400),
    "dup-cl": (
        b"POST / HTTP/1.1\r\n" + _H + b"Content-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
        400,
    ),
    "bad-chunk": (b"POST / HTTP/1.1\r\n" + _H + _TE + b"\r\nxyz\r\n", 400),
    "bare-lf": (b"GET / HTTP/1.1\nHost: raw\n\n", 400),
    "obs-fold": (b"GET / HTTP/1.1\r\n" + _H + b"X-A: b\r\n  c\r\n\r\n", 400),
    "space-colon": (b"GET / HTTP/1.1\r\nHost : raw\r\n\r\n", 400),
    "no-host": (b"GET / HTTP/1.1\r\n\r\n", 400),
    "long-line": (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\n" + _H + b"\r\n", 400),
    "big-head": (b"GET / HTTP/1.1\r\n" + _H + b"X-Big: " + b"b" * 70000 + b"\r\n\r\n", 431),
    "many-fields": (
        b"GET / HTTP/1.1\r\n"
        + _H
        + b"".join(b"X-%d: %s\r\n" % (i, b"v" * 1000) for i in range(70))
        + b"\r\n",
        431,
    ),
    "te-gzip": (
        b"POST / HTTP/1.1\r\n" + _H + b"Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
        501,
    ),
}


async def test_malformed_requests_are_refused_and_never_forwarded(mesh: Mesh) -> None:
    up = RawUpstream(_ok)
    await up.start()
    mesh.add_cluster("raw", up.port)
    for name, (data, status) in MALFORMED.items():
        for port in (mesh.outbound.port, mesh.inbound.port):
            c = await RawClient.open(port)
            try:
                await c.send(data)
            except ConnectionError:
                pass
            got, headers, body, _ = await c.response()
            assert got == status, (name, got, body)
            assert headers["connection"] == ["close"]
            assert "x-tether-error" in headers
            assert await c.closed(), name
            c.close()
    assert up.received == b""
    await up.aclose()

    # A bad chunk after a good start: the upstream saw a partial request, never a whole one.
    async def listen(up: RawUpstream, data: bytes) -> bytes | None:
        return b""

    up = RawUpstream(listen)
    await up.start()
    mesh.add_cluster("raw2", up.port)
    c = await RawClient.open(mesh.outbound.port)
    await c.send(b"POST / HTTP/1.1\r\nHost: raw2\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n")
    for _ in range(100):
        if up.received.endswith(b"ok\r\n"):
            break
        await asyncio.sleep(0.02)
    await c.send(b"zz\r\n")
    got, _, _, _ = await c.response()
    assert got == 400 and await c.closed()
    assert b"0\r\n\r\n" not in up.received
    await up.aclose()


# ---------------------------------------------------------------------------------------
# timeouts and drain


async def test_header_read_timeout_and_idle_timeout(mesh: Mesh) -> None:
    loop = asyncio.get_running_loop()
    c = await RawClient.open(mesh.outbound.port)
    t0 = loop.time()
    await c.send(b"GET / HTTP/1.1\r\nHost: ord")
    status, headers, _, _ = await c.response(timeout=5)
    assert status == 408 and headers["x-tether-error"] == ["request_header_timeout"]
    assert await c.closed()
    assert 0.4 <= loop.time() - t0 < 3.0
    c = await RawClient.open(mesh.outbound.port)
    await c.send(b"GET / HTTP/1.1\r\nHost: orders\r\n\r\n")
    assert (await c.response())[0] == 200
    t0 = loop.time()
    assert await c.closed(timeout=5)  # idle keep-alive connection closed by the proxy
    assert 0.8 <= loop.time() - t0 < 4.0


async def test_drain_finishes_in_flight_and_refuses_new(mesh: Mesh) -> None:
    busy = await RawClient.open(mesh.outbound.port)
    idle = await RawClient.open(mesh.outbound.port)
    await idle.send(b"GET / HTTP/1.1\r\nHost: orders\r\n\r\n")
    assert (await idle.response())[0] == 200
    await busy.send(b"GET /slow?s=0.3 HTTP/1.1\r\nHost: orders\r\n\r\n")
    await asyncio.sleep(0.05)
    drain = asyncio.create_task(mesh.outbound.drain(5.0))
    assert await idle.closed()
    status, headers, _body, _ = await busy.response()
    assert status == 200 and headers["connection"] == ["close"]
    assert await drain is True
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", mesh.outbound.port)


async def test_client_leaving_mid_response_is_not_reused(mesh: Mesh) -> None:
    async def big(up: RawUpstream, data: bytes) -> bytes | None:
        if b"\r\n\r\n" in data:
            return b"HTTP/1.1 200 OK\r\nContent-Length: 10000000\r\n\r\n" + b"x" * 100000
        return b""

    up = RawUpstream(big)
    await up.start()
    mesh.add_cluster("big", up.port)
    c = await RawClient.open(mesh.outbound.port)
    await c.send(b"GET / HTTP/1.1\r\nHost: big\r\n\r\n")
    await asyncio.wait_for(c.reader.readuntil(b"\r\n\r\n"), 5)
    (pool,) = [p for p in mesh.outbound.pools() if p.name.startswith("big")]
    assert pool.size == 1 and not pool.idle
    c.writer.transport.abort()
    for _ in range(100):
        if pool.size == 0:
            break
        await asyncio.sleep(0.02)
    assert pool.size == 0 and not pool.idle
    await up.aclose()


# ---------------------------------------------------------------------------------------
# streaming: bodies pass without being buffered whole

STREAM_BYTES = 128 * 1024 * 1024


def _reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the peak (VmHWM) restarts from the current RSS


def _rss_kib(field_name: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise AssertionError(field_name)


async def test_streaming_upload_and_download_keep_memory_bounded(mesh: Mesh) -> None:
    """128 MB up and 128 MB down through both hops; peak RSS grows by at most 16 MB.

    (The 1 GB each way check of the issue runs in `make bench`; on two shared cores it
    is too slow for the test suite.)
    """
    chunk = b"z" * 65536

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        assert b"Content-Length: %d" % STREAM_BYTES in head
        got = 0
        while got < STREAM_BYTES:
            data = await reader.read(262144)
            assert data
            got += len(data)
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nX-Got: %d\r\n\r\n" % (STREAM_BYTES, got)
        )
        for _ in range(STREAM_BYTES // len(chunk)):
            writer.write(chunk)
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    mesh.add_cluster("stream", server.sockets[0].getsockname()[1])
    # The upstream in this test is the raw server itself (outbound → raw), and the mesh
    # path adds the inbound hop in front of the same server.
    mesh.inbound.proxy.router.pool.port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
    for host in (b"stream", b"orders"):
        _reset_peak_rss()
        base = _rss_kib("VmRSS")
        r, w = await asyncio.open_connection("127.0.0.1", mesh.outbound.port)
        w.write(
            b"PUT /big HTTP/1.1\r\nHost: %s\r\nContent-Length: %d\r\n\r\n" % (host, STREAM_BYTES)
        )
        for _ in range(STREAM_BYTES // len(chunk)):
            w.write(chunk)
            await w.drain()
        head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 30)
        assert b" 200 " in head and b"X-Got: %d" % STREAM_BYTES in head
        got = 0
        while got < STREAM_BYTES:
            data = await asyncio.wait_for(r.read(262144), 30)
            assert data
            got += len(data)
        w.close()
        growth_mb = (_rss_kib("VmHWM") - base) / 1024
        print(f"{host!r}: peak RSS grew by {growth_mb:.1f} MB")
        assert growth_mb <= 16, f"{host!r}: peak RSS grew by {growth_mb:.1f} MB"
    server.close()


# ---------------------------------------------------------------------------------------
# pool behaviour and edge cases


async def test_idle_connection_closed_by_upstream_is_dropped_from_the_pool(mesh: Mesh) -> None:
    async def once(up: RawUpstream, data: bytes) -> bytes | None:
        return b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok" if b"\r\n\r\n" in data else b""

    up = RawUpstream(once, close_after=True)  # answers, then closes: keep-alive over
    await up.start()
    mesh.add_cluster("flaky", up.port)
    c = await RawClient.open(mesh.outbound.port)
    await c.send(b"GET /1 HTTP/1.1\r\nHost: flaky\r\n\r\n")
    assert (await c.response())[0] == 200
    (pool,) = [p for p in mesh.outbound.pools() if p.name.startswith("flaky")]
    for _ in range(100):
        if pool.size == 0:
            break
        await asyncio.sleep(0.01)
    assert pool.size == 0 and not pool.idle
    await c.send(b"GET /2 HTTP/1.1\r\nHost: flaky\r\n\r\n")
    status, _, body, _ = await c.response()
    assert status == 200 and body == b"ok"
    assert up.connections == 2
    c.close()
    await up.aclose()


async def test_reused_connection_closed_by_upstream_before_answer_is_retried(mesh: Mesh) -> None:
    seen = 0

    async def answer_then_drop_next(up: RawUpstream, data: bytes) -> bytes | None:
        nonlocal seen
        if b"\r\n\r\n" not in data:
            return b""
        seen += 1
        if seen == 2:
            return None  # the second request on the kept connection: hang up, no answer
        return b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"

    up = RawUpstream(answer_then_drop_next)
    await up.start()
    mesh.add_cluster("drop", up.port)
    for i in range(2):
        status, _, body, _ = await request(
            mesh.outbound.port, b"GET /%d HTTP/1.1\r\nHost: drop\r\n\r\n" % i
        )
        assert status == 200 and body == b"ok", i
    assert up.connections == 2  # the retry went out on a fresh connection
    await up.aclose()


async def test_pool_overflow_answers_503(mesh: Mesh) -> None:
    from proxy.pool import Pool, PoolPolicy

    async def never(up: RawUpstream, data: bytes) -> bytes | None:
        await asyncio.sleep(30)
        return b""

    up = RawUpstream(never)
    await up.start()
    mesh.add_cluster("tiny", up.port)
    router = mesh.outbound.router
    tiny = PoolPolicy(max_connections=1, max_pending=0)
    key = ("127.0.0.1", up.port, router.specs.default.pool_key)  # type: ignore[attr-defined]
    router._pools[key] = Pool("127.0.0.1", up.port, tiny, name="tiny")  # type: ignore[attr-defined]
    first = await RawClient.open(mesh.outbound.port)
    await first.send(b"GET / HTTP/1.1\r\nHost: tiny\r\n\r\n")
    await asyncio.sleep(0.1)
    await _assert_local(
        mesh.outbound.port, b"GET / HTTP/1.1\r\nHost: tiny\r\n\r\n", 503, "overflow"
    )
    first.close()
    await up.aclose()


async def test_unasked_101_and_head_through_chunked_upstream(mesh: Mesh) -> None:
    async def reply(up: RawUpstream, data: bytes) -> bytes | None:
        if b"\r\n\r\n" not in data:
            return b""
        if data.startswith(b"HEAD"):
            return b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        return b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\nConnection: upgrade\r\n\r\n"

    up = RawUpstream(reply)
    await up.start()
    mesh.add_cluster("odd", up.port)
    c = await RawClient.open(mesh.outbound.port)
    await c.send(b"HEAD / HTTP/1.1\r\nHost: odd\r\n\r\n")
    status, headers, _, _ = await c.response(head_request=True)
    assert status == 200 and "content-length" not in headers
    # The connection is still in step: the next response parses.
    await c.send(b"GET / HTTP/1.1\r\nHost: odd\r\n\r\n")
    status, headers, _, _ = await c.response()
    assert status == 502 and headers["x-tether-error"] == ["upstream_protocol_error"]
    c.close()
    # A local reply to HEAD has no body.
    c = await RawClient.open(mesh.outbound.port)
    await c.send(b"HEAD / HTTP/1.1\r\nHost: nosuch\r\n\r\nGET / HTTP/1.1\r\nHost: orders\r\n\r\n")
    status, headers, _, _ = await c.response(head_request=True)
    assert status == 404 and int(headers["content-length"][0]) > 0
    assert (await c.response())[0] == 200
    c.close()
    await up.aclose()


async def test_inbound_drain_and_prometheus_pools(mesh: Mesh) -> None:
    status, _, _, _ = await request(mesh.outbound.port, b"GET / HTTP/1.1\r\nHost: orders\r\n\r\n")
    assert status == 200
    text = mesh.stats.render_prometheus()
    assert 'tether_upstream_pool_connections{destination="app",state="idle"} 1' in text
    assert "tether_request_duration_seconds_bucket" in text
    (pool,) = [p for p in mesh.outbound.pools() if p.name.startswith("orders")]
    assert pool.size == 1
    assert await mesh.inbound.drain(2.0) is True
    # Drain closed the idle keep-alive connection; the pool noticed.
    for _ in range(100):
        if pool.size == 0:
            break
        await asyncio.sleep(0.01)
    assert pool.size == 0
    # The inbound no longer accepts: the outbound reports the connect failure.
    status, headers, _, _ = await request(
        mesh.outbound.port, b"GET / HTTP/1.1\r\nHost: orders\r\n\r\n"
    )
    assert status == 502 and headers["x-tether-error"] == ["upstream_connect_error"]


async def test_half_close_after_request_still_gets_the_response(mesh: Mesh) -> None:
    c = await RawClient.open(mesh.outbound.port)
    await c.send(b"GET /slow?s=0.1 HTTP/1.1\r\nHost: orders\r\n\r\n")
    c.writer.write_eof()
    status, headers, body, _ = await c.response()
    assert status == 200 and headers["connection"] == ["close"]
    assert app_seen(body)["path"] == "/slow?s=0.1"
    assert await c.closed()
