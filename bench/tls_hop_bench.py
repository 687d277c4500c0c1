"""What mTLS costs the two-hop mesh path, per request, by process counters.

    python -m bench.tls_hop_bench [--requests 20000] [--connections 16] [--rounds 3]
                                  [--syscalls] [--instructions]

Runs Tether's two hops (`bench.tether_proxy` outbound → inbound → an nginx upstream
answering 100 bytes, as `make bench`) three ways: plaintext; mTLS as the sidecar runs
it; and mTLS with malloc's thresholds left as glibc sets them (`--malloc glibc`, before
`proxy.listener.keep_reads_on_heap`); and nginx's two hops, plaintext and mTLS (the
configuration of `make bench`: TLS 1.3, client certificates, a keep-alive pool). A
client process sends `--requests` requests over `--connections` keep-alive connections
(each sends its next request once the last answer is in); the proxies are pinned to
CPU 0, the client and upstream to CPU 1. Per path, from /proc/<pid>/stat of the proxy
processes: CPU µs per request (utime+stime; moves with the machine's load: the median
of `--rounds` interleaved rounds, ratios taken within each round) and minor page
faults per request (does not move). `--syscalls`:
system calls per request of each proxy, by name (strace -c, one extra round).
`--instructions`: user-space instructions per request of both proxies (callgrind: two
runs of 500 and 2,500 requests, the difference divided by 2,000, so start-up cancels out;
deterministic up to the scheduling of the two processes, about a minute per path).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.ports import free_port, wait_port

ROOT = Path(__file__).resolve().parent.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")
PROXY_CPU = "0"
LOAD_CPU = "1"
REQUEST = b"GET /api/items HTTP/1.1\r\nHost: svc\r\nUser-Agent: bench\r\nAccept: */*\r\n\r\n"
BODY = b"x" * 99 + b"\n"
RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 100\r\n\r\n" + BODY
PATHS = {
    "tether x2": [],
    "tether x2 mTLS": ["--mtls"],
    "tether x2 mTLS, glibc malloc thresholds": ["--mtls", "--malloc", "glibc"],
}


# -- the upstream and the client (run as `python -m bench.tls_hop_bench upstream|client`) --


class _Upstream(asyncio.Protocol):
    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.buf = b""

    def data_received(self, data: bytes) -> None:
        self.buf += data
        n = self.buf.count(b"\r\n\r\n")
        if n:
            self.buf = self.buf[self.buf.rfind(b"\r\n\r\n") + 4 :]
            self.transport.write(RESPONSE * n)


async def _serve(port: int) -> None:
    loop = asyncio.get_running_loop()
    await loop.create_server(_Upstream, "127.0.0.1", port)
    await asyncio.Event().wait()


async def _drive(port: int, total: int, connections: int) -> None:
    left = [total]

    async def one() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        while left[0] > 0:
            left[0] -= 1
            writer.write(REQUEST)
            head = await reader.readuntil(b"\r\n\r\n")
            if not head.startswith(b"HTTP/1.1 200"):
                raise SystemExit(f"unexpected answer: {head[:80]!r}")
            await reader.readexactly(len(BODY))
        writer.close()

    await asyncio.wait_for(asyncio.gather(*(one() for _ in range(connections))), 600)


# -- the paths ----------------------------------------------------------------------------


def _pinned(cpu: str, cmd: list[str]) -> list[str]:
    if shutil.which("taskset") and (os.cpu_count() or 1) >= 2:
        return ["taskset", "-c", cpu, *cmd]
    return cmd


def _stat(pid: int) -> tuple[float, int]:
    """CPU seconds (utime + stime) and minor faults of a process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK, int(fields[7])


class Path2:
    """Two Tether hops and their upstream, started once, driven many times."""

    def __init__(self, tmp: Path, name: str, flags: list[str], wrap: Sequence[str] = ()) -> None:
        self.name = name
        self.procs: list[subprocess.Popen[Any]] = []
        try:
            self._launch(tmp, flags, list(wrap))
        except BaseException:
            self.stop()
            raise

    def _launch(self, tmp: Path, flags: list[str], wrap: list[str]) -> None:
        py = sys.executable
        up = free_port()
        self._start([py, "-m", "bench.tls_hop_bench", "upstream", str(up)], up, LOAD_CPU, tmp)
        extra = []
        for f in flags:
            extra += [f, str(tmp / "certs")] if f == "--mtls" else [f]
        inb, out = free_port(), free_port()
        self.inbound = self._start(
            [*wrap, py, "-m", "bench.tether_proxy", "inbound", "--port", str(inb),
             "--app-port", str(up), *extra], inb, PROXY_CPU, tmp,
        )  # fmt: skip
        self.outbound = self._start(
            [*wrap, py, "-m", "bench.tether_proxy", "outbound", "--port", str(out),
             "--cluster", f"svc=127.0.0.1:{inb}", *extra], out, PROXY_CPU, tmp,
        )  # fmt: skip
        self.port = out
        self.warm()

    def warm(self) -> None:
        """Pools filled, handshakes done, head caches warm (a first answer may be a 503
        while a slow start, under valgrind, still handshakes)."""
        deadline = time.monotonic() + 300
        while True:
            try:
                self.drive(20, 1)
                break
            except RuntimeError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(1.0)
        self.drive(200, 4)

    def _start(self, cmd: list[str], port: int, cpu: str, tmp: Path) -> subprocess.Popen[Any]:
        log = open(tmp / f"{port}.log", "wb")  # noqa: SIM115
        p = subprocess.Popen(_pinned(cpu, cmd), stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        self.procs.append(p)
        wait_port(port, p, timeout=300)
        return p

    def drive(self, requests: int, connections: int) -> None:
        cmd = [sys.executable, "-m", "bench.tls_hop_bench", "client", str(self.port),
               str(requests), str(connections)]  # fmt: skip
        done = subprocess.run(_pinned(LOAD_CPU, cmd), cwd=ROOT, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{self.name}: the client failed: {done.stderr[-1000:]}")

    def measure(self, requests: int, connections: int) -> tuple[float, float]:
        """(CPU µs, minor faults) per request of both proxies."""
        return _measure(self, [self.inbound.pid, self.outbound.pid], requests, connections)

    def syscalls(self, requests: int, connections: int, tmp: Path) -> dict[str, Counter[str]]:
        out: dict[str, Counter[str]] = {}
        tracers = []
        for role, proc in (("inbound", self.inbound), ("outbound", self.outbound)):
            path = tmp / f"strace-{role}.txt"
            tracers.append((role, path, subprocess.Popen(
                ["strace", "-c", "-f", "-p", str(proc.pid), "-o", str(path)],
                stderr=subprocess.DEVNULL,
            )))  # fmt: skip
        time.sleep(1.0)  # attached
        self.drive(requests, connections)
        for role, path, tracer in tracers:
            tracer.send_signal(2)
            tracer.wait(30)
            counts: Counter[str] = Counter()
            for line in path.read_text().splitlines():
                m = re.match(r"\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:\d+\s+)?(\w+)$", line)
                if m and m.group(2) != "total":
                    counts[m.group(2)] = int(m.group(1))
            out[role] = counts
        return out

    def stop(self) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(120)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(10)


def instructions(tmp: Path, name: str, flags: list[str]) -> int:
    """User-space instructions per request of both proxies (callgrind, two runs)."""

    def total(requests: int) -> int:
        out = tmp / f"cg-{requests}"
        out.mkdir(exist_ok=True)
        wrap = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}/cg.%p"]
        path = Path2(tmp, name, flags, wrap)
        try:
            path.drive(requests, 4)
        finally:
            path.stop()
        count = 0
        for f in out.iterdir():
            m = re.search(r"^(?:summary|totals): (\d+)", f.read_text(errors="replace"), re.M)
            if m:
                count += int(m.group(1))
            f.unlink()
        return count

    return (total(2_500) - total(500)) // 2_000


class FleetPath:
    """A measured path of `bench.proxy_bench`'s Fleet (its processes, its nginx configs)."""

    def __init__(self, name: str, procs: list[Any], port: int) -> None:
        self.name = name
        self.procs = procs
        self.port = port
        Path2.warm(self)  # type: ignore[arg-type]

    def drive(self, requests: int, connections: int) -> None:
        Path2.drive(self, requests, connections)  # type: ignore[arg-type]

    def measure(self, requests: int, connections: int) -> tuple[float, float]:
        pids = [pid for p in self.procs for pid in p.pids()]
        return _measure(self, pids, requests, connections)


def _measure(path: Any, pids: list[int], requests: int, connections: int) -> tuple[float, float]:
    """(CPU µs, minor faults) per request of the processes `pids` while `path` drives
    `requests` requests over `connections` connections."""
    before = [_stat(p) for p in pids]
    path.drive(requests, connections)
    after = [_stat(p) for p in pids]
    cpu = sum(a[0] - b[0] for a, b in zip(after, before, strict=True))
    faults = sum(a[1] - b[1] for a, b in zip(after, before, strict=True))
    return cpu / requests * 1e6, faults / requests


def fleet_paths(fleet: Any, certs: Path) -> dict[str, FleetPath]:
    up = fleet.upstream()
    out: dict[str, FleetPath] = {}
    b = fleet.nginx_proxy("nginx-b", up.port)
    a = fleet.nginx_proxy("nginx-a", b.port)
    out["nginx x2"] = FleetPath("nginx x2", [a, b], a.port)
    b = fleet.nginx_mtls_server("nginx-tls-b", up.port, certs)
    a = fleet.nginx_mtls_client("nginx-tls-a", b.port, certs)
    out["nginx x2 mTLS"] = FleetPath("nginx x2 mTLS", [a, b], a.port)
    for name, flags in PATHS.items():
        extra = [x for f in flags for x in ([f, str(certs)] if f == "--mtls" else [f])]
        slug = name.replace(" ", "-").replace(",", "")
        tin = fleet.tether(f"{slug}-in", ["inbound", "--app-port", str(up.port), *extra])
        tout = fleet.tether(
            f"{slug}-out", ["outbound", "--cluster", f"svc=127.0.0.1:{tin.port}", *extra]
        )
        out[name] = FleetPath(name, [tout, tin], tout.port)
    return out


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] in ("upstream", "client"):
        import uvloop

        if sys.argv[1] == "upstream":
            uvloop.run(_serve(int(sys.argv[2])))
        else:
            uvloop.run(_drive(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])))
        return
    ap = argparse.ArgumentParser(prog="bench.tls_hop_bench")
    ap.add_argument("--requests", type=int, default=20_000)
    ap.add_argument("--connections", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--syscalls", action="store_true")
    ap.add_argument("--instructions", action="store_true")
    args = ap.parse_args()
    if not (0 < args.requests <= 1_000_000 and 0 < args.connections <= 256):
        sys.exit("--requests 1..1000000, --connections 1..256")
    from bench.mtls_material import write as write_certs
    from bench.proxy_bench import Fleet

    with tempfile.TemporaryDirectory(prefix="tether-tlshop-") as d:
        tmp = Path(d)
        certs = write_certs(tmp / "certs")
        fleet = Fleet(tmp)
        cpu: dict[str, list[float]] = {}
        ratio: dict[str, list[float]] = {}
        faults: dict[str, float] = {}
        calls: dict[str, dict[str, Counter[str]]] = {}
        try:
            paths = fleet_paths(fleet, certs)
            cpu = {n: [] for n in paths}
            ratio = {n: [] for n in paths}
            for _ in range(args.rounds):
                this = {}
                for name, path in paths.items():
                    this[name], faults[name] = path.measure(args.requests, args.connections)
                    cpu[name].append(this[name])
                for name in paths:
                    base = "nginx x2 mTLS" if "mTLS" in name else "nginx x2"
                    ratio[name].append(this[name] / this[base])
        finally:
            fleet.stop()
        if args.syscalls:
            for name, flags in PATHS.items():
                path2 = Path2(tmp, name, flags)
                try:
                    calls[name] = path2.syscalls(args.requests // 4, args.connections, tmp)
                finally:
                    path2.stop()
        ins = {n: instructions(tmp, n, f) for n, f in PATHS.items()} if args.instructions else {}
    print(f"{args.requests} requests over {args.connections} connections, median of "
          f"{args.rounds} rounds; the proxies pinned to one core")  # fmt: skip
    head = "| path | proxy CPU µs / request | × nginx (mTLS rows: × nginx mTLS) |"
    head += " minor faults / request |"
    sep = "|---|---|---|---|"
    if ins:
        head += " instructions / request (user space) |"
        sep += "---|"
    print(head)
    print(sep)
    for name in cpu:
        row = (f"| {name} | {statistics.median(cpu[name]):.1f} | "
               f"{statistics.median(ratio[name]):.2f} | {faults[name]:.2f} |")  # fmt: skip
        if ins:
            row += f" {ins[name]:,} |" if name in ins else " |"
        print(row)
    if calls:
        n = args.requests // 4
        print("\nsystem calls per request (strace -c):")
        for name, roles in calls.items():
            for role, counts in roles.items():
                per = ", ".join(f"{k} {v / n:.2f}" for k, v in counts.most_common(8))
                print(f"  {name}, {role}: {per}")


if __name__ == "__main__":
    main()
