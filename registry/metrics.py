"""`GET /v1/agent/metrics`: the registry's own telemetry, as JSON or Prometheus text.

What an operator needs to see the registry coping: requests by endpoint and status,
blocking queries in flight, the size of the store (objects per table, bytes on disk,
the index), write latency (a histogram fed by a commit hook), sessions and resident
memory. The JSON form has Consul's shape (`Timestamp`, `Gauges`, `Counters`, `Samples`,
`Points`); `?format=prometheus` gives the text exposition format.
"""

from __future__ import annotations

import gc
import math
import os
import time
from bisect import bisect_left

from aiohttp import web

from registry.http import Context, context, reply
from registry.store import Store, Txn

# Upper bounds (seconds) of the write-latency histogram buckets.
WRITE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25)
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


class WriteLatency:
    """A histogram of commit durations, fed by `Store.on_commit`."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.counts = [0] * (len(WRITE_BUCKETS) + 1)
        self.count = 0
        self.total = 0.0
        self.max = 0.0
        store.on_commit(self._observe)

    def _observe(self, txn: Txn) -> None:
        secs = self.store.last_write_seconds
        self.counts[bisect_left(WRITE_BUCKETS, secs)] += 1
        self.count += 1
        self.total += secs
        self.max = max(self.max, secs)

    def quantile(self, q: float) -> float:
        """An upper bound of the q-quantile (the bucket it falls in)."""
        if self.count == 0:
            return 0.0
        target = math.ceil(q * self.count)
        seen = 0
        for i, n in enumerate(self.counts):
            seen += n
            if seen >= target:
                return WRITE_BUCKETS[i] if i < len(WRITE_BUCKETS) else self.max
        return self.max


class GcPauses:
    """Time spent in the garbage collector per generation: the pauses every waiter feels."""

    def __init__(self) -> None:
        self.count = [0, 0, 0]
        self.seconds = [0.0, 0.0, 0.0]
        self.max = [0.0, 0.0, 0.0]
        self._started = 0.0
        gc.callbacks.append(self._on_gc)

    def _on_gc(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
            return
        gen = info.get("generation", 0)
        took = time.perf_counter() - self._started
        self.count[gen] += 1
        self.seconds[gen] += took
        self.max[gen] = max(self.max[gen], took)

    async def aclose(self) -> None:
        if self._on_gc in gc.callbacks:
            gc.callbacks.remove(self._on_gc)


def rss_bytes() -> int:
    """Resident memory of this process (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return 0


def _latency(ctx: Context) -> WriteLatency | None:
    part = ctx.parts.get("write_latency")
    return part if isinstance(part, WriteLatency) else None


def gauges(ctx: Context) -> list[tuple[str, float, dict[str, str]]]:
    store = ctx.store
    out: list[tuple[str, float, dict[str, str]]] = [
        ("tether.registry.blocking_queries", ctx.blocking_in_flight, {}),
        ("tether.registry.watchers", store.hub.waiting, {}),
        ("tether.registry.store.index", store.index, {}),
        ("tether.registry.store.bytes", store.size_bytes(), {}),
        ("tether.registry.process.resident_memory_bytes", rss_bytes(), {}),
        ("tether.registry.uptime_seconds", time.time() - ctx.started, {}),
    ]
    pauses = ctx.parts.get("gc_pauses")
    if isinstance(pauses, GcPauses):
        for gen in range(3):
            labels = {"generation": str(gen)}
            out.append(("tether.registry.gc.collections", pauses.count[gen], labels))
            out.append(("tether.registry.gc.seconds", pauses.seconds[gen], labels))
            out.append(("tether.registry.gc.max_pause_seconds", pauses.max[gen], labels))
    for tbl in ("nodes", "services", "checks", "kv", "sessions", "acl_tokens", "acl_policies",
                "events"):  # fmt: skip
        out.append(("tether.registry.store.objects", len(store.table(tbl)), {"table": tbl}))
    return out


_HELP = {
    "tether.registry.blocking_queries": "Blocking queries in flight.",
    "tether.registry.watchers": "Distinct waiters parked on the watch hub.",
    "tether.registry.store.index": "The highest committed index.",
    "tether.registry.store.bytes": "Bytes of the store on disk (database and WAL).",
    "tether.registry.process.resident_memory_bytes": "Resident memory of the registry.",
    "tether.registry.uptime_seconds": "Seconds since the registry started.",
    "tether.registry.store.objects": "Objects per table.",
    "tether.registry.gc.collections": "Garbage collections per generation.",
    "tether.registry.gc.seconds": "Seconds spent collecting garbage, per generation.",
    "tether.registry.gc.max_pause_seconds": "The longest collection, per generation.",
}


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    body = ",".join(
        f'{k}="{v.replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"'
        for k, v in sorted(labels.items())
    )
    return "{" + body + "}"


def prometheus(ctx: Context) -> str:
    lines: list[str] = []

    def metric(name: str, kind: str, help_text: str) -> None:
        lines.append(f"# HELP {name} {help_text}")
        lines.append(f"# TYPE {name} {kind}")

    metric("tether_registry_http_requests_total", "counter", "HTTP requests by route and status.")
    for (method, route, status), n in sorted(ctx.requests.items()):
        labels = {"method": method, "route": route, "code": str(status)}
        lines.append(f"tether_registry_http_requests_total{_labels(labels)} {n}")
    seen: set[str] = set()
    for name, value, labels in gauges(ctx):
        prom = name.replace(".", "_")
        if prom not in seen:
            metric(prom, "gauge", _HELP.get(name, name))
            seen.add(prom)
        lines.append(f"{prom}{_labels(labels)} {value:g}")
    lat = _latency(ctx)
    store = ctx.store
    metric("tether_registry_write_seconds", "histogram", "Durable commit latency.")
    if lat is not None:
        acc = 0
        for bound, n in zip(WRITE_BUCKETS, lat.counts, strict=False):
            acc += n
            lines.append(f'tether_registry_write_seconds_bucket{{le="{bound:g}"}} {acc}')
        lines.append(f'tether_registry_write_seconds_bucket{{le="+Inf"}} {lat.count}')
    lines.append(f"tether_registry_write_seconds_sum {store.write_seconds:.6f}")
    lines.append(f"tether_registry_write_seconds_count {store.writes}")
    sess = ctx.parts.get("sessions")
    expired = getattr(sess, "expired", 0)
    metric("tether_registry_sessions_expired_total", "counter", "Sessions ended by TTL.")
    lines.append(f"tether_registry_sessions_expired_total {expired}")
    return "\n".join(lines) + "\n"


def as_json(ctx: Context) -> dict[str, object]:
    store = ctx.store
    lat = _latency(ctx)
    counters = [
        {
            "Name": "tether.registry.http.requests",
            "Count": n,
            "Rate": 0,
            "Sum": n,
            "Min": 1,
            "Max": 1,
            "Mean": 1,
            "Stddev": 0,
            "Labels": {"method": method, "route": route, "code": str(status)},
        }
        for (method, route, status), n in sorted(ctx.requests.items())
    ]
    samples = []
    if store.writes:
        mean = store.write_seconds / store.writes * 1000
        samples.append(
            {
                "Name": "tether.registry.write",
                "Count": store.writes,
                "Rate": 0,
                "Sum": store.write_seconds * 1000,
                "Min": 0,
                "Max": (lat.max if lat else 0) * 1000,
                "Mean": mean,
                "Stddev": 0,
                "Labels": {"unit": "ms"},
                "P99": (lat.quantile(0.99) if lat else 0) * 1000,
            }
        )
    return {
        "Timestamp": time.strftime("%Y-%m-%d %H:%M:%S +0000 UTC", time.gmtime()),
        "Gauges": [{"Name": n, "Value": v, "Labels": lbl} for n, v, lbl in gauges(ctx)],
        "Points": [],
        "Counters": counters,
        "Samples": samples,
    }


async def agent_metrics(request: web.Request) -> web.Response:
    ctx = context(request)
    ctx.acl.require(request, "agent", ctx.spec.node, "read")
    if request.query.get("format") == "prometheus":
        resp = web.Response(text=prometheus(ctx))
        resp.headers["Content-Type"] = "text/plain; version=0.0.4; charset=utf-8"
        return resp
    return reply(as_json(ctx))
