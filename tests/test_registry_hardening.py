"""Registry robustness (issue 18): nesting bombs in JSON and HCL, a damaged data file.

Over real sockets and real processes: a body nested 100,000 deep is a 400 that says so
on every route that parses JSON (and in ACL rules' HCL), never a 500, and the registry
keeps serving; a damaged `registry.db` stops `tether registry` with one line saying
what is wrong and what to do, and a non-zero exit status.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiohttp
import consul.aio
import pytest

from registry.server import RegistryServer
from tests.conftest import MANAGEMENT_TOKEN, ROOT, RegistryProcess
from tether.ports import free_port

MGMT = MANAGEMENT_TOKEN
DEEP = 100_000
BOMB = "[" * DEEP + "]" * DEEP

# Every route whose body is JSON the registry parses (path parameters filled in).
JSON_ROUTES = (
    "/v1/agent/service/register",
    "/v1/agent/check/register",
    "/v1/agent/check/update/c1",
    "/v1/catalog/register",
    "/v1/catalog/deregister",
    "/v1/txn",
    "/v1/session/create",
    "/v1/acl/policy",
    "/v1/acl/policy/00000000-0000-0000-0000-000000000001",
    "/v1/acl/token",
    "/v1/acl/token/00000000-0000-0000-0000-000000000002",
    "/v1/acl/token/00000000-0000-0000-0000-000000000002/clone",
)


@pytest.fixture
async def http(secured_registry: RegistryServer) -> AsyncIterator[aiohttp.ClientSession]:
    url = f"http://127.0.0.1:{secured_registry.port}"
    async with aiohttp.ClientSession(url, headers={"X-Consul-Token": MGMT}) as s:
        yield s


async def test_json_nested_100000_deep_is_400_on_every_json_route(
    secured_registry: RegistryServer, http: aiohttp.ClientSession
) -> None:
    # Every PUT route that takes a JSON body is in the list above (the rest take raw bytes
    # or no body): a new JSON route must be added there.
    puts = {
        r.resource.canonical
        for r in secured_registry.app.router.routes()
        if r.method == "PUT" and r.resource is not None
    }
    raw_or_none = {p for p in puts if p.startswith(("/v1/kv/", "/v1/event/"))}
    assert {p for p in puts if "{" not in p} - raw_or_none - set(JSON_ROUTES) <= {
        "/v1/agent/maintenance",
        "/v1/acl/bootstrap",
    }
    for path in JSON_ROUTES:
        async with http.put(path, data=BOMB) as r:
            text = await r.text()
            assert r.status == 400, (path, r.status, text[:200])
            assert "nested deeper than" in text, (path, text[:200])
    # Inside an object too, and under a field the handler reads.
    wrapped = '{"Name": "x", "Meta": ' + BOMB + "}"
    async with http.put("/v1/agent/service/register", data=wrapped) as r:
        assert r.status == 400
    # Nothing broke: the registry still answers and stored nothing.
    async with consul.aio.Consul(port=secured_registry.port, token=MGMT) as c:
        assert await c.agent.services() == {}
        assert await c.kv.put("still", "ok") is True


async def test_deeply_nested_acl_rules_are_400_in_hcl_and_json(
    http: aiohttp.ClientSession,
) -> None:
    hcl = "a {" * DEEP + "}" * DEEP
    as_json_text = '{"key": ' + BOMB + "}"
    for rules in (hcl, as_json_text):
        body = json.dumps({"Name": "deep", "Rules": rules})
        async with http.put("/v1/acl/policy", data=body) as r:
            text = await r.text()
            assert r.status == 400, text[:200]
            assert "Failed to parse ACL rules" in text and "nested deeper than" in text
    # A reasonable policy is still accepted, and the deep ones left nothing behind.
    body = json.dumps({"Name": "ok", "Rules": 'key_prefix "a/" { policy = "read" }'})
    async with http.put("/v1/acl/policy", data=body) as r:
        assert r.status == 200
    async with http.get("/v1/acl/policies") as r:
        names = {p["Name"] for p in await r.json()}
    assert names == {"global-management", "ok"}


def _run_registry(data_dir: Path) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "tether.cli", "registry", "--data-dir", str(data_dir)]
    cmd += ["--port", str(free_port()), "--node", "node1"]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60)


def _assert_one_line_error(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "registry.db" in lines[0] and "unreadable" in lines[0]
    assert "restore" in lines[0] and "--data-dir" in lines[0]


def test_a_file_that_is_not_a_database_stops_start_up_with_one_line(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "registry.db").write_bytes(b"this is no SQLite file\n" * 400)
    _assert_one_line_error(_run_registry(data))


async def test_a_damaged_page_stops_start_up_with_one_line(
    registry_process: Callable[..., RegistryProcess],
) -> None:
    rp = registry_process()
    async with consul.aio.Consul(port=rp.port) as c:
        for i in range(200):
            await c.kv.put(f"app/key{i:03d}", "x" * 200)
    rp.stop()
    db = rp.data_dir / "registry.db"
    raw = bytearray(db.read_bytes())
    assert len(raw) > 3 * 4096
    raw[4096 : len(raw) - 4096] = b"\xa5" * (len(raw) - 8192)  # every page but the first, last
    db.write_bytes(bytes(raw))
    _assert_one_line_error(_run_registry(rp.data_dir))
