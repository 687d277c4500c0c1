"""Registry scale benchmark: 10,000 instances, 5,000 blocking watchers, one health flip.

Runs `tether registry` as a separate process (durable store in a temporary directory)
and drives it with py-consul's `consul.aio` client, as the sidecars do:

1. registers 1,000 services x 10 instances through `PUT /v1/catalog/register` (1,000
   nodes, each hosting instances of 10 different services, each instance with a
   passing service check);
2. parks 5,000 watchers (5 per service) on `/v1/health/service/<name>?passing` blocking
   queries; a woken watcher re-arms at once with the new index, as a sidecar does;
3. flips one instance's check (critical, later passing again) per round, on a different
   service each round, and measures, from just before the write, the time until every
   watcher of that service has its answer; it also counts watchers of any *other*
   service that woke (there must be none);
4. measures durable KV writes per second (one client in a loop, and 32 in flight);
5. reads the registry's resident memory (VmRSS, and the peak VmHWM) from /proc.

Usage: `python -m bench.registry_bench [--services 1000] [--instances 10]
[--watchers 5000] [--rounds 40] [--json]`.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import datetime
import gc
import json
import os
import platform
import random
import resource
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import consul.aio

from tether.ports import free_port

ROOT = Path(__file__).resolve().parent.parent


def raise_nofile(want: int) -> int:
    """Raise the open-file limit (inherited by the registry we spawn)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(want, soft)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def proc_memory(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of `pid`, in kB."""
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                name, value = line.split(":", 1)
                out[name] = int(value.split()[0])
    return out


def proc_cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[k]


def machine() -> str:
    model = platform.processor() or "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    release, python = platform.release(), platform.python_version()
    return f"{os.cpu_count()} cores, {model}, Linux {release}, Python {python}"


class Registry:
    """`tether registry` in its own process group."""

    def __init__(self, data_dir: Path, fsync: bool) -> None:
        self.port = free_port()
        cmd = [
            sys.executable, "-m", "tether.cli", "registry", "--port", str(self.port),
            "--data-dir", str(data_dir), "--node", "bench-agent",
            # Every watcher comes from this one address: the per-client cap would
            # refuse all but 200 of them.
            "--max-connections-per-client", "0", "--max-connections", "65536",
        ]  # fmt: skip
        if fsync:
            cmd.append("--fsync")
        self.proc = subprocess.Popen(
            cmd, cwd=ROOT, start_new_session=True, stdout=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("the registry exited at start")
            with contextlib.suppress(OSError):
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            time.sleep(0.05)
        raise TimeoutError("the registry did not start listening")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)


def service_name(i: int) -> str:
    return f"svc-{i:04d}"


def node_of(i: int, j: int, services: int) -> str:
    # Instance j of service i: each node hosts instances of different services.
    return f"node-{(i + j * 100) % services:04d}"


def node_address(node: str) -> str:
    n = int(node.rsplit("-", 1)[1])
    return f"10.0.{n >> 8}.{n & 255}"


def check_body(i: int, j: int, services: int, status: str) -> dict[str, Any]:
    return {
        "CheckID": f"{service_name(i)}-{j}-alive",
        "Name": "alive",
        "Status": status,
        "ServiceID": f"{service_name(i)}-{j}",
    }


async def register_all(c: Any, services: int, instances: int, concurrency: int) -> float:
    jobs = [(i, j) for i in range(services) for j in range(instances)]
    it = iter(jobs)

    async def worker() -> None:
        for i, j in it:
            node = node_of(i, j, services)
            ok = await c.catalog.register(
                node,
                node_address(node),
                service={
                    "Service": service_name(i),
                    "ID": f"{service_name(i)}-{j}",
                    "Address": f"10.{128 + (i >> 8)}.{i & 255}.{j + 1}",
                    "Port": 8000 + j,
                    "Tags": ["v1"],
                    "Meta": {"zone": f"z{j % 3}"},
                },
                check=check_body(i, j, services, "passing"),
            )
            assert ok, (i, j)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.perf_counter() - started


class Watchers:
    """Blocking health watchers that re-arm after every answer, recording each wake."""

    def __init__(self, c: Any, services: int, count: int) -> None:
        self.c = c
        self.services = services
        self.count = count
        self.wakes: list[tuple[float, int, int, int]] = []  # (time, service, watcher, n)
        self.errors: list[str] = []
        self.armed = 0
        self.tasks: list[asyncio.Task[None]] = []

    async def start(self, indexes: dict[int, str]) -> None:
        # Sidecars do not all connect in the same millisecond: arm in batches.
        for w in range(self.count):
            svc = w % self.services
            self.tasks.append(asyncio.create_task(self._watch(w, svc, indexes[svc])))
            if w % 250 == 249:
                await asyncio.sleep(0.05)

    async def _watch(self, w: int, svc: int, index: str) -> None:
        name = service_name(svc)
        while True:
            try:
                new, nodes = await self.c.health.service(
                    name, index=index, passing=True, wait="300s"
                )
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.errors.append(f"{name}: {exc!r}")
                await asyncio.sleep(0.5)
                continue
            self.wakes.append((time.perf_counter(), svc, w, len(nodes)))
            index = new

    async def stop(self) -> None:
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


async def metrics_gauge(c: Any, name: str, labels: dict[str, str] | None = None) -> float:
    _, doc = await c.http.get(
        lambda r: (r.code, json.loads(r.body)), "/v1/agent/metrics", params=[]
    )
    for g in doc["Gauges"]:
        if g["Name"] == name and g["Labels"] == (labels or {}):
            return float(g["Value"])
    raise KeyError(name)


async def wait_parked(c: Any, want: int, timeout: float) -> float:
    started = time.perf_counter()
    deadline = started + timeout
    while time.perf_counter() < deadline:
        if await metrics_gauge(c, "tether.registry.blocking_queries") >= want:
            return time.perf_counter() - started
        await asyncio.sleep(0.05)
    got = await metrics_gauge(c, "tether.registry.blocking_queries")
    raise TimeoutError(f"only {got:.0f} of {want} watchers parked after {timeout}s")


async def durable_writes(c: Any, n: int, in_flight: int) -> float:
    it = iter(range(n))
    payload = "x" * 200

    async def worker() -> None:
        for k in it:
            assert await c.kv.put(f"bench/w{in_flight}/{k % 500}", payload)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(in_flight)))
    return n / (time.perf_counter() - started)


async def txn_writes(c: Any, n: int) -> float:
    """Keys per second written by 64-operation transactions, one at a time."""
    value = base64.b64encode(b"x" * 200).decode()
    started = time.perf_counter()
    for k in range(n):
        ops = [
            {"KV": {"Verb": "set", "Key": f"bench/txn/{k % 50}/{i}", "Value": value}}
            for i in range(64)
        ]
        out = await c.txn.put(ops)
        assert out["Errors"] is None
    return n * 64 / (time.perf_counter() - started)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    nofile = raise_nofile(args.watchers * 2 + 1000)
    if nofile < args.watchers + 200:
        raise SystemExit(f"open-file limit {nofile} is too low for {args.watchers} watchers")
    rng = random.Random(args.seed)
    result: dict[str, Any] = {
        "machine": machine(),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "services": args.services,
        "instances": args.instances,
        "watchers": args.watchers,
        "rounds": args.rounds,
    }
    with tempfile.TemporaryDirectory(prefix="registry-bench-") as tmp:
        reg = Registry(Path(tmp), args.fsync)
        c = consul.aio.Consul(port=reg.port, connections_limit=args.watchers + 200)
        watchers: Watchers | None = None
        try:
            result["rss_idle_mb"] = proc_memory(reg.pid)["VmRSS"] / 1024
            secs = await register_all(c, args.services, args.instances, 32)
            total = args.services * args.instances
            result["register_seconds"] = secs
            result["registrations_per_s"] = total / secs
            result["rss_registered_mb"] = proc_memory(reg.pid)["VmRSS"] / 1024
            _, nodes = await c.health.service(service_name(0), passing=True)
            assert len(nodes) == args.instances, len(nodes)

            indexes: dict[int, str] = {}
            for i in range(args.services):
                indexes[i], _ = await c.health.service(service_name(i), passing=True)
            watchers = Watchers(c, args.services, args.watchers)
            armed_from = time.perf_counter()
            await watchers.start(indexes)
            await wait_parked(c, args.watchers, 120)
            result["arm_seconds"] = time.perf_counter() - armed_from
            result["rss_watching_mb"] = proc_memory(reg.pid)["VmRSS"] / 1024

            latencies: list[float] = []
            round_max: list[float] = []
            cross = 0
            wrong = 0
            targets = rng.sample(range(args.services), args.rounds)
            cpu_before = proc_cpu_seconds(reg.pid)
            # The bench's own collector would stall its 5,000 watchers and show up as
            # registry latency: keep it out of the measured rounds.
            gc.collect()
            gc.freeze()
            gc.disable()
            for rnd, svc in enumerate(targets):
                await wait_parked(c, args.watchers, 30)
                mark = len(watchers.wakes)
                status = "critical" if rnd % 2 == 0 else "passing"
                j = 0 if status == "critical" else 1
                expect = args.instances - 1 if status == "critical" else args.instances
                if status == "passing":
                    # Make instance 1 critical first (unmeasured), then measure its recovery.
                    await c.catalog.register(
                        node_of(svc, j, args.services),
                        node_address(node_of(svc, j, args.services)),
                        check=check_body(svc, j, args.services, "critical"),
                    )
                    await wait_parked(c, args.watchers, 30)
                    await asyncio.sleep(0.05)
                    mark = len(watchers.wakes)
                mine = [w for w in range(args.watchers) if w % args.services == svc]
                t0 = time.perf_counter()
                await c.catalog.register(
                    node_of(svc, j, args.services),
                    node_address(node_of(svc, j, args.services)),
                    check=check_body(svc, j, args.services, status),
                )
                deadline = t0 + 10
                while time.perf_counter() < deadline:
                    woke = {w for (_, s, w, _) in watchers.wakes[mark:] if s == svc}
                    if woke >= set(mine):
                        break
                    await asyncio.sleep(0.001)
                else:
                    raise TimeoutError(f"round {rnd}: not every watcher of {svc} woke")
                first: dict[int, tuple[float, int]] = {}
                for t, s, w, n in watchers.wakes[mark:]:
                    if s == svc and w not in first:
                        first[w] = (t - t0, n)
                latencies.extend(v[0] for v in first.values())
                round_max.append(max(v[0] for v in first.values()))
                wrong += sum(1 for v in first.values() if v[1] != expect)
                await asyncio.sleep(args.settle)
                stray = [(t - t0, s, w, n) for (t, s, w, n) in watchers.wakes[mark:] if s != svc]
                if os.environ.get("BENCH_DEBUG"):
                    print(f"round {rnd}: all woken in {round_max[-1] * 1000:.1f} ms")
                if stray and os.environ.get("BENCH_DEBUG"):
                    print(f"round {rnd} svc {svc}: {len(stray)} stray, e.g. {stray[:5]}")
                cross += len(stray)
            cpu_flip = proc_cpu_seconds(reg.pid) - cpu_before
            gc.enable()
            gc.unfreeze()
            result["gc_max_pause_ms"] = {
                gen: await metrics_gauge(
                    c, "tether.registry.gc.max_pause_seconds", {"generation": gen}
                )
                * 1000
                for gen in ("0", "1", "2")
            }
            result["wake_p50_ms"] = pct(latencies, 0.50) * 1000
            result["wake_p99_ms"] = pct(latencies, 0.99) * 1000
            result["wake_max_ms"] = max(latencies) * 1000
            result["all_woken_p50_ms"] = statistics.median(round_max) * 1000
            result["all_woken_p99_ms"] = pct(round_max, 0.99) * 1000
            result["wake_samples"] = len(latencies)
            result["cross_service_wakeups"] = cross
            result["wrong_answers"] = wrong
            result["watch_errors"] = len(watchers.errors)
            result["registry_cpu_during_flips_s"] = cpu_flip
            result["rss_peak_mb"] = proc_memory(reg.pid)["VmHWM"] / 1024
            await watchers.stop()
            watchers = None
            result["kv_writes_per_s_1"] = await durable_writes(c, args.writes, 1)
            result["kv_writes_per_s_32"] = await durable_writes(c, args.writes * 2, 32)
            result["txn_keys_per_s"] = await txn_writes(c, args.writes // 4)
            mem = proc_memory(reg.pid)
            result["rss_end_mb"] = mem["VmRSS"] / 1024
            result["rss_peak_mb"] = mem["VmHWM"] / 1024
            result["fsync"] = args.fsync
        finally:
            if watchers is not None:
                await watchers.stop()
            await c.close()
            reg.stop()
    return result


def report(r: dict[str, Any]) -> str:
    return "\n".join(
        [
            f"machine: {r['machine']}",
            f"date:    {r['date']}",
            f"catalog: {r['services']} services x {r['instances']} instances registered in "
            f"{r['register_seconds']:.1f} s ({r['registrations_per_s']:.0f}/s, 32 in flight)",
            f"watchers: {r['watchers']} parked in {r['arm_seconds']:.1f} s",
            f"flip -> watcher answered ({r['wake_samples']} samples over {r['rounds']} flips): "
            f"p50 {r['wake_p50_ms']:.1f} ms, p99 {r['wake_p99_ms']:.1f} ms, "
            f"max {r['wake_max_ms']:.1f} ms",
            f"flip -> every watcher of the service answered: p50 {r['all_woken_p50_ms']:.1f} ms, "
            f"p99 {r['all_woken_p99_ms']:.1f} ms",
            f"watchers of other services woken: {r['cross_service_wakeups']}; wrong answers: "
            f"{r['wrong_answers']}; watch errors: {r['watch_errors']}",
            f"durable KV writes/s: {r['kv_writes_per_s_1']:.0f} (1 client), "
            f"{r['kv_writes_per_s_32']:.0f} (32 in flight); keys/s in 64-op txns: "
            f"{r['txn_keys_per_s']:.0f}; fsync={r['fsync']}",
            f"registry RSS: idle {r['rss_idle_mb']:.0f} MB, registered "
            f"{r['rss_registered_mb']:.0f} MB, with watchers {r['rss_watching_mb']:.0f} MB, "
            f"peak {r['rss_peak_mb']:.0f} MB",
            "registry GC: longest pause per generation (ms): "
            + ", ".join(f"gen{g} {v:.1f}" for g, v in r["gc_max_pause_ms"].items()),
        ]
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--services", type=int, default=1000)
    p.add_argument("--instances", type=int, default=10)
    p.add_argument("--watchers", type=int, default=5000)
    p.add_argument("--rounds", type=int, default=40)
    p.add_argument("--writes", type=int, default=2000)
    p.add_argument("--settle", type=float, default=0.2, help="seconds to watch for stray wakes")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--fsync", action="store_true", help="run the registry with --fsync")
    p.add_argument("--json", action="store_true", help="print the result as JSON too")
    args = p.parse_args()
    if args.rounds > args.services:
        p.error("--rounds must not exceed --services")
    import uvloop

    result = uvloop.run(run(args))
    print(report(result))
    if args.json:
        print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
