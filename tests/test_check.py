"""`tether check` against a healthy mesh (registry, control plane, a sidecar that acked)
and a broken one (nothing listening, a port taken, a clock off)."""

from __future__ import annotations

import base64
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import ControlPlaneProcess, RegistryProcess, run_tether
from tests.sidecar_harness import ProcessSet, poll
from tether.check import ca_health, run_checks
from tether.ports import free_port


@pytest.fixture
def healthy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[RegistryProcess, ControlPlaneProcess]]:
    registry = RegistryProcess(tmp_path / "registry")
    registry.start()
    cp = ControlPlaneProcess(registry.port, tmp_path / "cp.log")
    procs = ProcessSet(tmp_path, registry.port)
    # The mesh CA on, its root key kept encrypted in the registry (docs/identity.md).
    monkeypatch.setenv("TETHER_CA_ENCRYPTION_KEY", base64.b64encode(os.urandom(32)).decode())
    try:
        cp.start()
        procs.sidecar("orders", procs.app("orders"), "--controlplane", cp.url)
        yield registry, cp
    finally:
        procs.close()
        cp.stop()
        registry.stop()


def test_healthy_mesh_passes(healthy: tuple[RegistryProcess, ControlPlaneProcess]) -> None:
    registry, cp = healthy
    env = dict(os.environ, CONSUL_HTTP_ADDR=f"127.0.0.1:{registry.port}")
    port = free_port()

    def acked() -> bool:
        results = run_checks(f"http://127.0.0.1:{registry.port}", cp.url, None, [])
        return any(r.name == "sidecars acked" and r.ok for r in results)

    poll(acked, 30, "the sidecar acked")
    done = run_tether("check", "--controlplane", cp.url, "--port", str(port), env=env)
    assert done.returncode == 0, done.stdout
    lines = done.stdout.splitlines()
    assert any(line.startswith("[pass] registry: ") and "version" in line for line in lines)
    assert "[pass] registry leader" in done.stdout
    assert f"[pass] control plane: {cp.url} answered 200" in done.stdout
    assert "[pass] sidecars acked: 1 connected" in done.stdout
    assert "[pass] mesh CA: trust domain " in done.stdout and "1 root(s)" in done.stdout
    assert "[pass] clock vs registry" in done.stdout
    assert f"[pass] port {port}: free" in done.stdout
    assert "FAIL" not in done.stdout


def test_broken_mesh_fails_with_hints(
    healthy: tuple[RegistryProcess, ControlPlaneProcess],
) -> None:
    registry, _ = healthy
    dead_registry, dead_cp = free_port(), free_port()
    env = dict(os.environ, CONSUL_HTTP_ADDR=f"127.0.0.1:{dead_registry}")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        done = run_tether("check", "--controlplane", f"http://127.0.0.1:{dead_cp}",
                          "--port", str(port), env=env)  # fmt: skip
    assert done.returncode == 1
    out = done.stdout
    assert f"[FAIL] registry: http://127.0.0.1:{dead_registry} unreachable" in out
    assert "hint: start it (tether registry) or set CONSUL_HTTP_ADDR" in out
    assert "[FAIL] control plane" in out and "hint: start it (tether controlplane)" in out
    assert f"[FAIL] port {port}: in use on 127.0.0.1" in out
    assert "[skip] mesh CA: the control plane is not reachable" in out
    # A clock a minute ahead of the registry's.
    results = run_checks(
        f"http://127.0.0.1:{registry.port}", None, None, [], now=lambda: time.time() + 60
    )
    (skew,) = [r for r in results if r.name == "clock vs registry"]
    assert skew.ok is False and "sync the clocks" in skew.hint
    # HTTP dates have whole seconds: 60 s ahead reads as 59 to 61.
    assert skew.detail in {f"this host is +{n}s off" for n in (59, 60, 61)}, skew.detail


def test_ca_off_is_skipped_and_an_old_root_fails(
    healthy: tuple[RegistryProcess, ControlPlaneProcess],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    registry, cp = healthy
    # The same CA seen from ten years on: its root has expired, so it fails with a hint.
    later = ca_health(cp.url, None, lambda: time.time() + 10 * 365 * 86400)
    assert later.ok is False and "rotate the root" in later.hint
    monkeypatch.delenv("TETHER_CA_ENCRYPTION_KEY")
    plain = ControlPlaneProcess(registry.port, tmp_path / "plain.log")
    try:
        plain.start()
        off = ca_health(plain.url, None, time.time)
    finally:
        plain.stop()
    assert (
        off.ok is None and off.detail.startswith("off") and "TETHER_CA_ENCRYPTION_KEY" in off.hint
    )
