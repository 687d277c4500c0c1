"""Issue 18, the data plane: each finding over real listeners, sockets and upstreams.

Route regexes on RE2, response head limits, interim responses, Connection-named
response fields, the inbound Host, h2c upgrades, the head cache's pipelined twin, and
the egress guard. (The sidecar process's memory under an endless response head and the
guard inside a real sidecar: tests/test_sidecar_hardening_e2e.py.)
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable

import pytest

from proxy.balance import Endpoint
from proxy.cluster import Cluster, StaticDirectory
from proxy.egress import EgressGuard
from proxy.errors import PolicyError
from proxy.listener import start_outbound
from proxy.policy import Policy
from proxy.policy_router import start_policy_outbound
from tests import test_proxy_http
from tests.sidecar_harness import Mesh
from tests.test_cp_push import doc, snapshot, split
from tests.test_proxy_http import (
    RawClient,
    RawUpstream,
    _assert_local,
    _ok,
    app_seen,
    request,
)

# The real outbound -> inbound -> app mesh of tests/test_proxy_http.py.
app_port = test_proxy_http.app_port
mesh = test_proxy_http.mesh

pytestmark = pytest.mark.timeout(60)


# -- route regexes run on RE2 ------------------------------------------------------------


def _regex_route(pattern: str) -> dict[str, object]:
    return doc(
        "Route",
        "orders",
        {
            "rules": [
                {
                    "match": {"headers": [{"name": "x-user", "regex": pattern}]},
                    "destination": {"subset": "v2"},
                    "responseHeaders": {"set": {"x-matched": "yes"}},
                }
            ]
        },
    )


async def test_route_regexes_run_in_linear_time_and_re2_refusals_are_nacked(mesh: Mesh) -> None:
    orders = Cluster("orders", "default")
    orders.set_endpoints(
        [
            Endpoint("o1", "127.0.0.1", mesh.inbound.port, meta={"version": "v1"}),
            Endpoint("o2", "127.0.0.1", mesh.inbound.port, meta={"version": "v2"}),
        ]
    )
    directory = StaticDirectory([orders])
    policy = Policy(directory)
    await policy.apply(snapshot(1, [split("orders", 100, 0), _regex_route("(a+)+$")]))
    listener = await start_policy_outbound(directory, policy, port=0)
    try:
        # Backtracking `re` needs about 2^40 steps for this value: the request would
        # hang the sidecar (the client's 5 s timeout would fire). RE2 answers at once.
        evil = b"a" * 40 + b"!"
        get = b"GET /x HTTP/1.1\r\nHost: orders\r\nX-User: %s\r\n\r\n"
        status, headers, _, _ = await request(listener.port, get % evil)
        assert status == 200 and "x-matched" not in headers
        status, headers, _, _ = await request(listener.port, get % b"aaaa")
        assert status == 200 and headers["x-matched"] == ["yes"]
        # A pattern RE2 refuses (a backreference; Python's `re` takes it) is NACKed,
        # naming the field, and the running policy stays.
        with pytest.raises(PolicyError, match=r"spec\.rules\[0\]\.match\.headers\[0\]\.regex"):
            await policy.apply(snapshot(2, [split("orders", 100, 0), _regex_route(r"(a)\1")]))
        assert policy.version == 1
        status, headers, _, _ = await request(listener.port, get % b"aa")
        assert headers["x-matched"] == ["yes"]
    finally:
        await listener.aclose()


# -- response heads ----------------------------------------------------------------------


async def _scripted(
    mesh: Mesh, reply: Callable[[RawUpstream, bytes], Awaitable[bytes | None]]
) -> RawUpstream:
    up = RawUpstream(reply)
    await up.start()
    mesh.add_cluster("scripted", up.port)
    return up


async def test_an_endless_response_field_is_cut_at_64_kib_with_502(mesh: Mesh) -> None:
    sent = [0]
    upstream_closed = asyncio.Event()

    async def endless(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nX-Endless: ")
        try:
            for _ in range(4096):  # at most 256 MiB
                writer.write(b"a" * 65536)
                await writer.drain()
                sent[0] += 65536
        except ConnectionError:
            pass
        finally:
            upstream_closed.set()
            writer.close()

    server = await asyncio.start_server(endless, "127.0.0.1", 0)
    mesh.add_cluster("endless", server.sockets[0].getsockname()[1])
    try:
        await _assert_local(
            mesh.outbound.port,
            b"GET / HTTP/1.1\r\nHost: endless\r\n\r\n",
            502,
            "upstream_response_too_large",
        )
        await asyncio.wait_for(upstream_closed.wait(), 10)
        # The sidecar closed the upstream connection after about 64 KiB (plus what
        # the socket buffers held), not at the end of the 256 MiB.
        assert sent[0] < 32 * 1024 * 1024
    finally:
        server.close()


async def test_response_with_too_many_fields_is_502(mesh: Mesh) -> None:
    fields = b"".join(b"X-F%d: v\r\n" % i for i in range(101))

    async def many(up: RawUpstream, data: bytes) -> bytes | None:
        return b"HTTP/1.1 200 OK\r\n" + fields + b"Content-Length: 0\r\n\r\n"

    up = await _scripted(mesh, many)
    await _assert_local(
        mesh.outbound.port,
        b"GET / HTTP/1.1\r\nHost: scripted\r\n\r\n",
        502,
        "upstream_response_too_large",
    )
    await up.aclose()


async def test_a_field_named_by_a_later_connection_field_is_dropped(mesh: Mesh) -> None:
    async def named(up: RawUpstream, data: bytes) -> bytes | None:
        return (
            b"HTTP/1.1 200 OK\r\nX-Before: 1\r\nConnection: x-before, X-After\r\n"
            b"X-After: secret\r\nX-Kept: k\r\nContent-Length: 2\r\n\r\nok"
        )

    up = await _scripted(mesh, named)
    status, headers, body, _ = await request(
        mesh.outbound.port, b"GET / HTTP/1.1\r\nHost: scripted\r\n\r\n"
    )
    assert status == 200 and body == b"ok"
    assert "x-after" not in headers and "x-before" not in headers
    assert headers["x-kept"] == ["k"]
    await up.aclose()


# -- interim responses -------------------------------------------------------------------


async def _exchange(mesh: Mesh, data: bytes) -> tuple[list[int], dict[str, list[str]], bytes]:
    """One request through the outbound listener: every status the client read (1xx
    included), and the final response's headers and body."""
    c = await RawClient.open(mesh.outbound.port)
    await c.send(data)
    statuses = []
    while True:
        status, headers, body, _ = await c.response()
        statuses.append(status)
        if status >= 200:
            break
    c.close()
    return statuses, headers, body


async def test_interim_responses_are_relayed_only_when_meaningful(mesh: Mesh) -> None:
    async def interim(up: RawUpstream, data: bytes) -> bytes | None:
        if b"\r\n\r\n" not in data:
            return b""
        hint = b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>\r\n\r\n"
        return (
            b"HTTP/1.1 100 Continue\r\n\r\n" * 2
            + b"HTTP/1.1 102 Processing\r\n\r\n"
            + hint * 3
            + b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
        )

    up = await _scripted(mesh, interim)
    for expect, first in ((b"", []), (b"Expect: 100-continue\r\n", [100])):
        statuses, _, body = await _exchange(
            mesh, b"POST / HTTP/1.1\r\nHost: scripted\r\n%sContent-Length: 1\r\n\r\nx" % expect
        )
        # 100 only to a client that asked for it, once; 102 never; 103 at most twice.
        assert statuses == [*first, 103, 103, 200] and body == b"ok"
    await up.aclose()


async def test_a_flood_of_interim_responses_fails_the_exchange(mesh: Mesh) -> None:
    async def flood(up: RawUpstream, data: bytes) -> bytes | None:
        if b"\r\n\r\n" not in data:
            return b""
        return b"HTTP/1.1 100 Continue\r\n\r\n" * 1000 + b"HTTP/1.1 200 OK\r\n\r\n"

    up = await _scripted(mesh, flood)
    statuses, headers, body = await _exchange(
        mesh, b"POST / HTTP/1.1\r\nHost: scripted\r\nExpect: 100-continue\r\n\r\n"
    )
    assert statuses == [100, 502]
    assert headers["x-tether-error"] == ["upstream_protocol_error"]
    assert "interim" in json.loads(body)["message"]
    await up.aclose()


# -- request heads -----------------------------------------------------------------------


async def test_inbound_refuses_a_host_that_is_not_an_authority(mesh: Mesh) -> None:
    for host in (b"echo/x?y", b"x@echo", b"echo#f"):
        await _assert_local(
            mesh.inbound.port, b"GET / HTTP/1.1\r\nHost: %s\r\n\r\n" % host, 400, "bad_request"
        )
    status, _, body, _ = await request(mesh.inbound.port, b"GET / HTTP/1.1\r\nHost: echo\r\n\r\n")
    assert status == 200 and app_seen(body)["h"]["host"] == "echo"


async def test_h2c_upgrades_are_stripped_and_the_request_forwarded(mesh: Mesh) -> None:
    up = await _scripted(mesh, _ok)
    c = await RawClient.open(mesh.outbound.port)
    await c.send(
        b"POST /h HTTP/1.1\r\nHost: scripted\r\nConnection: Upgrade, HTTP2-Settings\r\n"
        b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\nContent-Length: 4\r\n\r\n"
        b"bodyGET /next HTTP/1.1\r\nHost: scripted\r\n\r\n"
    )
    for _ in range(2):
        status, _headers, body, _ = await c.response()
        assert status == 200 and body == b"ok"
    c.close()
    sent = bytes(up.received).lower()
    assert b"upgrade" not in sent and b"http2-settings" not in sent
    assert b"\r\n\r\nbodyget /next http/1.1\r\n" in sent
    # Through the inbound listener to the app as well: no upgrade reaches it.
    status, _, body, _ = await request(
        mesh.inbound.port,
        b"GET / HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n",
    )
    seen = app_seen(body)["h"]
    assert status == 200 and "upgrade" not in seen and "connection" not in seen
    await up.aclose()


async def test_a_pipelined_head_without_request_line_is_refused_not_replayed(mesh: Mesh) -> None:
    """Issue 18: after a head was cached, its twin without method and target was taken
    as a copy of it (two 200s, two requests at the app)."""
    up = await _scripted(mesh, _ok)
    good = b"GET /a HTTP/1.1\r\nHost: scripted\r\nX-Request-Id: 1\r\n\r\n"
    for _ in range(2):
        status, _, _, _ = await request(mesh.outbound.port, good)
        assert status == 200
    c = await RawClient.open(mesh.outbound.port)
    await c.send(good + b"HTTP/1.1\r\nHost: scripted\r\nX-Request-Id: 1\r\n\r\n")
    assert (await c.response())[0] == 200
    status, headers, _, _ = await c.response()
    assert status == 400 and headers["x-tether-error"] == ["bad_request"]
    assert await c.closed()
    c.close()
    assert bytes(up.received).count(b"GET /a HTTP/1.1") == 3
    await up.aclose()


# -- egress to the mesh's own control surfaces ---------------------------------------------


async def test_egress_guard_refuses_protected_addresses_however_named(mesh: Mesh) -> None:
    control = RawUpstream(_ok)  # stands for the control plane's API
    await control.start()
    other = RawUpstream(_ok)
    await other.start()
    guard = EgressGuard()
    await guard.protect("the control plane", "127.0.0.1", control.port)
    guard.protect_local("this sidecar's admin listener", mesh.inbound.port)
    outbound = await start_outbound(mesh.directory, port=0, egress_guard=guard)
    port = outbound.port
    try:
        # `localhost` is one label, a mesh name: never egress (404 unknown_service).
        await _assert_local(
            port, b"GET / HTTP/1.1\r\nHost: localhost:%d\r\n\r\n" % control.port,
            404, "unknown_service",
        )  # fmt: skip
        # `127.1` is a name (not an IP literal) that getaddrinfo resolves to 127.0.0.1.
        for name in (b"127.0.0.1", b"127.1", b"[::ffff:127.0.0.1]"):
            authority = b"%s:%d" % (name, control.port)
            await _assert_local(
                port,
                b"GET http://%s/v1/x HTTP/1.1\r\nHost: %s\r\n\r\n" % (authority, authority),
                403,
                "egress_denied",
            )
        await _assert_local(
            port, b"GET / HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n\r\n" % mesh.inbound.port,
            403, "egress_denied",
        )  # fmt: skip
        c = await RawClient.open(port)
        await c.send(b"CONNECT 127.0.0.1:%d HTTP/1.1\r\nHost: x\r\n\r\n" % control.port)
        status, headers, _, _ = await c.response()
        c.close()
        assert status == 403 and headers["x-tether-error"] == ["egress_denied"]
        assert control.received == b""  # connected, checked, cut: not one byte sent
        # Egress elsewhere is untouched, pooled and tunnelled alike.
        authority = b"127.0.0.1:%d" % other.port
        status, _, body, _ = await request(
            port, b"GET http://%s/ HTTP/1.1\r\nHost: %s\r\n\r\n" % (authority, authority)
        )
        assert status == 200 and body == b"ok"
        c = await RawClient.open(port)
        await c.send(b"CONNECT %s HTTP/1.1\r\nHost: %s\r\n\r\n" % (authority, authority))
        head = await asyncio.wait_for(c.reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 200 ")
        c.close()
    finally:
        await outbound.aclose()
        await control.aclose()
        await other.aclose()
