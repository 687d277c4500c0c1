"""Loopback ports for the benchmarks: pick a free one, wait until a child listens on it."""

from __future__ import annotations

import socket
import subprocess
import time
from typing import Any

from tether.ports import free_port

__all__ = ["free_port", "wait_port"]


def wait_port(port: int, proc: subprocess.Popen[Any], timeout: float = 30.0) -> None:
    """Return once 127.0.0.1:`port` accepts; raise if `proc` exits or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on {port}")
