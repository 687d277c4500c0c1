"""Real processes for end-to-end tests: sidecars (`python -m tether.cli sidecar`) and apps.

Everything here is a real process or a real server on 127.0.0.1 with an ephemeral
port. Every process is started in its own session and killed (its whole group) by
`ProcessSet.close`, which the fixtures call even when a test fails.
"""

from __future__ import annotations

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
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

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
