"""Issue 18 in a real `tether sidecar` process: its app cannot reach the mesh's control
surfaces as egress, and an endless response head does not grow the sidecar's memory."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import pytest

from tests import test_sidecar_e2e
from tests.conftest import RegistryProcess
from tests.sidecar_harness import ProcessSet

pytestmark = pytest.mark.timeout(90)


def _kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} for {pid}")


class EndlessHead:
    """An egress server whose response head never ends: one field value, 64 KiB at a
    time, up to 256 MiB or 30 s, until the peer closes the connection."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(4)
        self.port = int(self.sock.getsockname()[1])
        self.sent = 0
        self.cut = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.sock.accept()
        with conn:
            conn.settimeout(10)
            conn.recv(65536)
            deadline = time.monotonic() + 30
            try:
                conn.sendall(b"HTTP/1.1 200 OK\r\nX-Endless: ")
                for _ in range(4096):
                    if time.monotonic() > deadline:
                        break
                    conn.sendall(b"a" * 65536)
                    self.sent += 65536
            except OSError:
                self.cut.set()

    def close(self) -> None:
        self.sock.close()


# A registry process and the sidecars a test starts (tests/test_sidecar_e2e.py).
mesh = test_sidecar_e2e.mesh


def test_app_cannot_reach_admin_or_registry_through_egress(
    mesh: tuple[RegistryProcess, ProcessSet],
) -> None:
    reg, procs = mesh
    sa = procs.sidecar("a", procs.app("a"))
    for what, url in (
        ("admin listener", f"http://127.0.0.1:{sa.ports['admin']}/config_dump"),
        ("inbound listener", f"http://127.0.0.1:{sa.ports['inbound']}/who"),
        ("registry", f"http://127.0.0.1:{reg.port}/v1/agent/self"),
    ):
        status, headers, body = sa.call(url)
        assert status == 403, (what, status, body)
        assert headers["x-tether-error"] == "egress_denied"
        assert what.encode() in body
    # Egress elsewhere on this host still works: the app's own port, for one.
    status, _, body = sa.call(f"http://127.0.0.1:{procs.apps[0].port}/who")
    assert status == 200 and b'"a"' in body


def test_operators_may_allow_egress_to_the_control_surfaces(
    mesh: tuple[RegistryProcess, ProcessSet],
) -> None:
    """`--egress-to-control allow` is the documented switch: the registry answers then."""
    reg, procs = mesh
    sa = procs.sidecar("a", procs.app("a"), "--egress-to-control", "allow")
    status, headers, body = sa.call(f"http://127.0.0.1:{reg.port}/v1/status/leader")
    assert status == 200, (status, body)
    assert "x-tether-error" not in headers


def test_endless_response_head_is_cut_and_the_sidecar_memory_stays_flat(
    mesh: tuple[RegistryProcess, ProcessSet],
) -> None:
    _, procs = mesh
    sa = procs.sidecar("a", procs.app("a"))
    pid = sa.proc.pid
    assert sa.call(f"http://127.0.0.1:{procs.apps[0].port}/who")[0] == 200
    peak_before = _kib(pid, "VmHWM")
    endless = EndlessHead()
    try:
        status, headers, _ = sa.call(f"http://127.0.0.1:{endless.port}/", timeout=20)
        assert status == 502 and headers["x-tether-error"] == "upstream_response_too_large"
        assert endless.cut.wait(10)  # the sidecar closed the upstream connection
        endless.thread.join(10)
        assert not endless.thread.is_alive()
    finally:
        endless.close()
    # Before the limit the sidecar held the whole value (hundreds of MB within the
    # request timeout); now at most the 64 KiB head and a few reads.
    assert _kib(pid, "VmHWM") - peak_before < 16 * 1024
    assert endless.sent < 64 * 1024 * 1024
