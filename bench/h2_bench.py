"""HTTP/2 and gRPC benchmark: two Tether hops against two nginx hops, in one run.

`make bench` runs this after bench/proxy_bench.py. It installs what it lacks (nginx with
its HTTP/2 and gRPC modules, h2load from nghttp2), starts everything on 127.0.0.1 on
free ports, pins the proxies to CPU 0 (h2load and the origin to CPU 1) and runs
interleaved rounds of h2load over two request kinds and two paths:

    HTTP/2 GET    GET /, a 100-byte response
    gRPC unary    POST /t.S/U, content-type application/grpc, a 10-byte framed message;
                  the response carries the `grpc-status: 0` trailer

    nginx x2      h2load → nginx (http2, grpc_pass) → nginx (http2, grpc_pass) → origin
    tether x2     h2load → Tether outbound → Tether inbound (app protocol http2) → origin

The origin is nginx answering h2c with a fixed response (the proxies do not parse gRPC
messages, so a fixed gRPC-shaped answer costs them what a real server's would). h2load
runs C connections with M concurrent streams each. Per path: requests/s, mean latency,
CPU µs per request of the proxy processes (/proc/<pid>/stat), and the ratio to nginx
taken within each round, then the median. Results go to the "HTTP/2 and gRPC" section
of docs/benchmarks.md.

Options: --rounds N (default 7), --seconds S per run (default 3), --quick, --no-docs.
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import shutil
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.ports import free_port
from bench.proxy_bench import DOCS, LOAD_CPU, PROXY_CPU, Fleet, Proc, machine, pinned

SECTION_START = "<!-- h2-bench:start -->"
SECTION_END = "<!-- h2-bench:end -->"
CLIENTS = 4
STREAMS = 8  # concurrent streams per connection: 32 requests in flight, as wrk's 32
BODY = "x" * 99
GRPC_REPLY = "0123456789012345"  # the proxies relay it without parsing
# Responses that were not 2xx, by port (tolerated below 0.1%, and reported): nginx's
# grpc_pass now and then answers 502 when the origin, which answers without reading the
# request body, resets the stream after its response.
FAILED: dict[int, int] = {}


def ensure_tools() -> None:
    missing = [t for t in ("nginx", "h2load") if shutil.which(t) is None]
    if missing:
        print(f"installing {', '.join(missing)} ...", flush=True)
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
        pkgs = {"nginx": "nginx", "h2load": "nghttp2-client"}
        subprocess.run(
            ["apt-get", "install", "-y", "-qq", *[pkgs[t] for t in missing]], check=True, env=env
        )


def nginx_h2(fleet: Fleet, name: str, cpu: str, block: str, upstream_port: int | None) -> Proc:
    """An nginx serving h2c with prior knowledge (`listen ... http2`: nginx 1.22 has no
    `http2 on;`, which newer versions spell the same setting with)."""
    port = free_port()
    d = fleet.workdir / name
    d.mkdir()
    upstream = (
        f"upstream up {{ server 127.0.0.1:{upstream_port}; keepalive 64; }}"
        if upstream_port
        else ""
    )
    conf = f"""
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    keepalive_requests 10000000;
    http2_max_requests 10000000;
    keepalive_timeout 75s;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    {upstream}
    server {{
        listen 127.0.0.1:{port} http2 backlog=1024;
        {block}
    }}
}}
"""
    (d / "nginx.conf").write_text(conf)
    cmd = ["nginx", "-p", str(d), "-c", str(d / "nginx.conf"), "-g", "daemon off;"]
    return fleet.start(name, cmd, port, cpu)


@dataclass
class Run:
    rps: float
    mean_ms: float
    requests: int
    cpu_us: float


@dataclass
class H2Path:
    name: str
    kind: str  # "get" or "grpc"
    port: int
    proxies: list[Proc]
    runs: list[Run] = field(default_factory=list)


def h2load(port: int, kind: str, seconds: float, body: Path) -> tuple[float, float, int]:
    args = [
        "h2load",
        f"-c{CLIENTS}",
        f"-m{STREAMS}",
        f"-D{max(1, round(seconds))}",
        "-H",
        ":authority: svc",
    ]
    if kind == "grpc":
        args += ["-d", str(body), "-H", "content-type: application/grpc", "-H", "te: trailers"]
        url = f"http://127.0.0.1:{port}/t.S/U"
    else:
        url = f"http://127.0.0.1:{port}/"
    out = subprocess.run(pinned(LOAD_CPU, [*args, url]), capture_output=True, text=True).stdout
    m = re.search(r"requests: (\d+) total, \d+ started, (\d+) done, (\d+) succeeded", out)
    rate = re.search(r"finished in [\d.]+m?s, ([\d.]+) req/s", out)
    lat = re.search(r"time for request:\s+\S+\s+\S+\s+(\S+)", out)
    codes = re.search(r"status codes: (\d+) 2xx", out)
    if not m or not rate or not codes:
        raise RuntimeError(f"h2load through port {port} failed:\n{out}")
    failed = max(0, int(m.group(2)) - int(codes.group(1)))
    if failed * 1000 > int(m.group(2)):
        raise RuntimeError(f"h2load through port {port}: {failed} not 2xx:\n{out}")
    FAILED[port] = FAILED.get(port, 0) + failed
    mean = lat.group(1) if lat else "nan"
    value = float(re.sub(r"[a-z]+$", "", mean) or "nan")
    mean_ms = (
        value / 1000
        if mean.endswith("us")
        else value * 1000
        if mean[-1:] == "s" and not mean.endswith("ms")
        else value
    )
    return float(rate.group(1)), mean_ms, int(m.group(3))


def measure(path: H2Path, seconds: float, body: Path) -> Run:
    before = sum(p.cpu_seconds() for p in path.proxies)
    try:
        rps, mean_ms, requests = h2load(path.port, path.kind, seconds, body)
    except RuntimeError as e:
        raise RuntimeError(f"{path.name}: {e}") from None
    cpu = sum(p.cpu_seconds() for p in path.proxies) - before
    return Run(rps, mean_ms, requests, cpu / requests * 1e6 if requests else 0.0)


def run(fleet: Fleet, tmp: Path, args: argparse.Namespace) -> str:
    origin_block = (
        f"location /t.S/ {{ default_type application/grpc; add_trailer grpc-status 0;"
        f' return 200 "{GRPC_REPLY}"; }}'
        f' location / {{ default_type text/plain; return 200 "{BODY}\\n"; }}'
    )
    origin = nginx_h2(fleet, "origin", LOAD_CPU, origin_block, None)
    grpc_pass = "location / { grpc_pass grpc://up; }"
    ngx_b = nginx_h2(fleet, "nginx-b", PROXY_CPU, grpc_pass, origin.port)
    ngx_a = nginx_h2(fleet, "nginx-a", PROXY_CPU, grpc_pass, ngx_b.port)
    tin = fleet.tether(
        "tether-in", ["inbound", "--app-port", str(origin.port), "--app-protocol", "http2"]
    )
    tout = fleet.tether("tether-out", ["outbound", "--cluster", f"svc=127.0.0.1:{tin.port}"])
    body = tmp / "grpc-request.bin"
    body.write_bytes(b"\x00\x00\x00\x00\x0a" + b"0123456789")
    paths = [
        H2Path("HTTP/2 GET, nginx x2", "get", ngx_a.port, [ngx_a, ngx_b]),
        H2Path("HTTP/2 GET, tether x2", "get", tout.port, [tout, tin]),
        H2Path("gRPC unary, nginx x2", "grpc", ngx_a.port, [ngx_a, ngx_b]),
        H2Path("gRPC unary, tether x2", "grpc", tout.port, [tout, tin]),
    ]
    time.sleep(0.3)
    for p in paths:  # warm up: connections, pools
        try:
            h2load(p.port, p.kind, 1.0, body)
        except RuntimeError as e:
            raise RuntimeError(f"{p.name}: {e}") from None
    for rnd in range(args.rounds):
        order = paths[rnd % len(paths) :] + paths[: rnd % len(paths)]
        for p in order:
            p.runs.append(measure(p, args.seconds, body))
        print(
            f"h2 round {rnd + 1}/{args.rounds}: "
            + ", ".join(
                f"{p.name} {p.runs[-1].rps:.0f}/s {p.runs[-1].cpu_us:.1f}µs" for p in paths
            ),
            flush=True,
        )
    by = {p.name: p for p in paths}

    def ratio(a: str, b: str) -> float:
        return statistics.median(
            x.cpu_us / y.cpu_us for x, y in zip(by[a].runs, by[b].runs, strict=True) if y.cpu_us
        )

    now = datetime.datetime.now(datetime.UTC)
    lines = [
        "## HTTP/2 and gRPC",
        "",
        f"`make bench` (bench/h2_bench.py), {now:%Y-%m-%d %H:%M} UTC, machine: {machine()}.",
        f"h2load -c{CLIENTS} -m{STREAMS} (32 streams in flight) over h2c, {args.rounds}"
        f" interleaved rounds of {args.seconds:g} s; proxies pinned to CPU {PROXY_CPU}, h2load"
        f" and the origin (nginx, fixed answers) to CPU {LOAD_CPU}. nginx hops: `listen ..."
        " http2` and `grpc_pass` to a keep-alive upstream. Medians over rounds; × is the"
        " median of per-round ratios to nginx x2 for the same request kind.",
        "",
        "| path | requests/s | mean latency ms | CPU µs/request | × nginx x2 |",
        "|---|---|---|---|---|",
    ]
    for p in paths:
        nginx_name = p.name.replace("tether", "nginx")
        x = ratio(p.name, nginx_name)
        lines.append(
            f"| {p.name} | {statistics.median(r.rps for r in p.runs):.0f}"
            f" | {statistics.median(r.mean_ms for r in p.runs):.2f}"
            f" | {statistics.median(r.cpu_us for r in p.runs):.1f} | {x:.2f} |"
        )
    noted = {p.port: p.name.split(", ")[1] for p in paths}
    for port, count in FAILED.items():
        if count:
            lines.append(
                f"\n{noted.get(port, port)}: {count} responses were not 2xx over the run"
                " (below 0.1%; see bench/h2_bench.py)."
            )
    return "\n".join(lines) + "\n"


def write_docs(text: str) -> None:
    doc = DOCS / "benchmarks.md"
    current = doc.read_text() if doc.exists() else "# Benchmarks\n"
    block = f"{SECTION_START}\n{text.rstrip()}\n{SECTION_END}\n"
    if SECTION_START in current and SECTION_END in current:
        head, _, rest = current.partition(SECTION_START)
        _, _, tail = rest.partition(SECTION_END)
        current = head + block + tail.lstrip("\n")
    else:
        current = current.rstrip("\n") + "\n\n" + block
    doc.write_text(current)


def main() -> None:
    ap = argparse.ArgumentParser(prog="bench.h2_bench")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-docs", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.rounds, args.seconds = 2, 2.0
    ensure_tools()
    with tempfile.TemporaryDirectory(prefix="tether-h2-bench-") as tmp:
        fleet = Fleet(Path(tmp))
        try:
            report = run(fleet, Path(tmp), args)
        finally:
            fleet.stop()
    print(report)
    if not args.no_docs:
        write_docs(report)
        print(f"wrote {DOCS / 'benchmarks.md'}")


if __name__ == "__main__":
    main()
