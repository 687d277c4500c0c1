"""`tether run`: an ordinary process in the mesh, without containers: its replicas, a
sidecar each, self-healing and rolling restarts, on the launcher of `tether up`.

A replica is a sidecar (`tether sidecar`, its listeners on ports the kernel picks) and
the command, started once the sidecar is ready with `PORT` (the first replica gets
`--port`, the others free ports), `HTTP_PROXY` to its sidecar, and `TETHER_REPLICA`.
The supervisor watches each replica: its process exiting, or its health check (HTTP
GET of `--health-path`, else a TCP connect to `PORT`) failing `--failures` times in a
row. Either puts the instance in maintenance in the registry at once (out of every
caller's `?passing` discovery; the sidecar's own app check agrees within its
interval), and with `--restart on-failure|always` the command is started again after
an exponential backoff, the instance coming back into rotation once healthy. With
`--restart no` a replica whose command exits drains its sidecar, and when the last one
has exited, `tether run` returns the command's exit status.

Rolling restart (`tether rollout restart NAME`): make before break, one replica at a
time: a new replica (new sidecar, new process) is started and must be passing in the
registry before the old one leaves rotation, drains, and stops. Stopping (SIGTERM or
SIGINT to `tether run`) goes in the order a mesh needs: every instance out of rotation,
the signal to the commands, then the sidecars drain and deregister, last. Other
signals (SIGHUP, SIGUSR1, SIGUSR2) are passed on to the commands.

The control socket is a unix socket (mode 0600, in a 0700 directory of the user's),
serving a small aiohttp API: `GET /status`, `POST /rollout/restart`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import consul.aio
from aiohttp import web

from tether.launcher import Launcher, ProcessSpec
from tether.ports import free_port

ROOT = Path(__file__).resolve().parent.parent
LISTENING = re.compile(r"tether sidecar \S+: listening outbound=\S+:(\d+) inbound=\S+:(\d+) "
                       r"admin=\S+:(\d+) id=(\S+)")  # fmt: skip
FORWARDED = (signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)


class RunError(Exception):
    """`tether run` cannot go on: a sidecar that never got ready, a bad control socket."""


@dataclass
class RunSpec:
    """Every `tether run` flag."""

    service: str
    port: int
    command: list[str]
    replicas: int = 1
    restart: Literal["no", "on-failure", "always"] = "no"
    health_path: str | None = None
    check_interval: float = 1.0
    failures: int = 3
    backoff_initial: float = 0.5
    backoff_max: float = 30.0
    drain_seconds: float = 5.0
    start_timeout: float = 60.0
    namespace: str = "default"
    controlplane: str | None = None
    control_socket: Path | None = None
    registry_host: str = "127.0.0.1"
    registry_port: int = 8500
    registry_token: str | None = None
    extra_sidecar_args: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.command:
            raise ValueError("give the command after --")
        if not 0 < self.port < 65536:
            raise ValueError(f"--port: {self.port} is not a port")
        if not 1 <= self.replicas <= 64:
            raise ValueError(f"--replicas: {self.replicas} is not 1-64")
        if self.failures < 1:
            raise ValueError("--failures: at least 1")


def default_socket(service: str) -> Path:
    base = os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()
    return Path(base) / f"tether-{os.getuid()}" / f"run-{service}.sock"


@dataclass
class Replica:
    """One instance: its sidecar and its command, in one generation."""

    slot: int
    generation: int
    app_port: int
    outbound: int = 0
    inbound: int = 0
    admin: int = 0
    instance_id: str = ""
    state: str = "starting"  # starting, ready, unhealthy, restarting, draining, exited
    restarts: int = 0
    exit_code: int | None = None
    pid: int = 0  # of the command's current process
    listening: asyncio.Event = field(default_factory=asyncio.Event)
    watcher: asyncio.Task[None] | None = None

    @property
    def name(self) -> str:
        return f"{self.slot}" if self.generation == 0 else f"{self.slot}.{self.generation}"

    def view(self) -> dict[str, Any]:
        return {
            "replica": self.name,
            "state": self.state,
            "port": self.app_port,
            "outbound": self.outbound,
            "inbound": self.inbound,
            "admin": self.admin,
            "instance": self.instance_id,
            "restarts": self.restarts,
            "exit_code": self.exit_code,
            "pid": self.pid,
        }


class Supervisor:
    """Runs the replicas of one `tether run`, heals them, restarts them in turn."""

    def __init__(self, spec: RunSpec, sink: Callable[[str, str], None] | None = None) -> None:
        self.spec = spec
        self.out = sink or _print
        self.launcher = Launcher(self._sink)
        self.replicas: dict[int, Replica] = {}
        self._starting: list[Replica] = []  # not yet in `replicas` (a rollout's new ones)
        self._retiring: list[Replica] = []  # out of `replicas`, draining
        self.stopping = False
        self.done = asyncio.Event()
        self.rollout_lock = asyncio.Lock()
        self._generations: dict[int, int] = {}  # slot -> instances started in it
        self._consul: Any = None
        self._runner: web.AppRunner | None = None
        self.socket_path = spec.control_socket or default_socket(spec.service)

    # -- children ---------------------------------------------------------------------

    def _sink(self, name: str, line: str) -> None:
        m = LISTENING.search(line)
        if m and name.endswith(".sidecar"):
            for r in self.replicas_all():
                if f"{self.spec.service}-{r.name}.sidecar" == name:
                    r.outbound, r.inbound, r.admin = (int(m.group(i)) for i in (1, 2, 3))
                    r.instance_id = m.group(4)
                    r.listening.set()
        self.out(name, line)

    def replicas_all(self) -> list[Replica]:
        return [*self.replicas.values(), *self._starting, *self._retiring]

    def _sidecar_name(self, r: Replica) -> str:
        return f"{self.spec.service}-{r.name}.sidecar"

    def _app_name(self, r: Replica) -> str:
        return f"{self.spec.service}-{r.name}"

    async def _maintenance(self, r: Replica, on: bool) -> None:
        if not r.instance_id:
            return
        try:
            await asyncio.wait_for(
                self._consul.agent.service.maintenance(
                    r.instance_id, "true" if on else "false", reason="tether run"
                ),
                3.0,
            )
        except Exception as exc:  # the registry away: the sidecar's app check still acts
            self.out("tether run", f"maintenance of {r.instance_id}: {exc}")

    async def _passing(self, r: Replica) -> bool:
        try:
            _, nodes = await self._consul.health.service(self.spec.service, passing=True)
        except Exception:
            return False
        return any(n["Service"]["ID"] == r.instance_id for n in nodes)

    async def _app_healthy(self, r: Replica) -> bool:
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection("127.0.0.1", r.app_port), 2.0
            )
        except (OSError, TimeoutError):
            return False
        try:
            if not self.spec.health_path:
                return True
            writer.write(
                f"GET {self.spec.health_path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                "Connection: close\r\n\r\n".encode()
            )
            line = await asyncio.wait_for(reader.readline(), 2.0)
            parts = line.split()
            return len(parts) >= 2 and parts[1][:1] == b"2"
        except (OSError, TimeoutError):
            return False
        finally:
            writer.close()

    async def _start_sidecar(self, r: Replica) -> None:
        spec = self.spec
        argv = [
            sys.executable, "-m", "tether.cli", "sidecar", "--service", spec.service,
            "--app-port", str(r.app_port), "--outbound-port", "0", "--inbound-port", "0",
            "--admin-port", "0", "--namespace", spec.namespace,
            "--meta", f"instance={spec.service}-{r.name}",
            "--drain-seconds", f"{spec.drain_seconds:g}",
            "--check-interval", f"{spec.check_interval:g}",
            *(["--app-health-path", spec.health_path] if spec.health_path else []),
            *(["--controlplane", spec.controlplane] if spec.controlplane else []),
            *spec.extra_sidecar_args,
        ]  # fmt: skip
        env = {"CONSUL_HTTP_ADDR": f"{spec.registry_host}:{spec.registry_port}"}
        if spec.registry_token:
            env["CONSUL_HTTP_TOKEN"] = spec.registry_token
        child = await self.launcher.start(
            ProcessSpec(
                self._sidecar_name(r),
                argv,
                env=env,
                cwd=ROOT,
                stop_timeout=spec.drain_seconds + 5.0,
            )
        )
        deadline = time.monotonic() + spec.start_timeout
        waiter = asyncio.ensure_future(r.listening.wait())
        exited = asyncio.ensure_future(child.proc.wait())
        try:
            await asyncio.wait({waiter, exited}, timeout=spec.start_timeout,
                               return_when=asyncio.FIRST_COMPLETED)  # fmt: skip
        finally:
            waiter.cancel()
            exited.cancel()
        if not r.listening.is_set():
            raise RunError(f"the sidecar of replica {r.name} did not start: {list(child.tail)}")
        # Ready: registered and discovery up.
        import aiohttp

        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
            while time.monotonic() < deadline:
                with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError):
                    async with session.get(f"http://127.0.0.1:{r.admin}/ready") as resp:
                        if resp.status == 200:
                            return
                if child.returncode is not None:
                    break
                await asyncio.sleep(0.05)
        raise RunError(f"the sidecar of replica {r.name} did not get ready")

    async def _start_app(self, r: Replica) -> None:
        proxy = f"http://127.0.0.1:{r.outbound}"
        env = {
            "PORT": str(r.app_port),
            "HTTP_PROXY": proxy, "http_proxy": proxy,
            "NO_PROXY": "localhost,127.0.0.1,::1", "no_proxy": "localhost,127.0.0.1,::1",
            "TETHER_SERVICE": self.spec.service,
            "TETHER_REPLICA": str(r.slot),
        }  # fmt: skip
        child = await self.launcher.start(
            ProcessSpec(
                self._app_name(r),
                self.spec.command,
                env=env,
                stop_timeout=self.spec.drain_seconds + 5.0,
            )
        )
        r.pid = child.pid
        r.state = "starting"

    async def _wait_in_rotation(self, r: Replica, timeout: float) -> bool:
        """Healthy and passing in the registry (callers can reach it)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            child = self.launcher.children.get(self._app_name(r))
            if child is None or child.returncode is not None:
                return False
            if await self._app_healthy(r) and await self._passing(r):
                r.state = "ready"
                return True
            await asyncio.sleep(0.05)
        return False

    async def start_replica(self, slot: int, port: int) -> Replica:
        r = Replica(slot, self._generations.get(slot, 0), port)
        self._generations[slot] = r.generation + 1
        self._starting.append(r)
        try:
            await self._start_sidecar(r)
            await self._start_app(r)
        finally:
            self._starting.remove(r)
        r.watcher = asyncio.ensure_future(self._watch(r))
        return r

    # -- healing ----------------------------------------------------------------------

    async def _watch(self, r: Replica) -> None:
        """Restart the command when it exits or fails its checks (per --restart)."""
        spec = self.spec
        backoff = spec.backoff_initial
        while True:
            child = self.launcher.children[self._app_name(r)]
            exited = asyncio.ensure_future(child.proc.wait())
            failing = 0
            healthy_since: float | None = None
            started = time.monotonic()
            while not exited.done():
                await asyncio.wait({exited}, timeout=spec.check_interval)
                if exited.done() or r.state in ("draining", "exited"):
                    break
                if await self._app_healthy(r):
                    failing = 0
                    if r.state in ("starting", "restarting"):
                        await self._maintenance(r, False)
                        r.state = "ready"
                        healthy_since = time.monotonic()
                    if healthy_since and time.monotonic() - healthy_since > 10 * backoff:
                        backoff = spec.backoff_initial  # it stayed up: forgive
                elif r.state == "ready" or time.monotonic() - started > spec.start_timeout:
                    failing += 1  # ready and failing, or never healthy since it started
                    if failing >= spec.failures:
                        r.state = "unhealthy"
                        self.out("tether run", f"replica {r.name} failed {failing} checks")
                        await self._maintenance(r, True)
                        await self.launcher.stop(self._app_name(r))
            if r.state in ("draining", "exited") or self.stopping:
                return
            code = child.returncode
            r.exit_code = code
            await self._maintenance(r, True)  # out of rotation at once
            failed = r.state == "unhealthy" or code != 0
            if spec.restart == "always" or (spec.restart == "on-failure" and failed):
                r.state = "restarting"
                r.restarts += 1
                self.out("tether run", f"replica {r.name} exited {code}; restart in {backoff:g}s")
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, spec.backoff_max)
                if self.stopping or r.state != "restarting":
                    return
                await self._start_app(r)
                r.state = "restarting"
                continue
            r.state = "exited"
            self.out("tether run", f"replica {r.name} exited {code}")
            await self.launcher.stop(self._sidecar_name(r))  # drains and deregisters
            if all(x.state == "exited" for x in self.replicas.values()):
                self.done.set()
            return

    # -- rolling restart ------------------------------------------------------------------

    async def rollout_restart(self) -> list[str]:
        """Replace every replica, one at a time, each new one in rotation first."""
        said: list[str] = []
        async with self.rollout_lock:
            for slot in sorted(self.replicas):
                old = self.replicas[slot]
                port = free_port()
                new = await self.start_replica(slot, port)
                if not await self._wait_in_rotation(new, self.spec.start_timeout):
                    await self._retire(new)
                    raise RunError(f"replica {slot}: the new instance never got ready")
                self.replicas[slot] = new
                await self._retire(old)
                said.append(f"replica {old.name} -> {new.name}")
                self.out("tether run", f"rollout: replica {old.name} replaced by {new.name}")
        return said

    async def _retire(self, r: Replica) -> None:
        """Out of rotation, drain the sidecar (the requests it still carries reach the
        command, which runs until then), then stop the command."""
        self._retiring.append(r)
        r.state = "draining"
        await self._maintenance(r, True)
        # Callers' discovery (blocking queries) sees the change within moments; the
        # sidecar's own deregistration grace covers the last of them.
        await self.launcher.stop(self._sidecar_name(r))
        await self.launcher.stop(self._app_name(r))
        r.state = "exited"
        if r.watcher is not None:
            r.watcher.cancel()
        self._retiring.remove(r)

    # -- control socket -------------------------------------------------------------------

    async def _serve_socket(self) -> None:
        path = self.socket_path
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = path.parent.stat()
        if st.st_uid != os.getuid() or st.st_mode & 0o077:
            raise RunError(f"{path.parent} must be a 0700 directory of this user")
        if path.exists():
            if await _socket_alive(path):
                raise RunError(f"{path}: another tether run of {self.spec.service} is running")
            path.unlink()
        app = web.Application(client_max_size=4096)
        app.router.add_get("/status", self._status)
        app.router.add_post("/rollout/restart", self._rollout)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        old = os.umask(0o177)  # the socket is born 0600
        try:
            await web.UnixSite(runner, str(path)).start()
        finally:
            os.umask(old)
        self._runner = runner

    async def _status(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "service": self.spec.service,
                "replicas": [r.view() for _, r in sorted(self.replicas.items())],
            }
        )

    async def _rollout(self, request: web.Request) -> web.Response:
        if self.rollout_lock.locked():
            return web.json_response({"error": "a rollout is under way"}, status=409)
        try:
            said = await self.rollout_restart()
        except RunError as exc:
            return web.json_response({"error": str(exc)}, status=500)
        return web.json_response({"replaced": said})

    # -- the whole run --------------------------------------------------------------------

    async def run(self) -> int:
        spec = self.spec
        self._consul = consul.aio.Consul(
            host=spec.registry_host, port=spec.registry_port, token=spec.registry_token
        )
        loop = asyncio.get_running_loop()
        stop_signal: list[int] = []
        stop = asyncio.Event()

        def on_stop(sig: int) -> None:
            stop_signal.append(sig)
            stop.set()

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_stop, sig)
        for sig in FORWARDED:
            loop.add_signal_handler(sig, self._forward, sig)
        try:
            await self._serve_socket()
            ports = [spec.port] + [free_port() for _ in range(spec.replicas - 1)]
            started = await asyncio.gather(
                *(self.start_replica(slot, port) for slot, port in enumerate(ports))
            )
            self.replicas.update(enumerate(started))
            self.out("tether run", f"{spec.service}: {spec.replicas} replica(s) started; "
                     f"control socket {self.socket_path}")  # fmt: skip
            waiter = asyncio.ensure_future(stop.wait())
            finished = asyncio.ensure_future(self.done.wait())
            await asyncio.wait({waiter, finished}, return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
            finished.cancel()
        except RunError as exc:
            self.out("tether run", f"error: {exc}")
            await self.shutdown(signal.SIGTERM)
            return 1
        await self.shutdown(stop_signal[0] if stop_signal else signal.SIGTERM)
        return self.exit_code()

    def exit_code(self) -> int:
        codes = [r.exit_code for _, r in sorted(self.replicas.items())]
        for code in codes:
            if code:
                return code if code > 0 else 128 - code  # killed by signal N: 128+N
        return 0

    def _forward(self, sig: int) -> None:
        for r in self.replicas.values():
            self.launcher.send_signal(self._app_name(r), sig)

    async def shutdown(self, sig: int) -> None:
        """Out of rotation, the signal to the commands, then the sidecars drain."""
        self.stopping = True
        live = list(self.replicas.values())
        await asyncio.gather(*(self._maintenance(r, True) for r in live if r.state != "exited"))
        for r in live:
            if r.watcher is not None:
                r.watcher.cancel()
        for r in live:
            r.state = "draining" if r.state != "exited" else r.state

        async def app_exit(r: Replica) -> None:
            name = self._app_name(r)
            child = self.launcher.children.get(name)
            if child is not None and child.returncode is None:
                await self.launcher.stop(name, sig=sig)
                r.exit_code = child.returncode

        await asyncio.gather(*(app_exit(r) for r in live))
        await self.launcher.stop_all([self._sidecar_name(r) for r in live])
        await self.launcher.aclose()
        if self._runner is not None:
            await self._runner.cleanup()
            with contextlib.suppress(OSError):
                self.socket_path.unlink()
        if self._consul is not None:
            await self._consul.close()


async def _socket_alive(path: Path) -> bool:
    try:
        _, writer = await asyncio.open_unix_connection(str(path))
    except OSError:
        return False
    writer.close()
    return True


async def control(path: Path, method: str, route: str, timeout: float) -> tuple[int, Any]:
    """One request to a running `tether run` over its control socket."""
    import aiohttp

    connector = aiohttp.UnixConnector(path=str(path))
    try:
        async with aiohttp.ClientSession(
            connector=connector, timeout=aiohttp.ClientTimeout(total=timeout)
        ) as session:
            async with session.request(method, f"http://tether-run{route}") as resp:
                return resp.status, await resp.json(content_type=None)
    except aiohttp.ClientConnectionError:
        raise RunError(f"no tether run listens at {path}") from None


def _print(name: str, line: str) -> None:
    print(f"{name:>18} | {line}", flush=True)
