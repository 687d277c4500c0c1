"""Status endpoints and the headers every read carries."""

from __future__ import annotations

from typing import Any

import aiohttp

from registry.server import RegistryServer


async def test_leader_is_our_address(consul_client: Any, registry: RegistryServer) -> None:
    assert await consul_client.status.leader() == f"127.0.0.1:{registry.port}"
    assert await consul_client.status.peers() == [f"127.0.0.1:{registry.port}"]


async def test_reads_carry_consul_headers(registry: RegistryServer) -> None:
    async with aiohttp.ClientSession() as s:
        async with s.get(f"http://127.0.0.1:{registry.port}/v1/status/leader") as r:
            assert r.status == 200
            assert int(r.headers["X-Consul-Index"]) >= 1
            assert r.headers["X-Consul-KnownLeader"] == "true"
            assert r.headers["X-Consul-LastContact"] == "0"
