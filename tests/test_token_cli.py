"""`tether token create`: a real CLI process against a real registry with ACLs on makes a
token whose service identity is the service asked for, bound to its namespace."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import MANAGEMENT_TOKEN, ROOT, RegistryProcess

pytestmark = pytest.mark.timeout(60)


def tether(port: int, token: str | None, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "CONSUL_HTTP_TOKEN"}
    env["CONSUL_HTTP_ADDR"] = f"127.0.0.1:{port}"
    if token is not None:
        env["CONSUL_HTTP_TOKEN"] = token
    return subprocess.run(
        [sys.executable, "-m", "tether.cli", "token", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )


def get(port: int, path: str, token: str) -> Any:
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}", headers={"X-Consul-Token": token}
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


@pytest.fixture
def registry_process(tmp_path: Path) -> Any:
    reg = RegistryProcess(tmp_path / "reg", token=MANAGEMENT_TOKEN)
    reg.start()
    try:
        yield reg
    finally:
        reg.stop()


def test_token_create_makes_a_service_identity_bound_to_its_namespace(
    registry_process: RegistryProcess,
) -> None:
    port = registry_process.port
    done = tether(port, MANAGEMENT_TOKEN, "create", "--service", "orders", "--namespace", "shop")
    assert done.returncode == 0, done.stderr
    secret = done.stdout.strip()
    assert len(secret) == 36 and secret.count("-") == 4, done.stdout
    me = get(port, "/v1/acl/token/self", secret)
    assert me["ServiceIdentities"] == [{"ServiceName": "orders"}]
    binding = get(port, f"/v1/kv/tether/ca/tokens/{me['AccessorID']}?raw", MANAGEMENT_TOKEN)
    assert binding == {"service": "orders", "namespace": "shop"}


def test_token_create_without_acl_write_is_one_line_and_leaves_nothing(
    registry_process: RegistryProcess,
) -> None:
    port = registry_process.port
    before = get(port, "/v1/acl/tokens", MANAGEMENT_TOKEN)
    done = tether(port, None, "create", "--service", "orders")
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    assert done.stderr.startswith("Error:") and len(done.stderr.strip().splitlines()) == 1
    bad = tether(port, MANAGEMENT_TOKEN, "create", "--service", "Not A Name")
    assert bad.returncode == 1 and "--service" in bad.stderr
    assert get(port, "/v1/acl/tokens", MANAGEMENT_TOKEN) == before
