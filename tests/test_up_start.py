"""Start-up failures over real processes: every server command says what went wrong in
one line and exits 1, and `tether up` stops (writing nothing anywhere) when any of its
children cannot start."""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.conftest import ROOT, RegistryProcess, black_hole_ports, free_port, run_tether
from tether.launcher import Launcher, ProcessSpec
from tether.up import Mesh, UpError, UpSpec

pytestmark = pytest.mark.timeout(120)


@contextmanager
def held_port() -> Iterator[int]:
    """A port some other process (here: a plain listener) already holds."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield int(s.getsockname()[1])


def one_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1, text
    return lines[0]


def registry_state(port: int) -> tuple[str, bytes, bytes]:
    """The raft index, the catalog and the KV of a registry: what a write would move."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/catalog/services") as resp:
        index, services = resp.headers["X-Consul-Index"], resp.read()
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/kv/?recurse") as resp:
            kv = resp.read()
    except urllib.error.HTTPError as exc:  # 404: an empty KV
        kv = str(exc.code).encode()
    return index, services, kv


def test_up_on_another_registrys_port_writes_nothing_there(
    registry_process: Callable[..., RegistryProcess],
) -> None:
    """The user's own registry holds the port (with their own 50/50 split in its KV):
    `tether up` stops with one line naming the part, the cause and the fix."""
    theirs = registry_process()
    req = urllib.request.Request(
        f"http://127.0.0.1:{theirs.port}/v1/kv/tether/v1/resources/TrafficSplit/default/orders",
        data=json.dumps({"weights": "50/50"}).encode(),
        method="PUT",
    )
    urllib.request.urlopen(req).close()
    before = registry_state(theirs.port)
    r = run_tether("up", "--no-view", "--registry-port", str(theirs.port), env=dict(os.environ))
    assert r.returncode == 1, r.stdout + r.stderr
    assert one_line(r.stderr) == (
        f"tether up: registry cannot start: port {theirs.port} is in use; "
        "pass --registry-port 0 (any free port)"
    )
    assert "ready" not in r.stdout
    assert registry_state(theirs.port) == before


def test_up_with_the_control_plane_port_taken_starts_nothing() -> None:
    with held_port() as port:
        r = run_tether(
            "up", "--no-view", "--registry-port", "0", "--controlplane-port", str(port),
            env=dict(os.environ),
        )  # fmt: skip
    assert r.returncode == 1
    assert one_line(r.stderr) == (
        f"tether up: controlplane cannot start: port {port} is in use; "
        "pass --controlplane-port 0 (any free port)"
    )
    assert "ready" not in r.stdout


async def test_a_child_that_exits_before_listening_stops_the_start(tmp_path: Path) -> None:
    """Lost the race for a port after the check (or any other reason to exit): the
    child's own one-line reason is what `tether up` reports."""
    lines: list[tuple[str, str]] = []
    mesh = Mesh(UpSpec(), lambda name, line: lines.append((name, line)))
    mesh.data_dir.rmdir()
    with held_port() as port:
        await mesh.launcher.start(
            ProcessSpec(
                "registry",
                [sys.executable, "-m", "tether.cli", "registry", "--port", str(port),
                 "--data-dir", str(tmp_path / "reg")],
            )
        )  # fmt: skip
        with pytest.raises(UpError) as info:
            await mesh.listening("registry")
    await mesh.launcher.aclose()
    assert str(info.value) == (
        f"registry did not start: port {port} is in use; pass --port 0 (any free port) "
        "or stop what holds it"
    )


async def test_the_launcher_reads_the_port_a_child_says_it_listens_on(tmp_path: Path) -> None:
    launcher = Launcher(lambda name, line: None)
    try:
        await launcher.start(
            ProcessSpec(
                "registry",
                [sys.executable, "-m", "tether.cli", "registry", "--port", "0",
                 "--data-dir", str(tmp_path / "reg")],
            )
        )  # fmt: skip
        m = await launcher.wait_for_line("registry", r"listening on http://\S+:(\d+)", 30)
        port = int(m.group(1))
        assert port > 0
        index, _, _ = await asyncio.to_thread(registry_state, port)  # it answers there
        assert int(index) > 0
    finally:
        await launcher.aclose()


def test_every_server_says_where_it_listens(
    registry_process: Callable[..., RegistryProcess], tmp_path: Path
) -> None:
    """`--port 0` is usable: the line names the real port, and it answers there."""
    reg = registry_process()
    env = dict(os.environ, CONSUL_HTTP_ADDR=f"127.0.0.1:{reg.port}", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "tether.cli", "controlplane", "--port", "0"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        m = re.fullmatch(r"tether controlplane: listening on http://127\.0\.0\.1:(\d+)\n", first)
        assert m is not None, first
        with urllib.request.urlopen(f"http://127.0.0.1:{m.group(1)}/api/v1/version") as resp:
            assert json.loads(resp.read())["version"] == 0
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=30)
    assert "Traceback" not in out and "Unclosed" not in out, out


def test_start_up_failures_are_one_line_and_exit_1(
    registry_process: Callable[..., RegistryProcess], tmp_path: Path
) -> None:
    env = dict(os.environ)
    with held_port() as port:
        for cmd in (["registry"], ["controlplane"]):
            cenv = env
            if cmd == ["controlplane"]:
                reg = registry_process()
                cenv = dict(env, CONSUL_HTTP_ADDR=f"127.0.0.1:{reg.port}")
            r = run_tether(*cmd, "--port", str(port), env=cenv)
            assert r.returncode == 1, (cmd, r.stderr)
            assert one_line(r.stderr) == (
                f"Error: port {port} is in use; pass --port 0 (any free port) or stop what holds it"
            ), cmd
        r = run_tether(
            "sidecar", "--service", "a", "--app-port", "1", "--outbound-port", str(port),
            "--inbound-port", "0", "--admin-port", "0",
            env=dict(env, CONSUL_HTTP_ADDR=f"127.0.0.1:{free_port()}"),
        )  # fmt: skip
        assert r.returncode == 1 and "Traceback" not in r.stderr
        assert one_line(r.stderr).startswith("Error: cannot listen: "), r.stderr
    # A registry that cannot be reached (nothing there, or it never answers).
    with black_hole_ports() as (hole,):
        for where in (free_port(), hole):
            r = run_tether(
                "controlplane", "--port", "0", "--registry-wait", "0.5",
                env=dict(env, CONSUL_HTTP_ADDR=f"127.0.0.1:{where}"),
            )  # fmt: skip
            assert r.returncode == 1
            line = one_line(r.stderr)
            assert line.startswith(f"Error: registry at http://127.0.0.1:{where} is unreachable")
            assert line.endswith("start it, or point CONSUL_HTTP_ADDR at it")
    # A data directory that cannot be used.
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    r = run_tether("registry", "--port", "0", "--data-dir", str(blocker / "data"), env=env)
    assert r.returncode == 1
    assert one_line(r.stderr).startswith(f"Error: cannot use {blocker}")
