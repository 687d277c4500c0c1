"""One hop's Python work per request, in-process: no sockets, no kernel, no other process.

The real protocol objects (ProxyServer's DownstreamConnection, the router, the balancer,
the pool's UpstreamConnection, both codecs) driven by fake transports: a request's bytes
go into the downstream connection, the head it writes upstream is checked, a response's
bytes go into the upstream connection, and the response the client would read is
checked. What is timed is exactly what a sidecar's event loop runs in Python for one
request on a pooled keep-alive connection, minus the socket calls. On a shared machine
this moves far less than an end-to-end run, so it is what a hot-path change is judged by
first (and `--profile` says where the time goes); the end-to-end benches then say what
it is worth against nginx.

    .venv/bin/python -m bench.hop_bench [--hop outbound|inbound] [--policy NAME[+locality]]
                                         [--count 50000] [--rounds 7] [--profile]
                                         [--instructions] [--unique-ids | --realistic
                                                            | --new-traces]
                                         [--no-retries] [--authz none|l4|l7] [--tracing RATIO]

`--authz` (inbound hop): the service's intentions checked before routing, for a caller
with a SPIFFE ID: `l4` an intention allowing it (decided once per connection), `l7` one
allowing GET on a path prefix and a header (matched per request).

`--realistic`: every request has its own path, X-Request-Id, cookie and a caller's
unsampled `traceparent` (flag 00). `--new-traces`: the same, but only every other
request carries that `traceparent` and the others none (what `make bench`'s tracing rows
send: with tracing on, those start a trace here, sampled at the ratio with a seeded draw).
`--tracing RATIO`: tracing on (proxy/tracing.py),
parent-based, RATIO of new traces sampled; spans go to the SDK's batch processor with an
exporter that discards them (the OTLP export runs on the processor's thread and is
measured end to end by `make bench`).

`--instructions` counts instead of timing: the process runs twice under valgrind's
callgrind (2,000 and 12,000 requests) and the difference is divided by 10,000, so
start-up cancels out. Instruction counts do not move with the machine's load at all,
which makes them the measure for small changes (about 25 s per figure). `--realistic`
gives every request its own path, request id, `traceparent` and cookie; it and the
other options apply to the build that runs (compiled, or TETHER_PURE=1 for the sources).
"""

from __future__ import annotations

import argparse
import random
import re
import shutil
import subprocess
import sys
import time
from typing import Any

from proxy.build_info import BUILD

REQUEST = b"GET /api/items HTTP/1.1\r\nHost: svc\r\nUser-Agent: bench\r\nAccept: */*\r\n\r\n"
# --unique-ids: each request carries its own X-Request-Id, as every request reaching an
# inbound hop from another sidecar does (such heads never repeat byte for byte; the head
# cache takes them without their X-Request-Id value: proxy/codec.py `_masked_key`).
REQUEST_WITH_ID = REQUEST[:-2] + b"X-Request-Id: 6f1c2a9e-%010d\r\n\r\n"
# --realistic: what real traffic looks like, every head its own: a varying path, request
# id, W3C `traceparent` (a caller's, not sampled, as most are at a 1% rate) and session
# cookie (the head cache never hits).
REALISTIC = (
    b"GET /api/items/%d?page=%d HTTP/1.1\r\nHost: svc\r\nUser-Agent: bench\r\n"
    b"Accept: application/json\r\nX-Request-Id: 6f1c2a9e-%010d\r\n"
    b"traceparent: 00-4bf92f3577b34da6a3ce%012x-00f067aa%08x-00\r\n"
    b"Cookie: session=%016x; theme=dark\r\n\r\n"
)


def realistic(n: int) -> bytes:
    return REALISTIC % (n % 9973, n % 7, n, n, n, n * 2654435761 % (1 << 64))


# --new-traces: the realistic requests of `make bench`'s tracing rows (bench/proxy_bench.py's
# NEW_TRACES_LUA): every other one carries a caller's unsampled `traceparent`, the others
# none (with tracing on, the sidecar starts their trace: sampled at the ratio).
NO_PARENT = REALISTIC.replace(b"traceparent: 00-4bf92f3577b34da6a3ce%012x-00f067aa%08x-00\r\n", b"")


def new_traces(n: int) -> bytes:
    if n % 2:
        return realistic(n)
    return NO_PARENT % (n % 9973, n % 7, n, n * 2654435761 % (1 << 64))


RESPONSE = (
    b"HTTP/1.1 200 OK\r\nServer: nginx\r\nDate: Sun, 29 Nov 2026 00:00:00 GMT\r\n"
    b"Content-Type: text/plain\r\nContent-Length: 100\r\nConnection: keep-alive\r\n\r\n"
    + b"x"
    * 100
)
ZONES = ("zone-a", "zone-a", "zone-b")


class FakeTransport:
    """What the protocols call on a transport; keeps only the last write."""

    def __init__(self, peer: tuple[str, int] = ("127.0.0.1", 40000)) -> None:
        self.peer = peer
        self.last: bytes = b""
        self.closed = False

    def write(self, data: bytes) -> None:
        self.last = data

    def writelines(self, chunks: list[bytes]) -> None:
        self.last = b"".join(chunks)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.peer if name == "peername" else default

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True


def _authz(kind: str) -> Any:
    """The inbound authorization `--authz` names, or None."""
    if kind == "none":
        return None
    from proxy.authz import InboundAuthz
    from wire.resources import API_VERSION, Resource

    source: dict[str, Any] = {"name": "web", "action": "allow"}
    if kind == "l7":
        http = {"path": {"prefix": "/api/"}, "methods": ["GET"],
                "headers": [{"name": "accept", "present": True}]}  # fmt: skip
        source = {"name": "web", "permissions": [{"action": "allow", "http": http}]}
    docs = [
        {"kind": "Intention", "metadata": {"name": "svc"}, "spec": {"sources": [source]}},
        {
            "kind": "MeshConfig",
            "metadata": {"name": "mesh"},
            "spec": {"authorization": {"defaultAction": "deny"}},
        },
    ]
    authz = InboundAuthz("default", "svc")
    authz.install(
        authz.compile([Resource.from_dict({"apiVersion": API_VERSION, **d}) for d in docs])
    )
    return authz


def _tracer(ratio: float, hop: str) -> Any:
    """Tracing as a sidecar runs it, its spans discarded by the exporter."""
    from collections.abc import Sequence

    from opentelemetry.sdk.trace import ReadableSpan
    from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

    from proxy.trace_context import SamplingSpec
    from proxy.tracing import Tracing

    class Discard(SpanExporter):
        def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    # A seeded draw: the same requests are sampled in every run (callgrind's two runs).
    tracing = Tracing(
        Discard(),
        SamplingSpec(ratio, True),
        service="bench",
        namespace="default",
        rng=random.Random(13),
    )
    return tracing.for_listener(hop)


def build(
    hop: str,
    policy: str,
    endpoints: int,
    authz: str = "none",
    retries: bool = True,
    tracing: float | None = None,
) -> tuple[Any, Any]:
    """A ProxyServer for `hop` with warm pools; returns (server, downstream connection).
    Outbound, the default retry policy applies unless `retries` is False."""
    from proxy.balance import Endpoint, HashPolicy, LoadBalancerPolicy, build_balancer
    from proxy.cluster import Cluster, StaticDirectory
    from proxy.dispatch import InboundRouter, OutboundRouter
    from proxy.downstream import ProxyServer, TimeoutPolicy
    from proxy.pool import Pool, PoolPolicy
    from proxy.stats import ProxyStats
    from proxy.upstream import UpstreamConnection

    stats = ProxyStats()
    pool_policy = PoolPolicy()
    router: Any
    if hop == "outbound":
        name = policy.removesuffix("+locality")
        zone = ZONES[0] if policy.endswith("+locality") else ""
        # The hashing policies hash the source address, as in bench/balance_path_bench.py.
        hashing = (HashPolicy("source_ip"),) if name in ("ring_hash", "maglev") else ()
        lbp = LoadBalancerPolicy(policy=name, hash_policies=hashing)
        cluster = Cluster("svc", "default", build_balancer(lbp, zone))
        cluster.set_endpoints(
            [
                Endpoint(f"svc-{i}", "127.0.0.1", 20000 + i, zone=ZONES[i % len(ZONES)])
                for i in range(endpoints)
            ]
        )
        router = OutboundRouter(StaticDirectory([cluster]), stats, pool_policy=pool_policy)
        if not retries:
            import dataclasses

            from proxy.cluster_spec import ClusterSpecs

            router.specs = ClusterSpecs(dataclasses.replace(router.specs.default, retry=None))
        pools = [
            router._pools.setdefault(
                (ep.host, ep.port, router.specs.default.pool_key),
                Pool(ep.host, ep.port, pool_policy, name=ep.id, head_cache=router.head_cache),
            )
            for ep in cluster.endpoints
        ]
    else:
        router = InboundRouter(20000, stats, pool_policy=pool_policy, authz=_authz(authz))
        pools = router.pools()
    server = ProxyServer(router, TimeoutPolicy(), stats, scheme=b"http")
    if tracing is not None:
        server.tracer = _tracer(tracing, hop)
    for pool in pools:  # a few idle keep-alive connections each, as under load
        for _ in range(4):
            up = UpstreamConnection(pool)
            up.connection_made(FakeTransport())
            pool.size += 1
            pool.idle.append(up)
    conn = server()
    conn.connection_made(FakeTransport())
    # The caller's identity, as mTLS would have verified it.
    conn.peer.identity = "spiffe://bench.consul/ns/default/dc/dc1/svc/web"
    return server, conn


def one(conn: Any, request: bytes = REQUEST) -> None:
    conn.data_received(request)
    up = conn.exchange.upstream
    up.data_received(RESPONSE)


def heads_for(heads: str, first: int, count: int) -> list[bytes]:
    """`count` request heads of the kind `heads`, numbered from `first`."""
    return [
        realistic(first + i)
        if heads == "realistic"
        else new_traces(first + i)
        if heads == "new-traces"
        else REQUEST_WITH_ID % (first + i)
        if heads == "unique-ids"
        else REQUEST
        for i in range(count)
    ]


def run(
    hop: str,
    policy: str,
    endpoints: int,
    count: int,
    rounds: int,
    heads: str = "repeated",
    authz: str = "none",
    retries: bool = True,
    tracing: float | None = None,
) -> float:
    """Best µs per request over `rounds` rounds of `count` requests (round 0 warms up)."""
    _, conn = build(hop, policy, endpoints, authz, retries, tracing)
    one(conn)
    up_t = conn.transport
    assert up_t.last.startswith(b"HTTP/1.1 200 OK\r\n"), up_t.last[:80]
    best = float("inf")
    for r in range(rounds + 1):
        requests = heads_for(heads, r * count, count)
        start = time.perf_counter()
        for request in requests:
            one(conn, request)
        if r:
            best = min(best, (time.perf_counter() - start) / count * 1e6)
    assert conn.transport.last.endswith(b"x" * 100)
    return best


async def _main(args: argparse.Namespace) -> None:
    if args.profile:
        import cProfile
        import pstats

        _, conn = build(
            args.hop, args.policy, args.endpoints, args.authz, not args.no_retries, args.tracing
        )
        requests = heads_for(heads_of(args), 0, args.count)
        prof = cProfile.Profile()
        prof.enable()
        for request in requests:
            one(conn, request)
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(20)
        return
    us = run(
        args.hop, args.policy, args.endpoints, args.count, args.rounds, heads_of(args),
        args.authz, not args.no_retries, args.tracing,
    )  # fmt: skip
    print(f"{_label(args)}: {us:.2f} µs/request (best of {args.rounds})")


def _label(args: argparse.Namespace) -> str:
    extra = ""
    if getattr(args, "authz", "none") != "none":
        extra += f" authz={args.authz}"
    if getattr(args, "no_retries", False):
        extra += " no-retries"
    if getattr(args, "tracing", None) is not None:
        extra += f" tracing={args.tracing:g}"
    return (
        f"{args.hop} {args.policy} x{args.endpoints} {heads_of(args)} heads{extra} ({BUILD.name})"
    )


def heads_of(args: argparse.Namespace) -> str:
    if getattr(args, "realistic", False):
        return "realistic"
    if getattr(args, "new_traces", False):
        return "new-traces"
    return "unique-ids" if args.unique_ids else "repeated"


def instructions(args: argparse.Namespace) -> int:
    """Instructions per request, from two callgrind runs of this module."""
    if shutil.which("valgrind") is None:
        sys.exit("--instructions needs valgrind (apt-get install valgrind)")

    def collected(count: int) -> int:
        cmd = ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null",
               sys.executable, "-m", "bench.hop_bench", "--hop", args.hop,
               "--policy", args.policy, "--endpoints", str(args.endpoints),
               "--count", str(count), "--rounds", "0",
               *(["--unique-ids"] if args.unique_ids else []),
               # (bench/balance_path_bench.py passes a Namespace without these four)
               "--authz", getattr(args, "authz", "none"),
               *(["--no-retries"] if getattr(args, "no_retries", False) else []),
               *(["--realistic"] if getattr(args, "realistic", False) else []),
               *(["--new-traces"] if getattr(args, "new_traces", False) else []),
               *(["--tracing", str(args.tracing)]
                 if getattr(args, "tracing", None) is not None else [])]  # fmt: skip
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stderr
        m = re.search(r"Collected : (\d+)", out)
        if m is None:
            sys.exit(f"no instruction count in valgrind's output:\n{out[-2000:]}")
        return int(m.group(1))

    return (collected(12_000) - collected(2_000)) // 10_000


def main() -> None:
    ap = argparse.ArgumentParser(prog="bench.hop_bench")
    ap.add_argument("--hop", choices=["outbound", "inbound"], default="outbound")
    ap.add_argument("--policy", default="peak_ewma+locality")
    ap.add_argument("--endpoints", type=int, default=3)
    ap.add_argument("--count", type=int, default=50_000)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--instructions", action="store_true")
    ap.add_argument("--unique-ids", action="store_true")
    ap.add_argument("--authz", choices=["none", "l4", "l7"], default="none")
    ap.add_argument(
        "--no-retries",
        action="store_true",
        help="outbound without the default retry policy (to measure what it costs)",
    )
    ap.add_argument("--realistic", action="store_true")
    ap.add_argument("--new-traces", action="store_true")
    ap.add_argument("--tracing", type=float, default=None, metavar="RATIO")
    args = ap.parse_args()
    if args.instructions:
        n = instructions(args)
        print(f"{_label(args)}: {n} instructions/request")
        return
    import uvloop

    uvloop.run(_main(args))


if __name__ == "__main__":
    main()
