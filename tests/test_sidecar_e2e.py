"""End to end: app A → sidecar A → sidecar B → app B, with the real registry process.

Sidecars are real `python -m tether.cli sidecar` processes on ephemeral ports; the
registry is `tether registry` as a child process (so it can be killed with -9). These
tests are synchronous (threads and blocking sockets), so each runs once.
"""

from __future__ import annotations

import json
import os
import re
import socket
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from proxy.build_info import BUILD
from tests.conftest import RegistryProcess
from tests.sidecar_harness import ProcessSet, poll

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
def mesh(
    registry_process: Callable[..., RegistryProcess], tmp_path: Path
) -> Iterator[tuple[RegistryProcess, ProcessSet]]:
    reg = registry_process()
    procs = ProcessSet(tmp_path, reg.port)
    try:
        yield reg, procs
    finally:
        procs.close()


class EchoServer:
    """A raw TCP echo server (not HTTP) in a thread."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                while data := conn.recv(4096):
                    conn.sendall(data)

    def close(self) -> None:
        self.sock.close()


def name_of(body: bytes) -> str:
    return str(json.loads(body)["name"])


def test_call_through_two_sidecars(mesh: tuple[RegistryProcess, ProcessSet]) -> None:
    _, procs = mesh
    b_app = procs.app("b-1")
    echo = EchoServer()
    procs.closers.append(echo.close)
    sb = procs.sidecar(
        "b", b_app, "--zone", "z1", "--version", "v7", "--meta", "team=x",
        "--opaque-port", str(echo.port), "--sched", "normal",
    )  # fmt: skip
    sa = procs.sidecar("a", procs.app("a-1"))

    status, headers, body = sa.call("http://b/who?x=1")
    assert status == 200, body
    seen = json.loads(body)
    assert seen["name"] == "b-1" and seen["path"] == "/who"
    # Both hops added themselves; the request id is generated once and kept.
    assert "x-request-id" in seen["headers"] and "x-forwarded-for" in seen["headers"]

    # Unknown service: a local reply, never forwarded.
    status, headers, body = sa.call("http://nosuch/")
    assert status == 404 and headers["x-tether-error"] == "unknown_service"
    assert json.loads(body)["error"] == "unknown_service"

    # Admin: ready, clusters with B's instance (zone, version, live), config dump, stats.
    assert sa.admin("/ready") == (200, "LIVE\n") and sa.admin("/live")[0] == 200
    cluster = sa.cluster("b")
    assert cluster is not None and cluster["source"] == "live"
    (ep,) = cluster["endpoints"]
    assert ep["id"] == sb.instance_id and ep["port"] == sb.ports["inbound"]
    assert (ep["zone"], ep["version"], ep["health"]) == ("z1", "v7", "passing")
    status, dump = sb.admin("/config_dump")
    assert status == 200 and dump["listeners"] == sb.ports
    assert dump["registration"]["payload"]["Meta"]["team"] == "x"
    assert dump["spec"]["app_port"] == b_app.port and "registry_token" not in dump["spec"]
    _, metrics = sa.admin("/stats/prometheus")
    assert 'listener="outbound",destination="b.default",subset=""' in metrics
    _, metrics_b = sb.admin("/stats/prometheus")
    assert 'listener="inbound"' in metrics_b
    # Which build of the per-request modules runs, said once at start-up and at
    # /server_info: the one this test process chose from the same tree (build_info).
    status, info = sa.admin("/server_info")
    assert status == 200 and info["pid"] == sa.proc.pid
    assert info["build"] == sa.build == BUILD.name and info["detail"] == BUILD.detail

    # The idle-RSS budget of a sidecar (DESIGN.md): 64 MB, imports included.
    status_text = Path(f"/proc/{sa.proc.pid}/status").read_text()
    rss_kb = int(re.search(r"VmRSS:\s+(\d+) kB", status_text).group(1))  # type: ignore[union-attr]
    assert rss_kb < 64 * 1024, f"sidecar RSS {rss_kb} kB"
    print(f"idle sidecar RSS {rss_kb} kB ({BUILD.name})")
    # Batch scheduling by default (docs/benchmarks.md), the kernel's normal one on request.
    assert os.sched_getscheduler(sa.proc.pid) == os.SCHED_BATCH
    assert os.sched_getscheduler(sb.proc.pid) == os.SCHED_OTHER

    # An opaque port: raw TCP to the app's port, advertised in Meta.
    opaque = dump["opaque_ports"][str(echo.port)]
    assert dump["registration"]["payload"]["Meta"]["opaque_ports"] == f"{echo.port}:{opaque}"
    with socket.create_connection(("127.0.0.1", opaque), timeout=5) as raw:
        raw.sendall(b"\x00not http\r\n")
        assert raw.recv(100) == b"\x00not http\r\n"


def test_discovery_add_remove_and_sigterm_deregisters(
    mesh: tuple[RegistryProcess, ProcessSet],
) -> None:
    reg, procs = mesh
    sb1 = procs.sidecar("b", procs.app("b-1"))
    sa = procs.sidecar("a", procs.app("a-1"))
    assert sa.call("http://b/who")[0] == 200  # A now watches b
    assert sa.endpoint_ids("b") == {sb1.instance_id}

    sb2 = procs.sidecar("b", procs.app("b-2"))  # returns once registered (ready)
    start = time.monotonic()
    poll(lambda: sa.endpoint_ids("b") == {sb1.instance_id, sb2.instance_id}, 5, "B2 seen")
    assert time.monotonic() - start < 1.0
    names = {name_of(sa.call("http://b/who")[2]) for _ in range(6)}
    assert names == {"b-1", "b-2"}  # round robin uses the new instance

    # SIGTERM: B2 deregisters (A stops using it within a second) and exits 0.
    sb2.terminate()
    start = time.monotonic()
    poll(lambda: sa.endpoint_ids("b") == {sb1.instance_id}, 5, "B2 removed")
    assert time.monotonic() - start < 1.0
    assert sb2.proc.wait(20) == 0
    with urllib.request.urlopen(f"http://127.0.0.1:{reg.port}/v1/catalog/service/b") as r:
        assert [e["ServiceID"] for e in json.load(r)] == [sb1.instance_id]
    assert {name_of(sa.call("http://b/who")[2]) for _ in range(4)} == {"b-1"}

    # An app that dies fails its health check (1 s interval here): out of rotation,
    # and with no instance left the caller gets 503 no_healthy_upstream, not a 404.
    procs.apps[0].close()
    poll(lambda: sa.endpoint_ids("b") == set(), 6, "dead app removed")
    status, headers, _ = sa.call("http://b/who")
    assert status == 503 and headers["x-tether-error"] == "no_healthy_upstream"


def test_registry_down_serves_from_cache(mesh: tuple[RegistryProcess, ProcessSet]) -> None:
    reg, procs = mesh
    procs.sidecar("b", procs.app("b-1"))
    sa = procs.sidecar("a", procs.app("a-1"))
    assert sa.call("http://b/who")[0] == 200
    reg.kill9()
    cluster = poll(lambda: (c := sa.cluster("b")) and c["source"] == "cached" and c, 5, "cached")
    assert len(cluster["endpoints"]) == 1 and cluster["last_error"]
    for _ in range(5):
        status, _, body = sa.call("http://b/who")
        assert status == 200 and name_of(body) == "b-1"
    assert sa.ready()  # static stability: still serving, still ready
    reg.start()  # same port, same data directory
    poll(lambda: sa.cluster("b")["source"] == "live", 15, "live again")  # type: ignore[index]
    assert sa.call("http://b/who")[0] == 200


def test_graceful_drain(mesh: tuple[RegistryProcess, ProcessSet]) -> None:
    _, procs = mesh
    sb1 = procs.sidecar("b", procs.app("b-1"), "--drain-seconds", "10")
    procs.sidecar("b", procs.app("b-2"))
    sa = procs.sidecar("a", procs.app("a-1"))
    assert sa.call("http://b/who")[0] == 200
    poll(lambda: len(sa.endpoint_ids("b")) == 2, 5, "both B instances")

    # Slow requests in flight on both instances, then B1 is told to stop.
    before = sum(a.hits for a in procs.apps[:2])
    with ThreadPoolExecutor(4) as pool:
        slow = [pool.submit(sa.call, "http://b/slow?s=2.5", None, 20) for _ in range(4)]
        poll(lambda: sum(a.hits for a in procs.apps[:2]) >= before + 4, 5, "slow requests in")
        drain_start = time.monotonic()
        sb1.terminate()
        poll(lambda: sb1.admin("/ready")[0] == 503, 2, "B1 not ready while draining")
        results: list[Any] = [f.result() for f in slow]
    # Every in-flight request completed normally, on both instances.
    assert [r[0] for r in results] == [200] * 4
    assert {name_of(r[2]) for r in results} == {"b-1", "b-2"}
    # New requests go to the other instance.
    poll(lambda: sa.endpoint_ids("b") == {procs.sidecars[1].instance_id}, 5, "B1 removed")
    assert {name_of(sa.call("http://b/who")[2]) for _ in range(4)} == {"b-2"}
    assert sb1.proc.wait(15) == 0
    assert time.monotonic() - drain_start < 10  # done when idle, not at the deadline
