"""Idle RSS of real `tether sidecar` processes, with and without mTLS.

    python -m bench.idle_rss_bench [--requests 20] [--settle 3] [--imports]

Starts a `tether registry`, a small HTTP app, and two sidecars (`caller` and `callee`,
the callee in front of the app) twice: once attached to a `tether controlplane` running
the mesh CA (each sidecar makes its key, sends its CSR and holds a leaf; the hop between
them is mTLS), once without a control plane (plaintext, no CA). Each time it sends
`--requests` requests from the caller's outbound listener to the callee through the mesh,
waits `--settle` seconds, and reads VmRSS from /proc/<pid>/status of each sidecar
process (never of this process). `--imports` also prints which top-level packages the
idle mTLS sidecar holds in `sys.modules` (read through its admin listener's
`/config_dump`? no: from a second sidecar run with `-X importtime`, summed per package).
"""

from __future__ import annotations

import argparse
import http.client
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from bench.ports import free_port, wait_port

ROOT = Path(__file__).resolve().parent.parent
APP = (
    "import http.server, sys\n"
    "class H(http.server.BaseHTTPRequestHandler):\n"
    "    protocol_version = 'HTTP/1.1'\n"
    "    def do_GET(self):\n"
    "        body = b'ok ' * 30\n"
    "        self.send_response(200)\n"
    "        self.send_header('Content-Length', str(len(body)))\n"
    "        self.end_headers()\n"
    "        self.wfile.write(body)\n"
    "    def log_message(self, *a):\n"
    "        pass\n"
    "http.server.ThreadingHTTPServer(('127.0.0.1', int(sys.argv[1])), H).serve_forever()\n"
)


def vm_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


class Procs:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.procs: list[subprocess.Popen[Any]] = []

    def start(
        self, name: str, cmd: list[str], port: int, env: dict[str, str] | None = None
    ) -> subprocess.Popen[Any]:
        log = open(self.workdir / f"{name}.log", "wb")  # noqa: SIM115
        popen = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
        self.procs.append(popen)
        wait_port(port, popen, timeout=60)
        return popen

    def log(self, name: str) -> str:
        return (self.workdir / f"{name}.log").read_text(errors="replace")

    def stop(self) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                p.terminate()
        for p in reversed(self.procs):
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
        self.procs.clear()


def tether(*args: str) -> list[str]:
    return [sys.executable, "-m", "tether.cli", *args]


def send(port: int, host: str, n: int) -> int:
    """`n` requests to `host` through an outbound listener on one keep-alive connection."""
    ok = 0
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    for i in range(n):
        conn.request("GET", f"/idle/{i}", headers={"Host": host})
        resp = conn.getresponse()
        resp.read()
        ok += resp.status == 200
    conn.close()
    return ok


def run_mesh(
    procs: Procs, tmp: Path, *, mtls: bool, requests: int, settle: float, importtime: bool
) -> dict[str, Any]:
    tag = "mtls" if mtls else "plain"
    reg_port, app_port = free_port(), free_port()
    procs.start(
        f"registry-{tag}",
        tether("registry", "--port", str(reg_port), "--data-dir", str(tmp / f"reg-{tag}"),
               "--node", "bench"),
        reg_port,
    )  # fmt: skip
    env = dict(os.environ, CONSUL_HTTP_ADDR=f"127.0.0.1:{reg_port}")
    env.pop("OTEL_TRACES_EXPORTER", None)
    extra: list[str] = []
    if mtls:
        cp_port = free_port()
        cp_env = dict(env, TETHER_CA_KEY_DIR=str(tmp / f"ca-{tag}"))
        procs.start(
            f"controlplane-{tag}",
            tether("controlplane", "--port", str(cp_port), "--tls-port", "0"),
            cp_port,
            cp_env,
        )
        extra = ["--controlplane", f"http://127.0.0.1:{cp_port}"]
    procs.start(f"app-{tag}", [sys.executable, "-c", APP, str(app_port)], app_port)
    pids: dict[str, int] = {}
    ports: dict[str, int] = {}
    for name in ("callee", "caller"):
        out, inb, adm = free_port(), free_port(), free_port()
        side_env = dict(env)
        if importtime and name == "caller":
            side_env["PYTHONPROFILEIMPORTTIME"] = "1"
        p = procs.start(
            f"{name}-{tag}",
            tether("sidecar", "--service", f"rss{name}", "--app-port", str(app_port),
                   "--outbound-port", str(out), "--inbound-port", str(inb),
                   "--admin-port", str(adm), *extra),
            out,
            side_env,
        )  # fmt: skip
        pids[name], ports[name] = p.pid, out
    for name in pids:
        line = procs.log(f"{name}-{tag}")
        want = "mtls=on" if mtls else "mtls=off"
        deadline = time.monotonic() + 30
        while want not in line and time.monotonic() < deadline:
            time.sleep(0.1)
            line = procs.log(f"{name}-{tag}")
        if want not in line:
            raise RuntimeError(f"{name} ({tag}) did not start as expected:\n{line[-2000:]}")
    # The callee is found once registered and passing: retry the first request a while.
    deadline = time.monotonic() + 30
    while True:
        try:
            if send(ports["caller"], "rsscallee", 1) == 1:
                break
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"no request went through ({tag})")
        time.sleep(0.2)
    ok = send(ports["caller"], "rsscallee", requests)
    time.sleep(settle)  # idle: renewals are hours away, the push is quiet
    result: dict[str, Any] = {n: vm_rss_mb(pid) for n, pid in pids.items()}
    result["ok"] = ok
    if importtime:
        result["importlog"] = procs.log(f"caller-{tag}")
    procs.stop()
    return result


def import_shares(log: str, top: int = 14) -> list[tuple[str, float, int]]:
    """Cumulative import time of the top-level packages a process imported (from
    `-X importtime` lines), and how many modules each brought: what an idle sidecar loads."""
    own: dict[str, float] = defaultdict(float)
    count: dict[str, int] = defaultdict(int)
    for line in log.splitlines():
        m = re.match(r"import time:\s+(\d+) \|\s+\d+ \|(\s*)(\S+)", line)
        if not m:
            continue
        pkg = m.group(3).split(".")[0]
        own[pkg] += int(m.group(1)) / 1000
        count[pkg] += 1
    rows = sorted(own.items(), key=lambda kv: -kv[1])[:top]
    return [(k, v, count[k]) for k, v in rows]


def main() -> None:
    p = argparse.ArgumentParser(prog="bench.idle_rss_bench")
    p.add_argument("--requests", type=int, default=20)
    p.add_argument("--settle", type=float, default=3.0)
    p.add_argument("--imports", action="store_true", help="modules the mTLS caller loads")
    args = p.parse_args()
    if not 0 < args.requests <= 10_000:
        sys.exit("--requests: 1..10000")
    with tempfile.TemporaryDirectory(prefix="tether-rss-") as d:
        tmp = Path(d)
        procs = Procs(tmp)
        try:
            plain = run_mesh(procs, tmp, mtls=False, requests=args.requests,
                             settle=args.settle, importtime=False)  # fmt: skip
            mtls = run_mesh(procs, tmp, mtls=True, requests=args.requests,
                            settle=args.settle, importtime=args.imports)  # fmt: skip
        finally:
            procs.stop()
    print("| sidecar | idle RSS MB, plaintext (no control plane) | idle RSS MB, mTLS |")
    print("|---|---|---|")
    for name in ("caller", "callee"):
        print(f"| {name} | {plain[name]:.1f} | {mtls[name]:.1f} |")
    print(f"requests served: plaintext {plain['ok']}/{args.requests}, "
          f"mTLS {mtls['ok']}/{args.requests}")  # fmt: skip
    if args.imports:
        print("\nimport time by package in the mTLS caller (ms, modules):")
        for pkg, ms, n in import_shares(mtls["importlog"]):
            print(f"  {pkg:28s} {ms:8.1f} {n:5d}")


if __name__ == "__main__":
    main()
