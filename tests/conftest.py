"""Shared fixtures: a real registry on an ephemeral port, and clients for it.

Every async test runs twice, on the stock asyncio loop and on uvloop.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import consul.aio
import pytest
import uvloop
from aiohttp import web

from registry.http import RegistrySpec
from registry.server import RegistryServer
from tether.ports import free_port

ROOT = Path(__file__).resolve().parent.parent


def pytest_asyncio_loop_factories(config: Any, item: Any) -> dict[str, Callable[[], Any]]:
    return {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}


@asynccontextmanager
async def serving_registry(data_dir: Path, **spec: Any) -> AsyncIterator[RegistryServer]:
    """An in-process registry on 127.0.0.1:<ephemeral> with a durable store in `data_dir`.

    `spec` sets further `RegistrySpec` fields (a management token, a shorter TTL floor).
    """
    server = RegistryServer(RegistrySpec(port=0, data_dir=data_dir, node="node1", **spec))
    await server.start()
    try:
        yield server
    finally:
        await server.aclose()


@pytest.fixture
async def registry(tmp_path: Path) -> AsyncIterator[RegistryServer]:
    """An in-process registry on 127.0.0.1:<ephemeral> with a durable store."""
    async with serving_registry(tmp_path / "reg") as server:
        yield server


# The management token of `secured_registry` (ACLs on, default deny).
MANAGEMENT_TOKEN = "5b2d8f4e-1c3a-4e8b-9d7f-2a6c0e1b3f45"


@pytest.fixture
async def secured_registry(tmp_path: Path) -> AsyncIterator[RegistryServer]:
    """A registry with ACLs on, its management token `MANAGEMENT_TOKEN`."""
    async with serving_registry(tmp_path / "reg", management_token=MANAGEMENT_TOKEN) as server:
        yield server


@pytest.fixture
async def acl_cp(tmp_path: Path) -> AsyncIterator[tuple[RegistryServer, Any]]:
    """A registry with ACLs on (`MANAGEMENT_TOKEN`) and a control plane over it, which
    holds that token for its own reads."""
    from controlplane.server import ControlPlane, ControlPlaneSpec, RegistryAddress

    async with serving_registry(tmp_path / "acl", management_token=MANAGEMENT_TOKEN) as reg:
        spec = ControlPlaneSpec(
            port=0, registry=RegistryAddress("127.0.0.1", reg.port, "http", MANAGEMENT_TOKEN)
        )
        cp = ControlPlane(spec)
        await cp.start()
        try:
            yield reg, cp
        finally:
            await cp.aclose()


@pytest.fixture
async def registry_admin(secured_registry: RegistryServer) -> AsyncIterator[Any]:
    """A `consul.aio` client of `secured_registry` with its management token."""
    c = consul.aio.Consul(host="127.0.0.1", port=secured_registry.port, token=MANAGEMENT_TOKEN)
    try:
        yield c
    finally:
        await c.close()


@pytest.fixture
async def consul_client(registry: RegistryServer) -> AsyncIterator[Any]:
    c = consul.aio.Consul(host="127.0.0.1", port=registry.port)
    try:
        yield c
    finally:
        await c.close()


@pytest.fixture
async def cleanup() -> AsyncIterator[list[Callable[[], Any]]]:
    """Closes what a test started; fails the test if the event loop saw an error in a
    callback (an exchange raising in a protocol callback is logged, not raised)."""
    done: list[Callable[[], Any]] = []
    errors: list[dict[str, Any]] = []
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda _, ctx: errors.append(ctx))
    yield done
    for fn in reversed(done):
        await fn()
    loop.set_exception_handler(None)
    assert errors == [], errors


async def serve_app(app: web.Application, **runner: Any) -> tuple[web.AppRunner, int]:
    """Serve `app` on 127.0.0.1:<ephemeral>; the caller cleans the runner up.

    `runner` sets further `web.AppRunner` options (a short `shutdown_timeout`).
    """
    r = web.AppRunner(app, access_log=None, **runner)
    await r.setup()
    await web.TCPSite(r, "127.0.0.1", 0).start()
    return r, int(r.addresses[0][1])


@contextmanager
def black_hole_ports(count: int = 1) -> Iterator[list[int]]:
    """Ports where a connect never completes: listeners whose accept queue is full, so
    the kernel drops further SYNs (a connect timeout on loopback, without root)."""
    socks: list[socket.socket] = []
    ports: list[int] = []
    try:
        for _ in range(count):
            hole = socket.socket()
            socks.append(hole)
            hole.bind(("127.0.0.1", 0))
            hole.listen(0)
            port = int(hole.getsockname()[1])
            ports.append(port)
            for _ in range(4):  # fill the accept queue
                c = socket.socket()
                socks.append(c)
                c.setblocking(False)
                try:
                    c.connect(("127.0.0.1", port))
                except BlockingIOError:
                    pass
        yield ports
    finally:
        for sock in socks:
            sock.close()


def wait_for_port(
    port: int, timeout: float = 15.0, proc: subprocess.Popen[Any] | None = None
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on {port} after {timeout}s")


def stop_group(proc: subprocess.Popen[Any], grace: float = 10.0) -> None:
    """SIGTERM a child's process group (it leads one: start_new_session), SIGKILL after `grace`."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def run_tether(
    *args: str, env: dict[str, str], stdin: str | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """`tether <args>` run to its end as an operator would, its output captured."""
    return subprocess.run(
        [sys.executable, "-m", "tether.cli", *args],
        cwd=ROOT,
        env=env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


class GroupProcess:
    """A `tether` child leading its own process group, so signals reach all it started."""

    proc: subprocess.Popen[bytes] | None = None

    def kill9(self) -> None:
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None:
            stop_group(self.proc)


class RegistryProcess(GroupProcess):
    """`tether registry` as a real child process (for kill -9 and restart tests)."""

    def __init__(self, data_dir: Path, token: str | None = None) -> None:
        self.data_dir = data_dir
        self.token = token
        self.port = free_port()

    def start(self) -> None:
        cmd = [
            sys.executable, "-m", "tether.cli", "registry",
            "--port", str(self.port), "--data-dir", str(self.data_dir), "--node", "node1",
        ]  # fmt: skip
        if self.token:
            cmd += ["--management-token", self.token]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, start_new_session=True)
        wait_for_port(self.port, proc=self.proc)


class ControlPlaneProcess(GroupProcess):
    """`tether controlplane` as a child process, its output in `log`; restartable on the
    same port."""

    def __init__(self, registry_port: int, log: Path) -> None:
        self.port = free_port()
        self.registry_port = registry_port
        self.log = log

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        env = dict(os.environ, CONSUL_HTTP_ADDR=f"127.0.0.1:{self.registry_port}")
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tether.cli", "controlplane", "--port", str(self.port)],
                cwd=ROOT,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        wait_for_port(self.port, proc=self.proc)


@pytest.fixture
def registry_process(tmp_path: Path) -> Iterator[Callable[..., RegistryProcess]]:
    made: list[RegistryProcess] = []

    def make(token: str | None = None) -> RegistryProcess:
        rp = RegistryProcess(tmp_path / "regproc", token)
        rp.start()
        made.append(rp)
        return rp

    yield make
    for rp in made:
        rp.stop()


@pytest.fixture
def acl_processes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Callable[..., tuple[RegistryProcess, ControlPlaneProcess]]]:
    """A registry process (ACLs on with `MANAGEMENT_TOKEN`, unless `acl=False`) and a
    control plane process whose environment holds CONSUL_HTTP_TOKEN (that token, or
    `cp_token`)."""
    made: list[Any] = []

    def make(
        acl: bool = True, cp_token: str = MANAGEMENT_TOKEN
    ) -> tuple[RegistryProcess, ControlPlaneProcess]:
        reg = RegistryProcess(tmp_path / "reg", MANAGEMENT_TOKEN if acl else None)
        reg.start()
        made.append(reg)
        monkeypatch.setenv("CONSUL_HTTP_TOKEN", cp_token)
        cp = ControlPlaneProcess(reg.port, tmp_path / "cp.log")
        cp.start()
        made.append(cp)
        return reg, cp

    yield make
    for proc in reversed(made):
        proc.stop()
