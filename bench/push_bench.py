"""Policy push at scale: 2,000 simulated sidecars on one control-plane process.

`make bench-push` (or `python -m bench.push_bench [--sidecars 2000] [--workers 2]`).

It starts a registry and one control plane as child processes, then `--workers`
processes of lightweight sidecars that speak the real push protocol (wire/push:
hello, snapshot with its hash checked, ack). Sidecar i is an instance of service
`svc<i mod S>` and calls `svc<i+1 mod S>`, with S = sidecars/10, so one service's
policy concerns 1% of the sidecars (its 10 instances and its 10 callers). Then:

1. a mesh-wide change (MeshConfig): time until 99% and 100% of the sidecars acked;
2. a change to one service's policy (a TrafficSplit): the same for the 1% it concerns,
   and a check that no other sidecar got anything;

both written into the registry KV through `PolicyStore` (as another replica would),
timed from just before the write to each sidecar's ACK. Control-plane RSS and CPU time
come from /proc. Prints a Markdown table for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.ports import free_port, wait_port

ROOT = Path(__file__).resolve().parent.parent


def proc_stats(pid: int) -> tuple[float, float]:
    """(RSS in MB, CPU seconds user+system) of a process."""
    rss = 0.0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) / 1024
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return rss, (int(fields[11]) + int(fields[12])) / ticks


# -- worker: many simulated sidecars in one process ----------------------------------------


async def worker(url: str, first: int, count: int, services: int) -> None:
    import aiohttp

    from wire import push as protocol

    acks: dict[str, list[float]] = {}
    connects: dict[str, list[float]] = {}
    ready = asyncio.Event()
    done = 0

    async def one(i: int, session: aiohttp.ClientSession) -> None:
        """One sidecar: connect, hello with what it runs, ack snapshots; reconnect with
        backoff and jitter (as proxy/policy_client.py does) when the connection ends."""
        nonlocal done
        svc = f"svc{i % services}"
        node = protocol.NodeIdentity(svc, "default", f"{svc}-{i}", f"z{i % 3}")
        calls = (protocol.service_key(f"svc{(i + 1) % services}", "default"),)
        times = acks.setdefault(node.key, [])
        joined = connects.setdefault(node.key, [])
        rng = random.Random(i)
        version, hash_ = 0, ""
        attempt = 0
        while True:
            try:
                async with session.ws_connect(
                    url, protocols=(protocol.SUBPROTOCOL,), max_msg_size=protocol.MAX_MESSAGE
                ) as ws:
                    await ws.send_str(protocol.encode(protocol.Hello(node, calls, version, hash_)))
                    joined.append(time.time())
                    attempt = 0
                    async for frame in ws:
                        if frame.type != aiohttp.WSMsgType.TEXT:
                            continue
                        msg = protocol.decode(frame.data)
                        if not isinstance(msg, protocol.Snapshot):
                            continue
                        if (
                            protocol.content_hash(protocol.canonical_json(msg.resources))
                            != msg.hash
                        ):
                            nack = protocol.Nack(msg.version, msg.nonce, "hash")
                            await ws.send_str(protocol.encode(nack))
                            continue
                        await ws.send_str(protocol.encode(protocol.Ack(msg.version, msg.nonce)))
                        version, hash_ = msg.version, msg.hash
                        times.append(time.time())
                        if len(times) == 1:
                            done += 1
                            if done == count:
                                ready.set()
            except (aiohttp.ClientError, OSError):
                pass
            except Exception as exc:
                print(f"sidecar {i}: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
            step = min(2.0, 0.1 * 2**attempt)
            attempt += 1
            await asyncio.sleep(step / 2 + rng.uniform(0, step / 2))

    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        tasks = []
        for batch in range(first, first + count, 50):
            for i in range(batch, min(batch + 50, first + count)):
                tasks.append(asyncio.create_task(one(i, session)))
            await asyncio.sleep(0.02)  # under the listen backlog
        await asyncio.wait_for(ready.wait(), 120)
        print("ready", flush=True)
        loop = asyncio.get_running_loop()
        while True:
            line = await loop.run_in_executor(None, sys.stdin.readline)
            if not line or line.strip() == "quit":
                break
            if line.strip() == "report":
                print(json.dumps({"acks": acks, "connects": connects}), flush=True)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


# -- driver --------------------------------------------------------------------------------


def mesh_config(timeout_s: int) -> dict[str, Any]:
    return {
        "apiVersion": "tether.dev/v1alpha1",
        "kind": "MeshConfig",
        "metadata": {"name": "mesh"},
        "spec": {"requestTimeout": f"{timeout_s}s"},
    }


def traffic_split(service: str, v2: int) -> dict[str, Any]:
    return {
        "apiVersion": "tether.dev/v1alpha1",
        "kind": "TrafficSplit",
        "metadata": {"name": service, "namespace": "default"},
        "spec": {
            "subsets": [
                {"name": "v1", "selector": {"version": "v1"}, "weight": 100 - v2},
                {"name": "v2", "selector": {"version": "v2"}, "weight": v2},
            ]
        },
    }


def percentile_time(latencies: list[float], expected: int, share: float) -> float | None:
    need = max(1, int(expected * share + 0.999999))
    if len(latencies) < need:
        return None
    return sorted(latencies)[need - 1]


class Bench:
    def __init__(self, sidecars: int, workers: int) -> None:
        self.sidecars = sidecars
        self.workers_n = workers
        self.services = max(1, sidecars // 10)
        self.procs: list[subprocess.Popen[str]] = []
        self.env = dict(os.environ, PYTHONPATH=str(ROOT))

    def spawn(self, args: list[str], **kw: Any) -> subprocess.Popen[str]:
        p = subprocess.Popen(
            [sys.executable, *args], cwd=ROOT, env=self.env, start_new_session=True, text=True, **kw
        )
        self.procs.append(p)
        return p

    def stop_all(self) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)

    async def run(self) -> dict[str, Any]:
        import consul.aio

        from controlplane.schema import Resource
        from controlplane.store import PolicyStore

        reg_port = free_port()
        reg = self.spawn(["-m", "tether.cli", "registry", "--port", str(reg_port)])
        wait_port(reg_port, reg)
        self.env["CONSUL_HTTP_ADDR"] = f"127.0.0.1:{reg_port}"
        client = consul.aio.Consul(host="127.0.0.1", port=reg_port)
        store = PolicyStore(client)
        await store.apply([Resource.from_dict(mesh_config(15))])
        cp_port = free_port()
        cp = self.spawn(
            ["-m", "tether.cli", "controlplane", "--port", str(cp_port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_port(cp_port, cp)
        rss0, _ = proc_stats(cp.pid)
        url = f"ws://127.0.0.1:{cp_port}/api/v1/push"
        per = (self.sidecars + self.workers_n - 1) // self.workers_n
        workers = []
        t_connect = time.time()
        for n in range(self.workers_n):
            first = n * per
            count = min(per, self.sidecars - first)
            workers.append(
                self.spawn(
                    [
                        "-m",
                        "bench.push_bench",
                        "--worker",
                        url,
                        str(first),
                        str(count),
                        str(self.services),
                    ],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                )
            )
        loop = asyncio.get_running_loop()
        for w in workers:
            assert w.stdout is not None
            line = await loop.run_in_executor(None, w.stdout.readline)
            if line.strip() != "ready":
                raise RuntimeError(f"worker failed: {line!r}")
        connect_s = time.time() - t_connect
        rss_connected, _ = proc_stats(cp.pid)

        def report(what: str = "acks") -> dict[str, list[float]]:
            out: dict[str, list[float]] = {}
            for w in workers:
                assert w.stdin is not None and w.stdout is not None
                w.stdin.write("report\n")
                w.stdin.flush()
                out.update(json.loads(w.stdout.readline())[what])
            return out

        async def acked_since(t0: float) -> dict[str, float]:
            """Each sidecar that acked at or after `t0`: how long after its first such ack."""
            acks = await loop.run_in_executor(None, report)
            return {k: min(t for t in ts if t >= t0) - t0 for k, ts in acks.items()
                    if any(t >= t0 for t in ts)}  # fmt: skip

        async def settle(t0: float, expected: set[str], deadline: float = 15.0) -> dict[str, float]:
            end = time.time() + deadline
            while True:
                got = await acked_since(t0)
                if expected <= set(got) or time.time() > end:
                    await asyncio.sleep(0.5)  # any stray push to others shows up too
                    return await acked_since(t0)
                await asyncio.sleep(0.25)

        async def change(resources: list[dict[str, Any]], expected: set[str]) -> dict[str, Any]:
            """Apply `resources`; how soon each of `expected` acked, and what it cost."""
            await asyncio.sleep(1.0)  # let the status flush of the last round settle
            _, cpu0 = proc_stats(cp.pid)
            t0 = time.time()
            await store.apply([Resource.from_dict(r) for r in resources])
            write_s = time.time() - t0
            got = await settle(t0, expected)
            _, cpu1 = proc_stats(cp.pid)
            lat = [got[k] for k in expected if k in got]
            return {
                "expected": len(expected),
                "acked": len(lat),
                "p99_s": percentile_time(lat, len(expected), 0.99),
                "all_s": percentile_time(lat, len(expected), 1.0),
                "others_pushed": len(set(got) - expected),
                "write_s": write_s,
                "cpu_s": cpu1 - cpu0,
            }

        all_ids = {f"default/svc{i % self.services}/svc{i % self.services}-{i}"
                   for i in range(self.sidecars)}  # fmt: skip
        results: dict[str, Any] = {
            "sidecars": self.sidecars,
            "workers": self.workers_n,
            "connect_s": connect_s,
            "rss_idle_mb": rss0,
            "rss_connected_mb": rss_connected,
        }
        # 1. mesh-wide
        results["mesh"] = await change([mesh_config(20)], all_ids)
        # 2. one service: its instances (inbound policy) and its callers
        target = 7 % self.services
        concerned = {
            k
            for k in all_ids
            if k.split("/")[1] in (f"svc{target}", f"svc{(target - 1) % self.services}")
        }
        results["one_service"] = await change([traffic_split(f"svc{target}", 10)], concerned)
        rss_end, cpu_total = proc_stats(cp.pid)
        results["rss_end_mb"] = rss_end
        results["cp_cpu_total_s"] = cpu_total
        # 3. The control plane killed and started again on its port: every sidecar
        # reconnects saying what it runs, and nothing needs to be sent again.
        acked_before = sum(len(v) for v in (await loop.run_in_executor(None, report)).values())
        os.killpg(cp.pid, signal.SIGKILL)
        cp.wait(10)
        await asyncio.sleep(1.0)  # every sidecar has noticed and is backing off
        t_spawn = time.time()
        cp = self.spawn(
            ["-m", "tether.cli", "controlplane", "--port", str(cp_port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        await loop.run_in_executor(None, wait_port, cp_port, cp)
        t_listen = time.time()
        deadline = time.time() + 60
        while True:
            joined = await loop.run_in_executor(None, report, "connects")
            # Connections made after the kill; a few may beat wait_port's poll to it.
            back = [max(0.0, min(t for t in ts if t >= t_spawn) - t_listen)
                    for ts in joined.values() if any(t >= t_spawn for t in ts)]  # fmt: skip
            if len(back) >= len(all_ids) or time.time() > deadline:
                break
            await asyncio.sleep(0.25)
        await asyncio.sleep(1.0)
        acked_after = sum(len(v) for v in (await loop.run_in_executor(None, report)).values())
        rss_restarted, _ = proc_stats(cp.pid)
        results["restart"] = {
            "startup_s": t_listen - t_spawn,
            "reconnected": len(back),
            "p99_s": percentile_time(back, len(all_ids), 0.99),
            "all_s": percentile_time(back, len(all_ids), 1.0),
            "resent": acked_after - acked_before,
            "rss_mb": rss_restarted,
        }
        for w in workers:
            assert w.stdin is not None
            w.stdin.write("quit\n")
            w.stdin.flush()
        await client.close()
        return results


def fmt(x: float | None) -> str:
    return "not reached" if x is None else f"{x * 1000:.0f} ms"


def markdown(r: dict[str, Any]) -> str:
    m, o, rs = r["mesh"], r["one_service"], r["restart"]
    lines = [
        f"`make bench-push` — {r['sidecars']} simulated sidecars in {r['workers']} processes, "
        f"one control-plane process, registry as a separate process; {platform.node()}, "
        f"{os.cpu_count()} cores, {time.strftime('%Y-%m-%d')}.",
        "",
        "| change | sidecars concerned | acked | 99% acked | 100% acked | others pushed | CP CPU |",
        "|---|---|---|---|---|---|---|",
        f"| mesh-wide (MeshConfig) | {m['expected']} | {m['acked']} | {fmt(m['p99_s'])} | "
        f"{fmt(m['all_s'])} | – | {m['cpu_s']:.2f} s |",
        f"| one service (TrafficSplit) | {o['expected']} | {o['acked']} | {fmt(o['p99_s'])} | "
        f"{fmt(o['all_s'])} | {o['others_pushed']} | {o['cpu_s']:.2f} s |",
        "",
        f"Control-plane RSS: {r['rss_idle_mb']:.0f} MB idle, {r['rss_connected_mb']:.0f} MB with "
        f"all sidecars connected, {r['rss_end_mb']:.0f} MB at the end; "
        f"{r['cp_cpu_total_s']:.1f} s CPU in total (connecting {r['sidecars']} sidecars took "
        f"{r['connect_s']:.1f} s). Times run from just before the KV write to each ACK.",
        "",
        f"Control plane killed (SIGKILL) and started again on its port: it listened "
        f"{rs['startup_s']:.1f} s after the start; then 99% of the sidecars were back in "
        f"{fmt(rs['p99_s'])} and all {rs['reconnected']} in {fmt(rs['all_s'])} (backoff with "
        f"jitter, capped at 2 s here), and {rs['resent']} snapshots had to be sent again "
        f"(each sidecar's hello carried the hash it runs); RSS {rs['rss_mb']:.0f} MB.",
    ]
    return "\n".join(lines)


def routing_costs() -> str:
    """CPU cost of the policy step on the outbound path (`--routing`), per request."""
    import random
    import timeit

    from proxy.balance import Endpoint
    from proxy.cluster import Cluster, StaticDirectory
    from proxy.policy import Policy

    orders = Cluster("orders", "default")
    orders.set_endpoints(
        [
            Endpoint(f"o{i}", "127.0.0.1", 1000 + i, meta={"version": f"v{1 + i % 2}"})
            for i in range(6)
        ]
    )

    def policy(docs: list[dict[str, Any]]) -> Policy:
        from wire import push as protocol

        p = Policy(StaticDirectory([orders]))
        text = protocol.canonical_json(docs)
        snap = protocol.Snapshot(1, protocol.content_hash(text), "n", tuple(docs))
        asyncio.run(p.apply(snap))
        return p

    rules = {
        "apiVersion": "tether.dev/v1alpha1",
        "kind": "Route",
        "metadata": {"name": "orders", "namespace": "default"},
        "spec": {
            "rules": [
                {"match": {"headers": [{"name": "x-canary", "exact": "true"}]},
                 "destination": {"subset": "v2"}},
                {"match": {"path": {"prefix": "/admin"}, "method": "POST"},
                 "destination": {"subset": "v1"}},
                {"match": {"queryParams": [{"name": "beta", "present": True}]},
                 "destination": {"subset": "v2"}},
            ]
        },
    }  # fmt: skip
    headers = [(b"Host", b"orders"), (b"User-Agent", b"curl/8"), (b"Accept", b"*/*"),
               (b"X-Request-Id", b"abc"), (b"Content-Type", b"application/json")]  # fmt: skip
    rng = random.Random(1)
    split_only = policy([traffic_split("orders", 10)])
    with_rules = policy([traffic_split("orders", 10), rules])

    def step(p: Policy, target: str) -> None:
        sp = p.route("default", "orders")
        if sp is not None:
            d = p.table.decide(sp, "GET", target, sp.read_headers(headers), rng)
            if d.subset is not None:
                p.subset_cluster(d.namespace, d.service, d.subset)

    cases = [
        ("a service without policy", lambda: split_only.route("default", "inventory")),
        ("90/10 TrafficSplit", lambda: step(split_only, "/orders/1")),
        ("3 Route rules (none matches) + split", lambda: step(with_rules, "/orders/1")),
        ("the same, with a query string", lambda: step(with_rules, "/orders/1?id=7")),
    ]
    lines = ["| request to | µs CPU per request |", "|---|---|"]
    for name, fn in cases:
        best = min(timeit.repeat(fn, number=20000, repeat=7)) / 20000
        lines.append(f"| {name} | {best * 1e6:.2f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--sidecars", type=int, default=2000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--json", action="store_true", help="print the raw figures as JSON")
    ap.add_argument("--routing", action="store_true", help="only the policy step's CPU cost")
    ap.add_argument("--worker", nargs=4, metavar=("URL", "FIRST", "COUNT", "SERVICES"),
                    help=argparse.SUPPRESS)  # fmt: skip
    args = ap.parse_args()
    import uvloop

    if args.routing:
        print(routing_costs())
        return
    if args.worker:
        url, first, count, services = args.worker
        uvloop.run(worker(url, int(first), int(count), int(services)))
        return
    bench = Bench(args.sidecars, args.workers)
    try:
        results = uvloop.run(bench.run())
    finally:
        bench.stop_all()
    print(json.dumps(results, indent=2) if args.json else markdown(results))
    m = results["mesh"]
    ok = (
        m["p99_s"] is not None
        and m["p99_s"] <= 2.0
        and m["all_s"] is not None
        and m["all_s"] <= 5.0
        and results["rss_end_mb"] < 300
    )
    print("targets (99% ≤ 2 s, 100% ≤ 5 s, RSS < 300 MB):", "met" if ok else "NOT met")


if __name__ == "__main__":
    main()
