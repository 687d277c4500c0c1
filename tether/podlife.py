"""The sidecar's part in a pod's life: its `preStop` (out of rotation, then wait for the
app to stop) and `tether pod-sidecar` (keep the sidecar up while the app runs, and
leave when the app's processes are gone, so a Job's pod completes without native
sidecars).

`prestop` puts the instance (`SERVICE-ADDRESS-PORT`, the id the sidecar registers)
in maintenance through the registry's agent API, which takes it out of every
caller's `?passing` discovery at once, then waits until the app no longer accepts on
its port (it has stopped) or the timeout; the kubelet sends the sidecar its SIGTERM
only after the hook returns, and the sidecar drains and deregisters.

`PodSidecar` runs the sidecar as a child (tether/launcher.py), restarts it if it dies
(in the same container, so the network namespace the app shares stays), forwards
SIGTERM, and, in a pod that shares its process namespace, stops the sidecar once every
process of the other containers has exited: those are the processes whose cgroup is
not this container's (the pause process, pid 1, aside).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from pathlib import Path

import consul.aio

from tether.launcher import Launcher, ProcessSpec


async def _accepts(port: int) -> bool:
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 1.0)
    except (OSError, TimeoutError):
        return False
    writer.close()
    return True


async def prestop(
    service: str,
    address: str,
    port: int,
    app_port: int | None,
    timeout: float,
    registry_host: str,
    registry_port: int,
    token: str | None,
) -> int:
    """Out of rotation, then wait for the app; 0 (the kubelet ignores the status)."""
    deadline = time.monotonic() + timeout
    client = consul.aio.Consul(host=registry_host, port=registry_port, token=token)
    try:
        await asyncio.wait_for(
            client.agent.service.maintenance(
                f"{service}-{address}-{port}", "true", reason="pod terminating"
            ),
            min(3.0, timeout),
        )
        print(f"tether prestop: {service} at {address}:{port} out of rotation", flush=True)
    except Exception as exc:  # the registry away: the SIGTERM drain deregisters anyway
        print(f"tether prestop: maintenance not set: {exc}", flush=True)
    finally:
        await client.close()
    while app_port and time.monotonic() < deadline and await _accepts(app_port):
        await asyncio.sleep(0.2)
    return 0


def _cgroup(proc: Path, pid: str) -> str | None:
    try:
        return (proc / pid / "cgroup").read_text()
    except OSError:
        return None


def other_container_pids(proc: Path = Path("/proc")) -> list[int]:
    """Processes of the pod's other containers (a shared process namespace)."""
    mine = _cgroup(proc, "self")
    out = []
    for entry in proc.iterdir():
        if not entry.name.isdigit() or entry.name == "1":
            continue
        group = _cgroup(proc, entry.name)
        if group is not None and group != mine:
            out.append(int(entry.name))
    return out


class PodSidecar:
    """The sidecar child, restarted when it dies, stopped when the app has gone."""

    def __init__(
        self,
        argv: list[str],
        restart_delay: float = 0.5,
        poll: float = 0.5,
        *,
        exit_with_app: bool = False,
        proc: Path = Path("/proc"),
    ) -> None:
        self.argv = argv
        self.exit_with_app = exit_with_app
        self.proc = proc
        self.restart_delay = restart_delay
        self.poll = poll
        self.launcher = Launcher()
        self.stop = asyncio.Event()

    async def _watch_app(self) -> None:
        seen = False
        quiet = 0
        while True:
            others = other_container_pids(self.proc)
            seen = seen or bool(others)
            quiet = quiet + 1 if seen and not others else 0
            if quiet >= 2:  # gone on two looks: not an app container between restarts
                print("tether pod-sidecar: the app has exited; stopping the sidecar", flush=True)
                self.stop.set()
                return
            await asyncio.sleep(self.poll)

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop.set)
        watcher = asyncio.ensure_future(
            self._watch_app() if self.exit_with_app else asyncio.Event().wait()
        )
        spec = ProcessSpec("sidecar", self.argv, stop_timeout=60.0)
        delay = self.restart_delay
        code = 0
        try:
            while not self.stop.is_set():
                child = await self.launcher.start(spec)
                exited = asyncio.ensure_future(child.proc.wait())
                stopping = asyncio.ensure_future(self.stop.wait())
                await asyncio.wait({exited, stopping}, return_when=asyncio.FIRST_COMPLETED)
                stopping.cancel()
                if self.stop.is_set():
                    code = await self.launcher.stop("sidecar") or 0
                    break
                code = child.returncode or 0
                print(f"tether pod-sidecar: sidecar exited {code}; again in {delay:g}s", flush=True)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stop.wait(), delay)
                delay = min(delay * 2, 30.0)
        finally:
            watcher.cancel()
            await self.launcher.aclose()
        return max(code, 0)
