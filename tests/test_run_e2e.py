"""`tether run` end to end: real processes in the mesh beside a real registry process.

A client run by `tether run` calls a service by name and `tether run` exits with the
client's own status; replicas heal after a crash; `tether rollout restart` replaces
three replicas under steady load through a caller's sidecar without a failed request.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT, RegistryProcess, run_tether, stop_group
from tests.sidecar_harness import ProcessSet, alive, poll
from tether.ports import free_port


def passing(registry: RegistryProcess, service: str) -> set[str]:
    conn = http.client.HTTPConnection("127.0.0.1", registry.port, timeout=5)
    try:
        conn.request("GET", f"/v1/health/service/{service}?passing")
        return {n["Service"]["ID"] for n in json.loads(conn.getresponse().read())}
    finally:
        conn.close()


def registered(registry: RegistryProcess, service: str) -> set[str]:
    conn = http.client.HTTPConnection("127.0.0.1", registry.port, timeout=5)
    try:
        conn.request("GET", f"/v1/catalog/service/{service}")
        return {n["ServiceID"] for n in json.loads(conn.getresponse().read())}
    finally:
        conn.close()


class Run:
    """`tether run ...` as a child process leading its own group, output in a log."""

    def __init__(self, tmp: Path, registry: RegistryProcess, *args: str) -> None:
        self.log = tmp / f"run-{len(list(tmp.glob('run-*.log')))}.log"
        self.socket = tmp / "sock" / f"{len(list(tmp.glob('run-*.log')))}.sock"
        (tmp / "sock").mkdir(mode=0o700, exist_ok=True)
        env = dict(os.environ, CONSUL_HTTP_ADDR=f"127.0.0.1:{registry.port}")
        cmd = [sys.executable, "-m", "tether.cli", "run", "--control-socket", str(self.socket),
               *args]  # fmt: skip
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def status(self) -> dict[str, Any]:
        done = run_tether_socket(self.socket, "GET", "/status")
        return done

    def close(self) -> None:
        stop_group(self.proc, grace=20)


def run_tether_socket(path: Path, method: str, route: str) -> Any:
    import asyncio

    from tether.run import control

    status, body = asyncio.run(control(path, method, route, 30))
    assert status == 200, body
    return body


@pytest.fixture
def mesh(tmp_path: Path) -> Iterator[tuple[RegistryProcess, Callable[..., Run], ProcessSet]]:
    registry = RegistryProcess(tmp_path / "registry")
    registry.start()
    runs: list[Run] = []
    procs = ProcessSet(tmp_path, registry.port)

    def start(*args: str) -> Run:
        r = Run(tmp_path, registry, *args)
        runs.append(r)
        return r

    try:
        yield registry, start, procs
    finally:
        for r in runs:
            r.close()
        procs.close()
        registry.stop()


def test_run_calls_a_service_by_name_and_returns_its_exit_code(
    mesh: tuple[RegistryProcess, Callable[..., Run], ProcessSet],
) -> None:
    registry, start, _ = mesh
    port = free_port()
    echo = start("--service", "echo", "--port", str(port), "--health-path", "/health",
                 "--", sys.executable, "-m", "tests.run_app", "server")  # fmt: skip
    poll(lambda: passing(registry, "echo"), 60, f"echo in rotation:\n{echo.output()}")
    env = dict(os.environ, CONSUL_HTTP_ADDR=f"127.0.0.1:{registry.port}")
    done = run_tether(
        "run", "--service", "client", "--port", str(free_port()),
        "--control-socket", str(echo.socket.with_name("client.sock")),
        "--", sys.executable, "-m", "tests.run_app", "client", "http://echo/hello", "7",
        env=env, timeout=90,
    )  # fmt: skip
    assert done.returncode == 7, done.stdout + done.stderr
    assert "http://echo/hello answered 200" in done.stdout
    assert registered(registry, "client") == set()  # drained and deregistered
    # SIGTERM: the command gets it (and exits 0), then the sidecar deregisters.
    status = echo.status()
    (replica,) = status["replicas"]
    assert replica["port"] == port and replica["state"] == "ready"
    os.killpg(echo.proc.pid, signal.SIGTERM)
    assert echo.proc.wait(30) == 0, echo.output()
    assert not alive(replica["pid"])
    assert registered(registry, "echo") == set()
    assert not echo.socket.exists()


class Load:
    """Steady GETs to `http://echo/` through a caller's sidecar, from a few threads,
    bounded in count and time; every answer that is not a 200 is kept."""

    def __init__(self, outbound: int, threads: int = 3, limit: int = 20000) -> None:
        self.outbound = outbound
        self.ok = 0
        self.failed: list[str] = []
        self.seen: set[int] = set()  # app pids that answered
        self.limit = limit
        self.stop = threading.Event()
        self.deadline = time.monotonic() + 90
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._loop, daemon=True) for _ in range(threads)]

    def _loop(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.outbound, timeout=10)
        while not self.stop.is_set() and time.monotonic() < self.deadline:
            with self.lock:
                if self.ok + len(self.failed) >= self.limit:
                    return
            try:
                conn.request("GET", "http://echo/")
                resp = conn.getresponse()
                body = resp.read()
                with self.lock:
                    if resp.status == 200:
                        self.ok += 1
                        self.seen.add(json.loads(body)["pid"])
                    else:
                        self.failed.append(f"{resp.status} {body[:200]!r}")
            except (OSError, http.client.HTTPException) as exc:
                with self.lock:
                    self.failed.append(repr(exc))
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", self.outbound, timeout=10)
            time.sleep(0.002)  # steady, not flat out: the machine is shared
        conn.close()

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(15)

    def count(self) -> int:
        with self.lock:
            return self.ok + len(self.failed)


def three_replicas(
    mesh: tuple[RegistryProcess, Callable[..., Run], ProcessSet],
) -> tuple[Run, Any]:
    registry, start, procs = mesh
    echo = start("--service", "echo", "--port", str(free_port()), "--replicas", "3",
                 "--restart", "on-failure", "--health-path", "/health",
                 "--check-interval", "0.2", "--drain-seconds", "3",
                 "--", sys.executable, "-m", "tests.run_app", "server")  # fmt: skip
    poll(lambda: len(passing(registry, "echo")) == 3, 90, f"3 replicas:\n{echo.output()}")
    caller = procs.sidecar("loadgen", procs.app("loadgen"))
    poll(lambda: len(caller.endpoint_ids("echo")) == 3 or (caller.call("http://echo/")[0] == 200
         and len(caller.endpoint_ids("echo")) == 3), 30, "caller sees 3")  # fmt: skip
    return echo, caller


def test_rolling_restart_of_three_replicas_under_load(
    mesh: tuple[RegistryProcess, Callable[..., Run], ProcessSet],
) -> None:
    registry, _, _ = mesh
    echo, caller = three_replicas(mesh)
    before = {r["instance"] for r in echo.status()["replicas"]}
    old_pids = {r["pid"] for r in echo.status()["replicas"]}
    env = dict(os.environ, CONSUL_HTTP_ADDR=f"127.0.0.1:{registry.port}")
    with Load(caller.ports["outbound"]) as load:
        poll(lambda: load.count() > 50, 30, "load running")
        done = run_tether("rollout", "restart", "echo", "--control-socket", str(echo.socket),
                          env=env, timeout=120)  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr + echo.output()
        at_end = load.count()
        poll(lambda: load.count() > at_end + 50, 30, "load after the rollout")
    assert "echo: restarted" in done.stdout
    after = echo.status()["replicas"]
    assert {r["state"] for r in after} == {"ready"}
    assert not before & {r["instance"] for r in after}  # every replica replaced
    assert passing(registry, "echo") == {r["instance"] for r in after}
    new_pids = {r["pid"] for r in after}
    assert new_pids <= load.seen and old_pids <= load.seen  # both served during the run
    assert load.failed == [], f"{len(load.failed)} of {load.count()} failed: {load.failed[:5]}"


def test_a_crashed_replica_is_restarted_and_back_in_rotation(
    mesh: tuple[RegistryProcess, Callable[..., Run], ProcessSet],
) -> None:
    registry, _, _ = mesh
    echo, caller = three_replicas(mesh)
    victim = echo.status()["replicas"][1]
    with Load(caller.ports["outbound"]) as load:
        poll(lambda: load.count() > 50, 30, "load running")
        os.kill(victim["pid"], signal.SIGKILL)

        def healed() -> bool:
            r = echo.status()["replicas"][1]
            return r["restarts"] == 1 and r["state"] == "ready" and r["pid"] != victim["pid"]

        poll(healed, 60, f"replica 1 restarted:\n{echo.output()}")
        poll(lambda: victim["instance"] in passing(registry, "echo"), 30, "back in rotation")
        new_pid = echo.status()["replicas"][1]["pid"]
        poll(lambda: new_pid in load.seen, 30, "the restarted replica serves")
    total = load.count()
    # The requests on their way to the replica as it died are retried by the caller's
    # sidecar (its default retry policy: the dead app's sidecar answers 502
    # upstream_connect_error or upstream_reset, a refusal or a reset one hop on, both
    # retried on another replica for a GET): no request fails.
    assert load.failed == [], f"{len(load.failed)} of {total} failed: {load.failed}"


def test_a_replica_failing_its_health_check_is_replaced(
    mesh: tuple[RegistryProcess, Callable[..., Run], ProcessSet],
) -> None:
    registry, start, _ = mesh
    port = free_port()
    echo = start("--service", "echo", "--port", str(port), "--restart", "on-failure",
                 "--health-path", "/health", "--check-interval", "0.2", "--failures", "3",
                 "--", sys.executable, "-m", "tests.run_app", "server")  # fmt: skip
    poll(lambda: passing(registry, "echo"), 60, f"echo in rotation:\n{echo.output()}")
    (before,) = echo.status()["replicas"]
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    conn.request("GET", "/sick")  # the process runs on, its health check now fails
    assert conn.getresponse().status == 200
    conn.close()
    # Out of rotation while it is unhealthy and being replaced...
    poll(lambda: before["instance"] not in passing(registry, "echo"), 30, "out of rotation")

    def replaced() -> bool:
        (r,) = echo.status()["replicas"]
        return r["restarts"] == 1 and r["state"] == "ready" and r["pid"] != before["pid"]

    poll(replaced, 60, f"replica restarted:\n{echo.output()}")
    # ...and back once its new process is healthy.
    poll(lambda: before["instance"] in passing(registry, "echo"), 30, "back in rotation")
    assert "replica 0 failed 3 checks" in echo.output()
    assert not alive(before["pid"])
