"""The process launcher: own process groups, output lines, SIGTERM then SIGKILL."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from pathlib import Path

from tests.sidecar_harness import alive
from tether.launcher import Launcher, ProcessSpec


async def gone(pid: int, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while alive(pid):
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True


def read(path: Path) -> str:
    return path.read_text() if path.exists() else ""


async def wait_file(path: Path, timeout: float = 10.0) -> str:
    deadline = time.monotonic() + timeout
    while not read(path).strip():
        assert time.monotonic() < deadline, f"{path} not written"
        await asyncio.sleep(0.02)
    return read(path)


async def test_output_groups_and_stop(tmp_path: Path) -> None:
    lines: list[tuple[str, str]] = []
    launcher = Launcher(lambda name, line: lines.append((name, line)))
    pids = tmp_path / "pids"
    # A child that leaves a grandchild in its group, and one that ignores SIGTERM.
    script = f"sleep 60 & echo $$ $! > {pids}; echo hello; echo err >&2; wait"
    stubborn = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
    stubborn += "print('up', flush=True); time.sleep(60)"
    try:
        child = await launcher.start(ProcessSpec("shell", ["sh", "-c", script]))
        hard = await launcher.start(
            ProcessSpec("stubborn", [sys.executable, "-c", stubborn], stop_timeout=0.5)
        )
        shell_pid, grandchild = map(int, (await wait_file(pids)).split())
        assert shell_pid == child.pid
        assert os.getpgid(child.pid) == child.pid  # its own group (and session)
        assert os.getpgid(grandchild) == child.pid
        assert os.getsid(child.pid) == child.pid
        deadline = time.monotonic() + 10
        while ("stubborn", "up") not in lines or ("shell", "err") not in lines:
            assert time.monotonic() < deadline, lines
            await asyncio.sleep(0.02)
        assert ("shell", "hello") in lines
        assert repr(launcher) == "<Launcher children=2 running=2>"

        assert await launcher.stop("shell") == -15  # SIGTERM
        # The whole group went (a signalled process takes a moment to exit and be reaped).
        assert await gone(grandchild)
        start = time.monotonic()
        assert await launcher.stop("stubborn") == -9  # SIGKILL after the grace
        assert 0.4 < time.monotonic() - start < 5
        assert await gone(hard.pid)
        assert (await asyncio.wait_for(launcher.next_exit(), 5)).name in ("shell", "stubborn")
    finally:
        await launcher.aclose(timeout=1)
    assert all(c.returncode is not None for c in launcher.children.values())
