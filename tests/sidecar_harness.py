"""The mesh under test, at three levels, and the real processes of end-to-end tests.

Everything here is a real process or a real server on 127.0.0.1 with an ephemeral
port. Every process is started in its own session and killed (its whole group) by
`ProcessSet.close`, which the fixtures call even when a test fails.

One harness for every test that runs traffic through a mesh (`Mesh` and `ProcessMesh`
at the end of this module), at the level the test needs:

- `Mesh.static`: in-process outbound and inbound listeners over a `StaticDirectory`
  (no registry), in front of one app: the proxy path over real sockets;
- `Mesh.with_registry`: an in-process outbound listener over a `ConsulDirectory`
  watching a real registry, with "who" apps registered in it: discovery and balancing;
- `Mesh.with_policy`: the static level's directory with the control plane's routing
  step (an applied `Policy` snapshot): retries, timeouts, breakers, outliers;
- `ProcessMesh`: registry, control plane and sidecars as real processes
  (`tether registry|controlplane|sidecar`), "who" apps on a thread: policy end to end.

The "who" apps answer every path with `{"name": ..., "path": ...}`, and `calls` counts
who answered (`who_answered`), at every level.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
from aiohttp import web

from proxy.balance import Endpoint
from proxy.cluster import Cluster, StaticDirectory
from proxy.downstream import TimeoutPolicy
from proxy.listener import Listener, start_inbound, start_outbound
from proxy.stats import ProxyStats
from tests.conftest import ControlPlaneProcess, RegistryProcess, serve_app
from tests.polling import poll

ROOT = Path(__file__).resolve().parent.parent


class App:
    """An app in a thread: `/health`, `/who` (its name), `/slow?s=N` (answers after N s)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.hits = 0
        self.conns: set[socket.socket] = set()
        app = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def setup(self) -> None:
                super().setup()
                app.conns.add(self.connection)

            def finish(self) -> None:
                app.conns.discard(self.connection)
                super().finish()

            def do_GET(self) -> None:
                url = urlsplit(self.path)
                if url.path != "/health":
                    app.hits += 1
                if url.path == "/slow":
                    time.sleep(float(parse_qs(url.query).get("s", ["1"])[0]))
                body = json.dumps(
                    {
                        "name": app.name,
                        "path": url.path,
                        "headers": {k.lower(): v for k, v in self.headers.items()},
                    }
                ).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = int(self.server.server_address[1])
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        """Stop as a dying process would: keep-alive connections are cut too."""
        self.server.shutdown()
        self.server.server_close()
        for conn in list(self.conns):
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class Sidecar:
    """`tether sidecar` as a child process, all its listeners on port 0."""

    LISTENING = re.compile(r"tether sidecar \S+: listening (.*)$", re.M)

    def __init__(self, proc: subprocess.Popen[bytes], log: Path) -> None:
        self.proc = proc
        self.log = log
        self.ports: dict[str, int] = {}
        self.instance_id = ""
        self.build = ""  # "compiled" or "pure" (proxy/build_info.py)

    def wait_listening(self, timeout: float = 20.0) -> None:
        def found() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(f"sidecar exited {self.proc.returncode}:\n{self.output()}")
            m = self.LISTENING.search(self.log.read_text(errors="replace"))
            if m is None:
                return False
            fields = dict(kv.split("=", 1) for kv in m.group(1).split())
            for name in ("outbound", "inbound", "admin"):
                self.ports[name] = int(fields[name].rpartition(":")[2])
            self.instance_id = fields["id"]
            self.build = fields["build"]
            return True

        deadline = time.monotonic() + timeout
        while not found():
            if time.monotonic() > deadline:
                raise AssertionError(f"sidecar did not listen:\n{self.output()}")
            time.sleep(0.02)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def admin(self, path: str) -> tuple[int, Any]:
        conn = http.client.HTTPConnection("127.0.0.1", self.ports["admin"], timeout=5)
        try:
            conn.request("GET", path)
            resp = conn.getresponse()
            body = resp.read()
        finally:
            conn.close()
        try:
            return resp.status, json.loads(body)
        except ValueError:
            return resp.status, body.decode()

    def ready(self) -> bool:
        return self.admin("/ready")[0] == 200

    def cluster(self, service: str, namespace: str = "default") -> dict[str, Any] | None:
        _, body = self.admin("/clusters")
        for c in body["clusters"]:
            if c["service"] == service and c["namespace"] == namespace:
                return dict(c)
        return None

    def endpoint_ids(self, service: str) -> set[str]:
        """The endpoints in rotation (a critical instance stays listed, as "critical")."""
        c = self.cluster(service)
        return {ep["id"] for ep in c["endpoints"] if ep["health"] != "critical"} if c else set()

    def call(
        self, url: str, headers: dict[str, str] | None = None, timeout: float = 10.0
    ) -> tuple[int, dict[str, str], bytes]:
        """One request through the outbound listener, absolute-form (as HTTP_PROXY does)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.ports["outbound"], timeout=timeout)
        try:
            conn.request("GET", url, headers=headers or {})
            resp = conn.getresponse()
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
        finally:
            conn.close()

    def terminate(self) -> None:
        self.proc.send_signal(signal.SIGTERM)


class ProcessSet:
    """Starts sidecars; `close` kills every process group it started."""

    def __init__(self, tmp: Path, registry_port: int) -> None:
        self.tmp = tmp
        self.registry_port = registry_port
        self.sidecars: list[Sidecar] = []
        self.apps: list[App] = []
        self.closers: list[Callable[[], None]] = []

    def app(self, name: str) -> App:
        a = App(name)
        self.apps.append(a)
        return a

    def sidecar(
        self,
        service: str,
        app: Any,
        *args: str,
        wait_ready: bool = True,
        env: dict[str, str] | None = None,
        health_path: str | None = "/health",
    ) -> Sidecar:
        """A sidecar for `app` (anything with a `port`); `env`: variables added to this
        process's environment; `health_path` None checks the app over TCP."""
        log = self.tmp / f"sidecar-{service}-{len(self.sidecars)}.log"
        health = ["--app-health-path", health_path] if health_path else []
        cmd = [
            sys.executable, "-m", "tether.cli", "sidecar", "--service", service,
            "--app-port", str(app.port), *health,
            "--outbound-port", "0", "--inbound-port", "0", "--admin-port", "0",
            "--check-interval", "1", *args,
        ]  # fmt: skip
        env = dict(os.environ, **(env or {}), CONSUL_HTTP_ADDR=f"127.0.0.1:{self.registry_port}")
        with log.open("wb") as out:
            proc = subprocess.Popen(
                cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        sc = Sidecar(proc, log)
        self.sidecars.append(sc)
        sc.wait_listening()
        if wait_ready:
            poll(sc.ready, 20, f"sidecar {service} ready")
        return sc

    def close(self) -> None:
        for sc in self.sidecars:
            if sc.proc.poll() is None:
                try:
                    os.killpg(sc.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            try:
                sc.proc.wait(10)
            except subprocess.TimeoutExpired:
                pass
        for a in self.apps:
            a.close()
        for close in self.closers:
            close()


def processes() -> Iterator[tuple[int, int, int]]:
    """(pid, ppid, pgid) of every process on the machine."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # Fields after the command (which may hold spaces) in parentheses.
        rest = stat[stat.rfind(")") + 2 :].split()
        yield int(entry), int(rest[1]), int(rest[2])


def descendants(root: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for pid, ppid, _ in processes():
        children.setdefault(ppid, []).append(pid)
    out: set[int] = set()
    todo = [root]
    while todo:
        for c in children.get(todo.pop(), []):
            if c not in out:
                out.add(c)
                todo.append(c)
    return out


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return state[state.rfind(")") + 2] != "Z"  # a zombie has exited


# ---------------------------------------------------------------------------------------
# The mesh under test: one harness, three levels (see the module's docstring)


def who_app(name: str, delays: dict[str, float] | None = None) -> web.Application:
    """An app that says who it is on every path and method: `{"name", "path"}`; it
    answers after `delays[name]` seconds when the test sets one."""

    async def who(request: web.Request) -> web.Response:
        delay = delays.get(name, 0.0) if delays is not None else 0.0
        if delay:
            await asyncio.sleep(delay)
        return web.json_response({"name": name, "path": request.path})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", who)
    return app


def who_answered(status: int, body: bytes) -> str:
    """The name a "who" app answered with; `<status>` for anything else (a local reply,
    an error)."""
    if status == 200:
        try:
            doc = json.loads(body)
        except ValueError:
            doc = None
        if isinstance(doc, dict) and isinstance(doc.get("name"), str):
            return str(doc["name"])
    return f"<{status}>"


@dataclass
class Mesh:
    """The in-process levels: real listeners on the test's event loop."""

    outbound: Listener
    directory: Any  # StaticDirectory or ConsulDirectory
    stats: ProxyStats
    inbound_listener: Listener | None = None  # the static level's
    app_port: int = 0
    consul: Any = None  # consul.aio.Consul on the registry (Mesh.with_registry)
    policy: Any = None  # proxy.policy.Policy (Mesh.with_policy)
    delays: dict[str, float] = field(default_factory=dict)  # who_app's, by name
    closers: list[Callable[[], Awaitable[Any]]] = field(default_factory=list)

    @classmethod
    async def static(cls, app_port: int, timeouts: TimeoutPolicy | None = None) -> Mesh:
        """client → outbound → inbound → the app at `app_port`: clusters `orders.default`
        and `billing.payments` (both through the inbound listener) and `empty.default`
        (no endpoint)."""
        stats = ProxyStats()
        inbound = await start_inbound(app_port, stats=stats, port=0, timeouts=timeouts)
        orders = Cluster("orders", "default")
        orders.set_endpoints([Endpoint("orders-1", "127.0.0.1", inbound.port)])
        pay = Cluster("billing", "payments")
        pay.set_endpoints([Endpoint("billing-1", "127.0.0.1", inbound.port)])
        empty = Cluster("empty", "default")
        directory = StaticDirectory([orders, pay, empty])
        outbound = await start_outbound(directory, stats=stats, port=0, timeouts=timeouts)
        return cls(outbound, directory, stats, inbound, app_port,
                   closers=[outbound.aclose, inbound.aclose])  # fmt: skip

    @classmethod
    async def with_registry(
        cls,
        registry_port: int,
        service: str,
        instances: dict[str, str],
        balancer_factory: Callable[[], Any],
        rng: Any = None,
    ) -> Mesh:
        """client → outbound → `who_app`s: one per instance (id → zone), registered in the
        registry at `registry_port` as `service` with a passing TTL check
        (`ttl:<id>`), discovered with blocking queries."""
        import consul.aio

        from proxy.discovery import ConsulDirectory

        mesh_delays: dict[str, float] = {}
        client = consul.aio.Consul(host="127.0.0.1", port=registry_port)
        closers: list[Callable[[], Awaitable[Any]]] = [client.close]
        try:
            for name, zone in instances.items():
                runner, port = await serve_app(who_app(name, mesh_delays))
                closers.insert(0, runner.cleanup)
                assert await client.agent.service.register(
                    service,
                    service_id=name,
                    address="127.0.0.1",
                    port=port,
                    meta={"zone": zone},
                    check={"CheckID": f"ttl:{name}", "Name": "ttl", "TTL": "600s",
                           "Status": "passing"},
                )  # fmt: skip
            directory = ConsulDirectory(
                client, wait=5.0, rng=rng, balancer_factory=balancer_factory
            )
            directory.start()
            closers.insert(0, directory.aclose)
            stats = ProxyStats()
            outbound = await start_outbound(directory, stats=stats, host="127.0.0.1", port=0)
            closers.insert(0, outbound.aclose)
        except BaseException:
            for close in closers:
                await close()
            raise
        return cls(outbound, directory, stats, consul=client, delays=mesh_delays, closers=closers)

    @property
    def inbound(self) -> Listener:
        """The inbound listener in front of the app (the static level)."""
        assert self.inbound_listener is not None, "no inbound listener at this level"
        return self.inbound_listener

    @classmethod
    async def with_policy(cls, directory: StaticDirectory, policy: Any) -> Mesh:
        """client → the policy-routing outbound listener → `directory`'s endpoints, with
        `policy` (a proxy.policy.Policy over `directory`, a snapshot applied)."""
        from proxy.policy_router import start_policy_outbound

        listener = await start_policy_outbound(directory, policy, port=0)
        stats = listener.proxy.stats
        return cls(listener, directory, stats, policy=policy, closers=[listener.aclose])

    def cluster(self, service: str, namespace: str = "default") -> Cluster:
        found: Cluster | None = self.directory.lookup(namespace, service)
        assert found is not None, f"no cluster {service}.{namespace}"
        return found

    def destination(self, name: str, listener: str = "outbound") -> Any:
        """The listener's stats of one destination (`svc.ns`)."""
        return self.stats.destination(listener, name)

    async def request(
        self,
        method: str = "GET",
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
        url: str = "http://orders/x",
    ) -> tuple[int, str, str]:
        """One request through the outbound listener as an HTTP proxy (aiohttp): its
        status, its `x-tether-error` reason ("" for none) and its body."""
        proxy = f"http://127.0.0.1:{self.outbound.port}"
        async with aiohttp.ClientSession() as http:
            async with http.request(method, url, data=body, proxy=proxy, headers=headers) as resp:
                text = await resp.text()
                return resp.status, resp.headers.get("x-tether-error", ""), text

    def add_cluster(self, name: str, port: int) -> None:
        """A cluster `name.default` with one endpoint at `port` (the static level)."""
        c = Cluster(name, "default")
        c.set_endpoints([Endpoint(f"{name}-1", "127.0.0.1", port)])
        self.directory.add(c)

    async def calls(self, n: int, host: str, path: str = "/", concurrency: int = 8) -> Counter[str]:
        """`n` requests to `host` through the outbound listener, `concurrency` at a time
        on keep-alive connections; who answered (`who_answered`)."""
        answered: Counter[str] = Counter()
        todo = iter(range(n))
        url = f"http://127.0.0.1:{self.outbound.port}{path}"
        async with aiohttp.ClientSession() as http:

            async def worker() -> None:
                for _ in todo:
                    async with http.get(url, headers={"Host": host}) as resp:
                        answered[who_answered(resp.status, await resp.read())] += 1

            await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(concurrency))), 60)
        return answered

    def endpoints(self, service: str, namespace: str = "default") -> list[Any]:
        cluster = self.directory.lookup(namespace, service)
        return list(cluster.endpoints) if cluster is not None else []

    def healthy(self, service: str) -> int:
        """How many of `service`'s endpoints are in rotation."""
        return sum(ep.healthy for ep in self.endpoints(service))

    def zones(self, service: str) -> set[str]:
        """Zones with an endpoint of `service` in rotation (failing instances stay
        members, unhealthy)."""
        return {ep.zone for ep in self.endpoints(service) if ep.healthy}

    async def aclose(self) -> None:
        for close in self.closers:
            await close()


class WhoApps:
    """`who_app`s for processes to call: aiohttp servers on an event loop in a thread.

    (aiohttp answers each response in one write; the threaded http.server of `App`
    writes head and body apart, which costs a delayed ACK per request.)
    """

    def __init__(self, names: list[str]) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.runners: list[web.AppRunner] = []
        self.ports = {n: self._run(self._start(n)) for n in names}

    def _run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)

    async def _start(self, name: str) -> int:
        runner, port = await serve_app(who_app(name))
        self.runners.append(runner)
        return port

    def app(self, name: str) -> Any:
        """What `ProcessSet.sidecar` takes: something with a `port`."""
        return SimpleNamespace(port=self.ports[name])

    def close(self) -> None:
        async def stop() -> None:
            for r in self.runners:
                await r.cleanup()

        self._run(stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


class ProcessMesh:
    """The process level: a registry and a control plane as `tether` processes, sidecars
    (`sidecar`) attached to that control plane, and `who_app`s named `apps`. `start`
    starts them; `close` stops whatever started, even after a failed start."""

    def __init__(self, tmp: Path, apps: list[str]) -> None:
        self.registry = RegistryProcess(tmp / "reg")
        self.cp = ControlPlaneProcess(self.registry.port, tmp / "cp.log")
        self.procs = ProcessSet(tmp, self.registry.port)
        self.app_names = apps
        self.backends: WhoApps | None = None
        self.caller: Sidecar | None = None  # whose outbound listener `calls` goes through
        self.callee = ""  # the service `calls` calls

    def start(self) -> None:
        self.registry.start()
        self.cp.start()
        self.backends = WhoApps(self.app_names)

    def sidecar(
        self, service: str, app: str, *args: str, env: dict[str, str] | None = None
    ) -> Sidecar:
        """A sidecar for `service` in front of the app named `app`, on the control plane."""
        assert self.backends is not None, "start() first"
        return self.procs.sidecar(
            service, self.backends.app(app), *args, "--controlplane", self.cp.url, env=env
        )

    def calls(
        self, n: int, headers: dict[str, str] | None = None, path: str = "/who"
    ) -> Counter[str]:
        """`n` sequential requests to `callee` through `caller`'s outbound listener, on one
        keep-alive connection, absolute-form; who answered (`who_answered`)."""
        assert self.caller is not None and self.callee, "set caller and callee first"
        got: Counter[str] = Counter()
        port = self.caller.ports["outbound"]
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        try:
            for _ in range(n):
                conn.request("GET", f"http://{self.callee}{path}", headers=headers or {})
                resp = conn.getresponse()
                got[who_answered(resp.status, resp.read())] += 1
        finally:
            conn.close()
        return got

    def close(self) -> None:
        self.procs.close()
        if self.backends is not None:
            self.backends.close()
        self.cp.stop()
        self.registry.stop()
