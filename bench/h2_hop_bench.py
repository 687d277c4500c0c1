"""Where the CPU of two HTTP/2 hops goes: instruction counts, deterministic.

The measured process runs only the two hops (the client and the origin run in the
parent process, not measured):

    client (parent) ─h2c─▶ hop 1 ─h2c─▶ hop 2 ─h2c─▶ origin (parent)

and the hops are either Tether's (`--hops tether`: the outbound listener, then the
inbound listener with app protocol http2, as `make bench` runs them) or a minimal relay
written on the same `h2` library with the same configuration (`--hops glue`: each
stream's events passed to the other side, no routing, no flow-control pump, no policy):
the floor that `h2` and asyncio alone set for an HTTP/2 proxy in Python. `--hops nginx`
(with `--instructions`): two nginx hops as bench/h2_bench.py configures them (h2c,
`grpc_pass` to a keep-alive upstream), each a single process (`master_process off`),
their instructions summed, for the same unit on both sides.

`--instructions` runs the hops under valgrind's callgrind twice (`--count`/6 and
`--count` requests, default 100 and 600, 32 streams in flight on one client
connection) and divides the difference by the difference in requests, so start-up
cancels out; the result does not move with the machine's load. `--profile` runs them
under cProfile instead (CPU time) and prints the share of the hops' Python time by
package (h2, hpack, hyperframe, Tether's proxy/, asyncio and the rest), which cProfile
distorts (it inflates small calls, and compiled modules' own time shows under their
callers or as C functions) but splits.

    .venv/bin/python -m bench.h2_hop_bench [--kind get|grpc] [--hops tether|glue]
                                           [--instructions | --profile] [--count N]

`--kind get`: GET /, a 100-byte response. `--kind grpc`: POST /t.S/U with
content-type application/grpc and a 15-byte framed message; the response is HEADERS,
one 15-byte DATA frame and trailers with grpc-status 0 (a unary call's shape).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import pstats
import re
import shutil
import subprocess
import sys
import time
from typing import Any

from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.events import (
    DataReceived,
    RequestReceived,
    ResponseReceived,
    StreamEnded,
    TrailersReceived,
)

BODY = b"x" * 100
GRPC_MESSAGE = b"\x00\x00\x00\x00\x0a0123456789"
INFLIGHT = 32


def _config(client: bool) -> H2Configuration:
    # As Tether's links (proxy/h2_link.py): inbound fields validated, outbound not.
    return H2Configuration(
        client_side=client,
        header_encoding=None,
        validate_inbound_headers=True,
        normalize_inbound_headers=True,
        validate_outbound_headers=False,
        normalize_outbound_headers=False,
    )


# -- the origin and the client (parent process, not measured) ----------------------------


class Origin(asyncio.Protocol):
    def connection_made(self, transport: Any) -> None:
        self.t = transport
        self.h2 = H2Connection(_config(False))
        self.h2.initiate_connection()
        self.h2.increment_flow_control_window(1 << 30)
        transport.write(self.h2.data_to_send())

    def data_received(self, data: bytes) -> None:
        h2 = self.h2
        for ev in h2.receive_data(data):
            if isinstance(ev, DataReceived):
                h2.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            if isinstance(ev, StreamEnded):
                sid = ev.stream_id
                if self.grpc.pop(sid, False):
                    h2.send_headers(
                        sid, [(b":status", b"200"), (b"content-type", b"application/grpc")]
                    )
                    h2.send_data(sid, GRPC_MESSAGE)
                    h2.send_headers(sid, [(b"grpc-status", b"0")], end_stream=True)
                else:
                    h2.send_headers(sid, [(b":status", b"200"), (b"content-length", b"100")])
                    h2.send_data(sid, BODY, end_stream=True)
            elif isinstance(ev, RequestReceived):
                self.grpc[ev.stream_id] = dict(ev.headers).get(b":method") == b"POST"
        self.t.write(h2.data_to_send())

    def __init__(self) -> None:
        self.grpc: dict[int, bool] = {}


async def run_client(port: int, count: int, kind: str) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    h2 = H2Connection(_config(True))
    h2.initiate_connection()
    h2.increment_flow_control_window(1 << 30)
    head = _request_head(kind)
    started = done = 0

    def start() -> None:
        nonlocal started
        sid = h2.get_next_available_stream_id()
        if kind == "grpc":
            h2.send_headers(sid, head)
            h2.send_data(sid, GRPC_MESSAGE, end_stream=True)
        else:
            h2.send_headers(sid, head, end_stream=True)
        started += 1

    while started < min(count, INFLIGHT):
        start()
    writer.write(h2.data_to_send())
    while done < count:
        data = await reader.read(65536)
        if not data:
            raise SystemExit(f"the hops closed the connection after {done} responses")
        for ev in h2.receive_data(data):
            if isinstance(ev, DataReceived):
                h2.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            elif isinstance(ev, ResponseReceived):
                status = dict(ev.headers).get(b":status")
                if status != b"200":
                    raise SystemExit(f"response {status!r}: {ev.headers}")
            elif isinstance(ev, StreamEnded):
                done += 1
                if started < count:
                    start()
        writer.write(h2.data_to_send())
    writer.close()


def _request_head(kind: str) -> list[tuple[bytes, bytes]]:
    if kind == "grpc":
        return [
            (b":method", b"POST"),
            (b":scheme", b"http"),
            (b":authority", b"svc"),
            (b":path", b"/t.S/U"),
            (b"content-type", b"application/grpc"),
            (b"te", b"trailers"),
        ]
    return [
        (b":method", b"GET"),
        (b":scheme", b"http"),
        (b":authority", b"svc"),
        (b":path", b"/"),
    ]


# -- the hops (child process, measured) --------------------------------------------------


class GlueDown(asyncio.Protocol):
    """A minimal h2 relay: each stream's events to a stream on one upstream connection."""

    def __init__(self, up_port: int) -> None:
        self.up_port = up_port
        self.pending = b""
        self.up: GlueUp | None = None
        self.map: dict[int, int] = {}

    def connection_made(self, transport: Any) -> None:
        self.t = transport
        self.h2 = H2Connection(_config(False))
        self.h2.initiate_connection()
        self.h2.increment_flow_control_window(1 << 30)
        transport.write(self.h2.data_to_send())
        loop = asyncio.get_running_loop()
        self.dial = loop.create_task(
            loop.create_connection(lambda: GlueUp(self), "127.0.0.1", self.up_port)
        )

    def data_received(self, data: bytes) -> None:
        up = self.up
        if up is None:
            self.pending += data
            return
        h2, uh2 = self.h2, up.h2
        for ev in h2.receive_data(data):
            if isinstance(ev, RequestReceived):
                usid = uh2.get_next_available_stream_id()
                self.map[ev.stream_id] = usid
                up.back[usid] = ev.stream_id
                uh2.send_headers(usid, ev.headers, end_stream=ev.stream_ended is not None)
            elif isinstance(ev, DataReceived):
                h2.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                uh2.send_data(self.map[ev.stream_id], ev.data, ev.stream_ended is not None)
            elif isinstance(ev, TrailersReceived):
                uh2.send_headers(self.map[ev.stream_id], ev.headers, end_stream=True)
            elif isinstance(ev, StreamEnded):
                self.map.pop(ev.stream_id, None)
        self.t.write(h2.data_to_send())
        up.t.write(uh2.data_to_send())


class GlueUp(asyncio.Protocol):
    def __init__(self, down: GlueDown) -> None:
        self.down = down
        self.back: dict[int, int] = {}

    def connection_made(self, transport: Any) -> None:
        self.t = transport
        self.h2 = H2Connection(_config(True))
        self.h2.initiate_connection()
        self.h2.increment_flow_control_window(1 << 30)
        transport.write(self.h2.data_to_send())
        self.down.up = self
        if self.down.pending:
            data, self.down.pending = self.down.pending, b""
            self.down.data_received(data)

    def data_received(self, data: bytes) -> None:
        down = self.down
        h2, dh2 = self.h2, down.h2
        for ev in h2.receive_data(data):
            if isinstance(ev, ResponseReceived):
                dh2.send_headers(self.back[ev.stream_id], ev.headers, ev.stream_ended is not None)
            elif isinstance(ev, DataReceived):
                h2.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                dh2.send_data(self.back[ev.stream_id], ev.data, ev.stream_ended is not None)
            elif isinstance(ev, TrailersReceived):
                dh2.send_headers(self.back[ev.stream_id], ev.headers, end_stream=True)
            elif isinstance(ev, StreamEnded):
                self.back.pop(ev.stream_id, None)
        self.t.write(h2.data_to_send())
        down.t.write(dh2.data_to_send())


async def serve_hops(hops: str, origin_port: int) -> None:
    loop = asyncio.get_running_loop()
    if hops == "glue":
        second = await loop.create_server(lambda: GlueDown(origin_port), "127.0.0.1", 0)
        second_port = second.sockets[0].getsockname()[1]
        first = await loop.create_server(lambda: GlueDown(second_port), "127.0.0.1", 0)
        port = first.sockets[0].getsockname()[1]
    else:
        from proxy.balance import Endpoint
        from proxy.cluster import Cluster, StaticDirectory
        from proxy.listener import start_inbound, start_outbound
        from proxy.stats import ProxyStats

        inbound = await start_inbound(origin_port, stats=ProxyStats(), port=0, app_protocol="http2")
        svc = Cluster("svc", "default")
        svc.set_endpoints([Endpoint("svc-0", "127.0.0.1", inbound.port)])
        outbound = await start_outbound(StaticDirectory([svc]), stats=ProxyStats(), port=0)
        port = outbound.port
    print(port, flush=True)
    # Until the parent closes stdin.
    await loop.run_in_executor(None, sys.stdin.read)


# -- in memory: the library's own share (no sockets, no event loop) --------------------


class MemoryChain:
    """client → `hops` minimal relays → origin, all `h2` connections in memory: bytes
    handed from one to the next, each hop passing its streams' events on, nothing else.
    The difference between two hops and none is what `h2` itself costs two hops."""

    def __init__(self, hops: int, kind: str) -> None:
        self.kind = kind
        # conns[0] client; then (server, client) per hop; then the origin.
        self.conns = [H2Connection(_config(True))]
        for _ in range(hops):
            self.conns += [H2Connection(_config(False)), H2Connection(_config(True))]
        self.conns.append(H2Connection(_config(False)))
        for c in self.conns:
            c.initiate_connection()
            c.increment_flow_control_window(1 << 30)
        # Stream maps per hop: downstream sid → upstream sid, and back.
        self.fwd: list[dict[int, int]] = [{} for _ in range(hops)]
        self.back: list[dict[int, int]] = [{} for _ in range(hops)]
        self.done = 0
        self.grpc: dict[int, bool] = {}
        self.pump()

    def pump(self) -> None:
        conns = self.conns
        moved = True
        while moved:
            moved = False
            for i in range(0, len(conns), 2):  # the links: (i, i + 1)
                a, b = conns[i], conns[i + 1]
                out = a.data_to_send()
                if out:
                    moved = True
                    self.events(i + 1, b.receive_data(out))
                back = b.data_to_send()
                if back:
                    moved = True
                    self.events(i, a.receive_data(back))

    def events(self, at: int, events: list[Any]) -> None:
        conns = self.conns
        c = conns[at]
        last = len(conns) - 1
        for ev in events:
            if isinstance(ev, DataReceived):
                c.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            if at == 0:  # the client
                if isinstance(ev, StreamEnded):
                    self.done += 1
                continue
            if at == last:  # the origin
                if isinstance(ev, RequestReceived):
                    self.grpc[ev.stream_id] = dict(ev.headers).get(b":method") == b"POST"
                elif isinstance(ev, StreamEnded):
                    sid = ev.stream_id
                    if self.grpc.pop(sid, False):
                        c.send_headers(
                            sid, [(b":status", b"200"), (b"content-type", b"application/grpc")]
                        )
                        c.send_data(sid, GRPC_MESSAGE)
                        c.send_headers(sid, [(b"grpc-status", b"0")], end_stream=True)
                    else:
                        c.send_headers(sid, [(b":status", b"200"), (b"content-length", b"100")])
                        c.send_data(sid, BODY, end_stream=True)
                continue
            hop = (at - 1) // 2
            if at % 2:  # a hop's server side: requests go on, to its client side
                other = conns[at + 1]
                if isinstance(ev, RequestReceived):
                    usid = other.get_next_available_stream_id()
                    self.fwd[hop][ev.stream_id] = usid
                    self.back[hop][usid] = ev.stream_id
                    other.send_headers(usid, ev.headers, end_stream=ev.stream_ended is not None)
                elif isinstance(ev, DataReceived):
                    other.send_data(
                        self.fwd[hop][ev.stream_id], ev.data, ev.stream_ended is not None
                    )
                elif isinstance(ev, TrailersReceived):
                    other.send_headers(self.fwd[hop][ev.stream_id], ev.headers, end_stream=True)
            else:  # a hop's client side: responses go back
                other = conns[at - 1]
                if isinstance(ev, ResponseReceived):
                    other.send_headers(
                        self.back[hop][ev.stream_id], ev.headers, ev.stream_ended is not None
                    )
                elif isinstance(ev, DataReceived):
                    other.send_data(
                        self.back[hop][ev.stream_id], ev.data, ev.stream_ended is not None
                    )
                elif isinstance(ev, TrailersReceived):
                    other.send_headers(self.back[hop][ev.stream_id], ev.headers, end_stream=True)

    def run(self, count: int) -> None:
        client = self.conns[0]
        head = _request_head(self.kind)
        started = 0
        while self.done < count:
            while started < count and started - self.done < INFLIGHT:
                sid = client.get_next_available_stream_id()
                if self.kind == "grpc":
                    client.send_headers(sid, head)
                    client.send_data(sid, GRPC_MESSAGE, end_stream=True)
                else:
                    client.send_headers(sid, head, end_stream=True)
                started += 1
            self.pump()


def memory_instructions(args: argparse.Namespace, hops: int) -> int:
    def collected(count: int) -> int:
        cmd = ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null",
               sys.executable, "-m", "bench.h2_hop_bench", "--child", "--memory", str(hops),
               "--kind", args.kind, "--count", str(count)]  # fmt: skip
        err = subprocess.run(cmd, capture_output=True, text=True, check=True).stderr
        m = re.search(r"Collected : (\d+)", err)
        if m is None:
            sys.exit("no instruction count in valgrind's output")
        return int(m.group(1))

    low, high = args.count // 6, args.count
    n: int = (collected(high) - collected(low)) // (high - low)
    return n


def child_main(args: argparse.Namespace) -> None:
    if args.memory >= 0:
        MemoryChain(args.memory, args.kind).run(args.count)
        return
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    if args.profile_child:
        prof = cProfile.Profile(time.process_time)
        prof.enable()
        asyncio.run(serve_hops(args.hops, args.origin_port))
        prof.disable()
        print_shares(prof)
        return
    asyncio.run(serve_hops(args.hops, args.origin_port))


def print_shares(prof: cProfile.Profile) -> None:
    stats = pstats.Stats(prof, stream=io.StringIO())
    by: dict[str, float] = {}
    total = 0.0
    raw: Any = stats.stats  # type: ignore[attr-defined]
    for (path, _line, func), (_cc, _nc, tt, _ct, _callers) in raw.items():
        total += tt
        key = _package(path, func)
        by[key] = by.get(key, 0.0) + tt
    for key, t in sorted(by.items(), key=lambda kv: -kv[1]):
        print(f"{key:28} {100 * t / total:5.1f}%", file=sys.stderr)
    # The costliest functions.
    top = sorted(
        ((tt, f"{'/'.join(path.split('/')[-2:])}:{func}")
         for (path, _l, func), (_c, _n, tt, _ct, _cl) in raw.items()),
        reverse=True,
    )[:15]  # fmt: skip
    for tt, name in top:
        print(f"  {100 * tt / total:5.1f}%  {name}", file=sys.stderr)


def _package(path: str, func: str) -> str:
    for name in ("hpack", "hyperframe", "h2"):
        if f"/{name}/" in path:
            return name
    if "/proxy/" in path:
        return "tether proxy/"
    if "asyncio" in path or "uvloop" in path:
        return "asyncio/uvloop"
    if path == "~":
        return "builtins (C functions, compiled modules' calls)"
    return "other"


def run(args: argparse.Namespace, count: int, wrap: list[str]) -> str:
    """One measured child (wrapped by valgrind or not); the child's stderr."""

    async def main() -> str:
        loop = asyncio.get_running_loop()
        origin = await loop.create_server(Origin, "127.0.0.1", 0)
        origin_port = origin.sockets[0].getsockname()[1]
        child = await asyncio.create_subprocess_exec(
            *wrap, sys.executable, "-m", "bench.h2_hop_bench", "--child",
            "--hops", args.hops, "--origin-port", str(origin_port),
            *(["--profile-child"] if args.profile else []),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        assert child.stdout is not None and child.stdin is not None
        line = await asyncio.wait_for(child.stdout.readline(), 120)
        await asyncio.wait_for(run_client(int(line), count, args.kind), 1200)
        child.stdin.close()
        _, err = await asyncio.wait_for(child.communicate(), 120)
        origin.close()
        return err.decode()

    return asyncio.run(main())


NGINX_CONF = """
worker_processes 1;
master_process off;
daemon off;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    keepalive_requests 10000000;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    upstream up {{ server 127.0.0.1:{up}; keepalive 64; }}
    server {{
        listen 127.0.0.1:{port} http2;
        location / {{ grpc_pass grpc://up; }}
    }}
}}
"""


def run_nginx(args: argparse.Namespace, count: int, wrap: list[str]) -> list[str]:
    """Two nginx hops (`listen ... http2`, `grpc_pass` to a keep-alive upstream, as
    bench/h2_bench.py runs them), each one process (`master_process off`); their stderr."""
    import socket
    import tempfile
    from pathlib import Path

    from bench.ports import free_port

    async def main() -> list[str]:
        loop = asyncio.get_running_loop()
        origin = await loop.create_server(Origin, "127.0.0.1", 0)
        up = origin.sockets[0].getsockname()[1]
        procs = []
        with tempfile.TemporaryDirectory() as tmp:
            for name in ("b", "a"):
                d = Path(tmp) / name
                d.mkdir()
                port = free_port()
                (d / "nginx.conf").write_text(NGINX_CONF.format(d=d, up=up, port=port))
                procs.append(
                    await asyncio.create_subprocess_exec(
                        *wrap,
                        "nginx",
                        "-p",
                        str(d),
                        "-c",
                        str(d / "nginx.conf"),
                        stderr=subprocess.PIPE,
                    )
                )
                for _ in range(600):  # until it listens (slow under valgrind)
                    with socket.socket() as s:
                        if s.connect_ex(("127.0.0.1", port)) == 0:
                            break
                    await asyncio.sleep(0.1)
                up = port
            await asyncio.wait_for(run_client(up, count, args.kind), 1200)
            errs = []
            for p in procs:
                p.terminate()
                _, err = await asyncio.wait_for(p.communicate(), 120)
                errs.append(err.decode())
        origin.close()
        return errs

    return asyncio.run(main())


def instructions(args: argparse.Namespace) -> int:
    if shutil.which("valgrind") is None:
        sys.exit("--instructions needs valgrind")
    wrap = ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null"]

    def collected(count: int) -> int:
        errs = run_nginx(args, count, wrap) if args.hops == "nginx" else [run(args, count, wrap)]
        total = 0
        for err in errs:
            m = re.search(r"Collected : (\d+)", err)
            if m is None:
                sys.exit(f"no instruction count in valgrind's output: {err[-1000:]}")
            total += int(m.group(1))
        return total

    low, high = args.count // 6, args.count
    n: int = (collected(high) - collected(low)) // (high - low)
    return n


def main() -> None:
    ap = argparse.ArgumentParser(prog="bench.h2_hop_bench")
    ap.add_argument("--kind", choices=["get", "grpc"], default="get")
    ap.add_argument("--hops", choices=["tether", "glue", "nginx"], default="tether")
    ap.add_argument("--count", type=int, default=600)
    ap.add_argument("--instructions", action="store_true")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--profile-child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--memory", type=int, default=-1, metavar="HOPS")
    ap.add_argument("--origin-port", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child_main(args)
        return
    from proxy.build_info import BUILD

    label = f"{args.kind}, {args.hops} hops x2 ({BUILD.name})"
    if args.memory >= 0:
        label = f"{args.kind}, in memory, {args.memory} minimal hops"
        print(f"{label}: {memory_instructions(args, args.memory)} instructions/request")
    elif args.instructions:
        print(f"{label}: {instructions(args)} instructions/request (two hops)")
    elif args.profile:
        print(f"{label}: shares of the hops' Python time (cProfile)")
        print(run(args, args.count, []), end="")
    else:
        run(args, args.count, [])
        print(f"{label}: {args.count} requests through the hops")


if __name__ == "__main__":
    main()
