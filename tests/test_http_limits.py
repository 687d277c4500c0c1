"""Listener limits on the registry, the control plane and the sidecar admin, over raw sockets.

Caps refuse the connection over them (429 per client address, 503 in all) while the ones
already open are served; a slow or idle connection is cut after the idle timeout while a
parked blocking query is not; a slow body gets 408; error answers never quote the request.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from controlplane.server import ControlPlane, ControlPlaneSpec, RegistryAddress
from proxy.admin import AdminServer
from registry.http import RegistrySpec
from registry.server import RegistryServer
from tether.http_limits import ConnectionGate, ListenerLimits

Stream = tuple[asyncio.StreamReader, asyncio.StreamWriter]


async def connect(port: int, source: str = "127.0.0.1") -> Stream:
    return await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))


async def exchange(port: int, request: bytes, source: str = "127.0.0.1") -> bytes:
    """Send `request` on a new connection and read until the server closes it."""
    reader, writer = await connect(port, source)
    try:
        writer.write(request)
        return await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()


def status(answer: bytes) -> int:
    """The status code of an answer (aiohttp answers an unparsable request as HTTP/1.0)."""
    line = answer.split(b"\r\n", 1)[0]
    return int(line.split(b" ")[1]) if line.startswith(b"HTTP/1.") else 0


def get(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n".encode()


async def closed_by_server(reader: asyncio.StreamReader) -> bytes:
    """What the server sent before closing (bounded: a test fails, never hangs)."""
    return await asyncio.wait_for(reader.read(), 10)


@pytest.fixture
async def small_registry(tmp_path: Path) -> AsyncIterator[RegistryServer]:
    limits = ListenerLimits(
        max_connections=50, max_connections_per_client=4, idle_timeout=0.5, body_timeout=0.5
    )
    server = RegistryServer(RegistrySpec(port=0, data_dir=tmp_path, node="n1"), limits)
    await server.start()
    try:
        yield server
    finally:
        await server.aclose()


async def test_gate_counts_per_client_and_in_all() -> None:
    gate = ConnectionGate(ListenerLimits(max_connections=3, max_connections_per_client=2))
    assert gate.admit("a") is None and gate.admit("a") is None
    assert gate.admit("a") == 429
    assert gate.admit("b") is None
    assert gate.admit("c") == 503
    gate.release("a")
    assert gate.admit("c") is None and gate.admit("a") == 503
    assert repr(gate) == "<ConnectionGate open=3/3 clients=3 refused=3>"
    with pytest.raises(ValueError, match="idle_timeout"):
        ListenerLimits(idle_timeout=0)


async def test_registry_caps_each_client_and_keeps_serving_the_rest(
    small_registry: RegistryServer,
) -> None:
    port = small_registry.port
    index = small_registry.store.index
    # Four blocking queries, parked for a minute: one client's whole share.
    parked: list[Stream] = []
    for _ in range(4):
        reader, writer = await connect(port)
        writer.write(get(f"/v1/kv/watched?index={index}&wait=60s"))
        parked.append((reader, writer))
    # A slow-loris head and an idle connection from another address, opened alongside.
    slow_r, slow_w = await connect(port, "127.0.0.3")
    slow_w.write(b"GET /v1/status/leader HTTP/1.1\r\nHost: t\r\n")
    idle_r, idle_w = await connect(port, "127.0.0.3")
    # The fifth connection from the same address is refused at once, and says why.
    refused = await exchange(port, get("/v1/status/leader"))
    assert refused.startswith(b"HTTP/1.1 429 Too Many Requests\r\n"), refused
    assert b"at most 4" in refused
    # Another address is served meanwhile.
    ok = await exchange(port, get("/v1/status/leader"), source="127.0.0.2")
    assert ok.startswith(b"HTTP/1.1 200 OK\r\n"), ok
    # The slow head and the idle connection are cut (no answer to a head never finished);
    # the parked blocking queries, being answered, are not.
    assert await closed_by_server(slow_r) == b""
    assert await closed_by_server(idle_r) == b""
    slow_w.close()
    idle_w.close()
    assert all(not r.at_eof() for r, _ in parked)
    # A write wakes them: each gets its answer.
    async with asyncio.timeout(10):
        reader, writer = await connect(port, "127.0.0.2")
        writer.write(b"PUT /v1/kv/watched HTTP/1.1\r\nHost: t\r\nContent-Length: 1\r\n\r\nx")
        assert (await reader.readline()).startswith(b"HTTP/1.1 200")
        writer.close()
    for reader, writer in parked:
        assert (await asyncio.wait_for(reader.readline(), 10)).startswith(b"HTTP/1.1 200")
        writer.close()
    # Their slots are free again.
    async with asyncio.timeout(10):
        while True:
            answer = await exchange(port, get("/v1/status/leader"))
            if answer.startswith(b"HTTP/1.1 200"):
                break
            await asyncio.sleep(0.01)


async def test_slow_body_gets_408_and_long_lines_are_not_quoted_back(
    small_registry: RegistryServer,
) -> None:
    port = small_registry.port
    answer = await exchange(
        port, b"PUT /v1/kv/k HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\nonly some"
    )
    assert status(answer) == 408, answer
    long_line = b"GET /" + b"a" * 10_000 + b" HTTP/1.1\r\nHost: t\r\n\r\n"
    answer = await exchange(port, long_line)
    assert status(answer) == 400, answer[:200]
    assert b"aaaa" not in answer
    long_field = b"GET / HTTP/1.1\r\nHost: t\r\nX-Big: " + b"b" * 10_000 + b"\r\n\r\n"
    answer = await exchange(port, long_field)
    assert status(answer) == 400 and b"bbbb" not in answer, answer[:200]


async def test_control_plane_caps_connections_in_all(registry: RegistryServer) -> None:
    limits = ListenerLimits(max_connections=3, idle_timeout=30)
    spec = ControlPlaneSpec(port=0, registry=RegistryAddress(port=registry.port), limits=limits)
    cp = ControlPlane(spec)
    await cp.start()
    held: list[Stream] = []
    try:
        for _ in range(3):
            held.append(await connect(cp.port))
        refused = await exchange(cp.port, get("/api/v1/health"), source="127.0.0.2")
        assert refused.startswith(b"HTTP/1.1 503 Service Unavailable\r\n"), refused
        # The connections already open are served.
        reader, writer = held[0]
        writer.write(get("/api/v1/health"))
        assert (await closed_by_server(reader)).startswith(b"HTTP/1.1 200")
        long_line = b"GET /api/" + b"c" * 10_000 + b" HTTP/1.1\r\nHost: t\r\n\r\n"
        async with asyncio.timeout(10):
            while True:  # until the server has seen the first connection end
                answer = await exchange(cp.port, long_line)
                if status(answer) != 503:
                    break
                await asyncio.sleep(0.01)
        assert status(answer) == 400 and b"cccc" not in answer, answer[:200]
    finally:
        for _, writer in held:
            writer.close()
        await cp.aclose()


class QuietSource:
    """The admin listener's source; its content is not the point here."""

    def readiness(self) -> tuple[bool, str]:
        return True, "LIVE"

    def clusters(self) -> list[dict[str, Any]]:
        return []

    def config_dump(self) -> dict[str, Any]:
        return {}

    def prometheus(self) -> str:
        return ""


async def test_sidecar_admin_caps_and_times_out() -> None:
    limits = ListenerLimits(max_connections=2, idle_timeout=0.5)
    admin = AdminServer(QuietSource(), port=0, limits=limits)
    await admin.start()
    try:
        idle = [await connect(admin.port) for _ in range(2)]
        refused = await exchange(admin.port, get("/ready"))
        assert refused.startswith(b"HTTP/1.1 503"), refused
        for reader, writer in idle:  # cut by the idle timeout
            assert await closed_by_server(reader) == b""
            writer.close()
        async with asyncio.timeout(10):
            while True:
                answer = await exchange(admin.port, get("/ready"))
                if answer.startswith(b"HTTP/1.1 200"):
                    break
                await asyncio.sleep(0.01)
        answer = await exchange(admin.port, b"GET /" + b"d" * 10_000 + b" HTTP/1.1\r\n\r\n")
        assert status(answer) == 400 and b"dddd" not in answer, answer[:200]
    finally:
        await admin.aclose()
