"""The process launcher behind `tether up` (and `tether run`): start, watch, stop children.

Each child runs in its own session and process group, so a terminal's Ctrl-C reaches
only the launcher, which then stops the children in the order it chooses (sidecars
drain and deregister while the registry is still up). Output is read line by line and
handed to a sink with the child's name; the last lines are kept for error reports.
Stopping sends SIGTERM to the child's whole process group, then SIGKILL after a grace
period, and the children are asked by the kernel (PR_SET_PDEATHSIG) to die with the
launcher should it be killed itself: no process is left behind either way.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

Sink = Callable[[str, str], None]  # (child name, one line of its output)


class ChildExitedError(Exception):
    """A child exited before it printed the line it was awaited for."""

    def __init__(self, child: Child) -> None:
        self.child = child
        last = next((line for line in reversed(child.tail) if line.strip()), "")
        # The child's own one-line reason ("Error: port 8500 is in use; ..."), if it gave one.
        self.reason = last.strip().removeprefix("Error: ") or f"exit status {child.returncode}"
        super().__init__(f"{child.name} exited ({child.returncode}): {self.reason}")


_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # runs in the child between fork and exec
    if sys.platform.startswith("linux"):
        import ctypes

        with contextlib.suppress(Exception):
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclass
class ProcessSpec:
    """One child: a name for its output and the command that runs it."""

    name: str
    argv: Sequence[str]
    env: Mapping[str, str] = field(default_factory=dict)  # added to the launcher's env
    cwd: Path | None = None
    stop_timeout: float = 20.0  # SIGTERM → SIGKILL grace (sidecars drain within it)


class Child:
    """A running (or exited) child process."""

    def __init__(self, spec: ProcessSpec, proc: asyncio.subprocess.Process) -> None:
        self.spec = spec
        self.proc = proc
        self.pid = proc.pid
        self.started = time.monotonic()
        self.tail: deque[str] = deque(maxlen=50)
        self.reader: asyncio.Task[None] | None = None
        self.waiters: list[tuple[re.Pattern[str], asyncio.Future[re.Match[str]]]] = []

    def heard(self, line: str) -> None:
        for pattern, fut in self.waiters:
            m = pattern.search(line)
            if m and not fut.done():
                fut.set_result(m)

    def exited(self) -> None:
        for _, fut in self.waiters:
            if not fut.done():
                fut.set_exception(ChildExitedError(self))

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode

    def __repr__(self) -> str:
        state = "running" if self.returncode is None else f"exited {self.returncode}"
        return f"<Child {self.name} pid={self.pid} {state}>"


def _signal_group(pgid: int, sig: int) -> bool:
    try:
        os.killpg(pgid, sig)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def _group_alive(pgid: int) -> bool:
    return _signal_group(pgid, 0)


class Launcher:
    """Starts children, forwards their output to `sink`, and stops them all on `aclose`."""

    def __init__(self, sink: Sink | None = None) -> None:
        self.sink = sink or _print_sink
        self.children: dict[str, Child] = {}
        self._exited: asyncio.Queue[Child] = asyncio.Queue()

    async def start(self, spec: ProcessSpec) -> Child:
        if spec.name in self.children and self.children[spec.name].returncode is None:
            raise ValueError(f"a child named {spec.name!r} is already running")
        env = dict(os.environ)
        env.update(spec.env)
        env.setdefault("PYTHONUNBUFFERED", "1")
        proc = await asyncio.create_subprocess_exec(
            *spec.argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env=env,
            cwd=spec.cwd,
            start_new_session=True,
            preexec_fn=_die_with_parent,
            limit=1 << 20,  # lines up to 1 MiB arrive whole
        )
        child = Child(spec, proc)
        self.children[spec.name] = child
        child.reader = asyncio.get_running_loop().create_task(self._read(child))
        return child

    async def _read(self, child: Child) -> None:
        stream = child.proc.stdout
        assert stream is not None
        while True:
            try:
                raw = await stream.readline()
            except (ValueError, asyncio.LimitOverrunError):
                raw = await stream.read(65536)  # an over-long line: pass it on in pieces
            if not raw:
                break
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            child.tail.append(line)
            child.heard(line)
            self.sink(child.name, line)
        await child.proc.wait()
        child.exited()
        self._exited.put_nowait(child)

    async def wait_for_line(self, name: str, pattern: str, timeout: float) -> re.Match[str]:
        """The first line of the child's output that matches `pattern` (its "listening
        on" line: proof that this child, not another process, holds the port).
        ChildExitedError if it exits first, TimeoutError if it says nothing in time."""
        child = self.children[name]
        compiled = re.compile(pattern)
        for line in child.tail:
            m = compiled.search(line)
            if m:
                return m
        if child.returncode is not None and child.reader is not None and child.reader.done():
            raise ChildExitedError(child)
        fut: asyncio.Future[re.Match[str]] = asyncio.get_running_loop().create_future()
        child.waiters.append((compiled, fut))
        try:
            return await asyncio.wait_for(fut, timeout)
        finally:
            child.waiters.remove((compiled, fut))

    async def next_exit(self) -> Child:
        """Wait for the next child to exit (to notice crashes)."""
        return await self._exited.get()

    def send_signal(self, name: str, sig: int) -> bool:
        """Send `sig` to a running child's process group (`tether run` forwards signals)."""
        child = self.children.get(name)
        return child is not None and child.returncode is None and _signal_group(child.pid, sig)

    async def stop(
        self, name: str, timeout: float | None = None, sig: int = signal.SIGTERM
    ) -> int | None:
        """`sig` (SIGTERM) to the child's process group, SIGKILL after `timeout`; its exit
        code."""
        child = self.children.get(name)
        if child is None:
            return None
        grace = child.spec.stop_timeout if timeout is None else timeout
        pgid = child.pid  # the child leads its own group (start_new_session)
        if child.returncode is None:
            _signal_group(pgid, sig)
            try:
                await asyncio.wait_for(child.proc.wait(), grace)
            except TimeoutError:
                _signal_group(pgid, signal.SIGKILL)
                await child.proc.wait()
        # Anything the child left in its group (it exited, its helpers did not) goes too.
        if _group_alive(pgid):
            _signal_group(pgid, signal.SIGKILL)
        if child.reader is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(child.reader, 2.0)
        return child.returncode

    async def stop_all(self, names: Iterable[str], timeout: float | None = None) -> None:
        """Stop several children concurrently."""
        await asyncio.gather(*(self.stop(n, timeout) for n in names))

    async def aclose(self, timeout: float | None = None) -> None:
        """Stop every child still running, most recently started first."""
        for name in reversed(list(self.children)):
            await self.stop(name, timeout)

    def __repr__(self) -> str:
        alive = sum(1 for c in self.children.values() if c.returncode is None)
        return f"<Launcher children={len(self.children)} running={alive}>"


def _print_sink(name: str, line: str) -> None:
    print(f"{name:>14} | {line}", flush=True)
