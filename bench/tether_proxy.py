"""Bench-side launcher: one Tether listener in its own process, with a StaticDirectory.

    python -m bench.tether_proxy outbound --port P --cluster svc=127.0.0.1:9000 [...]
    python -m bench.tether_proxy inbound --port P --app-port 9000 [--app-protocol http2]

It runs exactly the listener code the sidecar runs (proxy/listener.py on uvloop), with
the sidecar's default balancer, minus discovery and registration, so the benchmark needs
no registry. `--sched normal` leaves
the kernel's default scheduling policy (the sidecar asks for SCHED_BATCH); `--malloc glibc`
leaves malloc's thresholds as glibc sets them (the sidecar keeps TLS reads on the heap).
`--profile FILE` writes cProfile stats at SIGTERM. `--tracing` traces as a sidecar with
OTEL_TRACES_EXPORTER=otlp does (the OTEL_* variables of its environment). Prints
`ready <port>` on stdout once listening.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from typing import Any


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench.tether_proxy")
    p.add_argument("mode", choices=["outbound", "inbound"])
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--cluster", action="append", default=[], help="NAME=HOST:PORT (outbound)")
    p.add_argument("--app-port", type=int, default=0, help="inbound: the app's port")
    p.add_argument(
        "--app-protocol",
        choices=["http", "http2", "grpc"],
        default="http",
        help="inbound: what the app speaks (http2/grpc: HTTP/2 streams reach it over h2c)",
    )
    p.add_argument(
        "--sched",
        choices=["batch", "normal"],
        default="batch",
        help="batch: as the sidecar does (SCHED_BATCH); normal: the kernel's default",
    )
    p.add_argument(
        "--malloc",
        choices=["heap-reads", "glibc"],
        default="heap-reads",
        help="heap-reads: as the sidecar does (proxy.listener.keep_reads_on_heap); "
        "glibc: malloc's own thresholds",
    )
    p.add_argument("--profile", default=None, help="write cProfile stats here at SIGTERM")
    p.add_argument(
        "--mtls",
        default=None,
        help="DIR of bench/mtls_material.py: inbound serves mTLS as service `svc`; "
        "outbound dials its clusters with mTLS as service `caller`",
    )
    p.add_argument(
        "--no-retries",
        action="store_true",
        help="outbound: no retry policy (a sidecar without policy has the default one)",
    )
    p.add_argument(
        "--tracing",
        action="store_true",
        help="trace as a sidecar does when OTEL_TRACES_EXPORTER=otlp (OTEL_* honoured)",
    )
    return p.parse_args()


def _tls(args: argparse.Namespace, service: str) -> Any:
    if not args.mtls:
        return None
    from pathlib import Path

    from bench.mtls_material import mesh_tls

    return mesh_tls(Path(args.mtls), service)


async def _serve(args: argparse.Namespace) -> None:
    from proxy.balance import Endpoint, build_balancer
    from proxy.cluster import Cluster, StaticDirectory
    from proxy.listener import settle_process, start_inbound, start_outbound

    if args.mode == "outbound":
        directory = StaticDirectory()
        for spec in args.cluster:
            name, _, addr = spec.partition("=")
            host, _, port = addr.rpartition(":")
            # The sidecar's default balancer (peak-EWMA; no zone given, so no locality).
            cluster = Cluster(name, "default", build_balancer())
            cluster.set_endpoints([Endpoint(f"{name}-0", host, int(port))])
            directory.add(cluster)
        listener = await start_outbound(directory, port=args.port, mesh_tls=_tls(args, "caller"))
        if args.no_retries:
            import dataclasses

            from proxy.cluster_spec import ClusterSpecs
            from proxy.dispatch import OutboundRouter

            router = listener.router
            assert isinstance(router, OutboundRouter)
            # As `retries: {attempts: 1}` everywhere: no Resilience on the route at all.
            router.specs = ClusterSpecs(dataclasses.replace(router.specs.default, retry=None))
    else:
        listener = await start_inbound(
            args.app_port,
            port=args.port,
            mesh_tls=_tls(args, "svc"),
            app_protocol=args.app_protocol,
        )
    tracing = None
    if args.tracing:
        import os

        from proxy.tracing import from_env

        tracing = from_env(os.environ, service="bench", namespace="default")
        if tracing is None:
            sys.exit("--tracing: set OTEL_TRACES_EXPORTER=otlp")
        listener.proxy.tracer = tracing.for_listener(args.mode)
    settle_process(batch=args.sched == "batch", heap_reads=args.malloc == "heap-reads")
    print(f"ready {listener.port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    await stop.wait()
    await listener.drain(1.0)
    await listener.aclose()
    if tracing is not None:
        print(f"tracing: {tracing!r}", flush=True)
        await asyncio.to_thread(tracing.shutdown)


def main() -> None:
    import uvloop

    args = _parse()
    if args.profile:
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
        try:
            uvloop.run(_serve(args))
        finally:
            profiler.disable()
            profiler.dump_stats(args.profile)
    else:
        uvloop.run(_serve(args))
    sys.exit(0)


if __name__ == "__main__":
    main()
