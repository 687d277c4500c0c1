"""The mesh's live traffic numbers: sidecars' stats reports, aggregated per edge and service.

Each sidecar sends a `stats` report over its push connection every few seconds (what it
handled since the previous one: counts by response class and a latency histogram per
destination; docs/push-protocol.md). This replica keeps the reports of the last
`window` seconds per sidecar, in memory and bounded, and aggregates them:

- an **edge** is what one service's sidecars sent to another (the outbound listener's
  view, the caller's: source service -> destination service, per destination subset
  when a TrafficSplit names one); all egress hosts are one destination, `egress`;
- a **service** row is what its own sidecars' inbound listeners handed to the app,
  whoever called.

Requests/s add up over sidecars (each sidecar's counts over the seconds its reports
cover); success rate is the share of requests that got a status below 500; p50/p99
come from the summed histogram buckets, interpolated within a bucket as Prometheus'
`histogram_quantile` does. Retries and ejections are counters later features fill.

Several replicas: every replica writes its aggregate (counts and rates, not per-sidecar
data) to the registry KV under `tether/push/stats/<replica>` every `publish_interval`
seconds, and `GET /api/v1/stats` on any replica merges its own live aggregate with the
other replicas' recent ones (a sidecar is connected to one replica at a time, so the
sums count each once). `tether top` and the dashboard read that route.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from aiohttp import web

from controlplane.api import route
from controlplane.auth import READ_STATS, STATS_PREFIX
from wire import push as protocol

if TYPE_CHECKING:
    from controlplane.server import ControlPlane

log = logging.getLogger("tether.stats")

WINDOW = 10.0
PUBLISH_INTERVAL = 5.0
# Another replica's aggregate older than this is left out (that replica is gone).
STALE_AFTER = 3 * PUBLISH_INTERVAL
# Reports kept per sidecar: a window's worth at the fastest rate the push server takes.
MAX_REPORTS = 64
# Sidecars whose reports are kept (more are refused until some expire).
MAX_SIDECARS = 20_000
_CLASSES = len(protocol.STATUS_CLASSES)
_BUCKETS = len(protocol.LATENCY_BOUNDS) + 1


@dataclass
class Counts:
    """Requests in a window: by response class, latency buckets, and their rate."""

    classes: list[int] = field(default_factory=lambda: [0] * _CLASSES)
    buckets: list[int] = field(default_factory=lambda: [0] * _BUCKETS)
    latency_sum: float = 0.0
    rate: float = 0.0
    retries: int = 0
    ejections: int = 0
    sidecars: int = 0

    def add(self, other: Counts) -> None:
        for i, v in enumerate(other.classes):
            self.classes[i] += v
        for i, v in enumerate(other.buckets):
            self.buckets[i] += v
        self.latency_sum += other.latency_sum
        self.rate += other.rate
        self.retries += other.retries
        self.ejections += other.ejections
        self.sidecars += other.sidecars

    @property
    def requests(self) -> int:
        return sum(self.classes)

    @property
    def success_rate(self) -> float | None:
        """Share of requests answered below 500 (None without requests)."""
        n = self.requests
        # Class 0: ended without a status (cut short); 5: 5xx, local replies included.
        return (n - self.classes[0] - self.classes[5]) / n if n else None

    def quantile(self, q: float) -> float | None:
        """Seconds, interpolated linearly within the bucket (as Prometheus does)."""
        total = sum(self.buckets)
        if not total:
            return None
        rank = q * total
        running = 0
        lower = 0.0
        for i, count in enumerate(self.buckets):
            upper = protocol.LATENCY_BOUNDS[i] if i < len(protocol.LATENCY_BOUNDS) else None
            if count and running + count >= rank:
                if upper is None:  # the +Inf bucket: its lower bound is all we know
                    return lower
                return lower + (upper - lower) * (rank - running) / count
            running += count
            if upper is not None:
                lower = upper
        return lower

    def summary(self) -> dict[str, Any]:
        p50, p99 = self.quantile(0.5), self.quantile(0.99)
        return {
            "rps": round(self.rate, 3),
            "requests": self.requests,
            "success_rate": None if self.success_rate is None else round(self.success_rate, 4),
            "p50_ms": None if p50 is None else round(p50 * 1000, 2),
            "p99_ms": None if p99 is None else round(p99 * 1000, 2),
            "retries": self.retries,
            "ejections": self.ejections,
            "sidecars": self.sidecars,
            "classes": dict(zip(protocol.STATUS_CLASSES, self.classes, strict=True)),
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "classes": self.classes,
            "buckets": self.buckets,
            "sum": round(self.latency_sum, 6),
            "rate": round(self.rate, 6),
            "retries": self.retries,
            "ejections": self.ejections,
            "sidecars": self.sidecars,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Counts:
        """From another replica's KV entry; a malformed one raises ValueError."""
        classes, buckets = list(d["classes"]), list(d["buckets"])
        if len(classes) != _CLASSES or len(buckets) != _BUCKETS:
            raise ValueError("counts of another shape")
        return cls(
            classes=[int(v) for v in classes],
            buckets=[int(v) for v in buckets],
            latency_sum=float(d.get("sum", 0.0)),
            rate=float(d.get("rate", 0.0)),
            retries=int(d.get("retries", 0)),
            ejections=int(d.get("ejections", 0)),
            sidecars=int(d.get("sidecars", 0)),
        )


EdgeKey = tuple[str, str, str]  # (source "svc.ns", destination "svc.ns" or "egress", subset)


@dataclass
class Aggregate:
    """Edges and services of one replica, or of several merged."""

    edges: dict[EdgeKey, Counts] = field(default_factory=dict)
    services: dict[str, Counts] = field(default_factory=dict)

    def merge(self, other: Aggregate) -> None:
        for key, c in other.edges.items():
            self.edges.setdefault(key, Counts()).add(c)
        for name, c in other.services.items():
            self.services.setdefault(name, Counts()).add(c)

    def to_dict(self) -> dict[str, Any]:
        return {
            "edges": [[*k, c.to_dict()] for k, c in sorted(self.edges.items())],
            "services": [[k, c.to_dict()] for k, c in sorted(self.services.items())],
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Aggregate:
        agg = cls()
        for src, dst, subset, counts in d.get("edges", ()):
            agg.edges[(str(src), str(dst), str(subset))] = Counts.from_dict(counts)
        for name, counts in d.get("services", ()):
            agg.services[str(name)] = Counts.from_dict(counts)
        return agg


def _counts_of(row: protocol.StatsRow, seconds: float) -> Counts:
    return Counts(
        classes=list(row.classes),
        buckets=list(row.buckets),
        latency_sum=row.latency_sum,
        rate=sum(row.classes) / seconds,
        retries=row.retries,
        ejections=row.ejections,
    )


class MeshStats:
    """The reports of this replica's sidecars over the last `window` seconds."""

    def __init__(self, window: float = WINDOW, clock: Callable[[], float] = time.monotonic):
        self.window = window
        self.clock = clock
        # Per sidecar: its service key ("svc.ns") and (arrival, seconds, report) entries.
        self._reports: dict[str, tuple[str, deque[tuple[float, protocol.Stats]]]] = {}
        self.reports = 0
        self.refused = 0

    def record(self, sidecar: str, source: str, report: protocol.Stats) -> bool:
        """Keep one report of `sidecar` (id), which fronts `source` (`svc.ns`)."""
        now = self.clock()
        entry = self._reports.get(sidecar)
        if entry is None:
            self.expire(now)
            if len(self._reports) >= MAX_SIDECARS:
                self.refused += 1
                return False
            entry = self._reports[sidecar] = (source, deque(maxlen=MAX_REPORTS))
        entry[1].append((now, report))
        self.reports += 1
        return True

    def expire(self, now: float) -> None:
        cutoff = now - self.window
        for sid in list(self._reports):
            reports = self._reports[sid][1]
            while reports and reports[0][0] < cutoff:
                reports.popleft()
            if not reports:
                del self._reports[sid]

    def aggregate(self) -> Aggregate:
        """This replica's edges and services over the window."""
        now = self.clock()
        self.expire(now)
        agg = Aggregate()
        for source, reports in self._reports.values():
            # Per sidecar: its counts over the seconds its reports cover.
            seconds = sum(r.seconds for _, r in reports)
            mine: dict[tuple[str, EdgeKey | str], Counts] = {}
            for _, report in reports:
                for row in report.rows:
                    key: tuple[str, EdgeKey | str]
                    if row.listener == "inbound":
                        key = ("service", source)
                    elif row.listener == "outbound":
                        key = ("edge", (source, row.destination, row.subset))
                    else:
                        continue
                    c = mine.setdefault(key, Counts())
                    c.add(_counts_of(row, 1.0))
            # Every reporting sidecar counts for its service, busy or not.
            agg.services.setdefault(source, Counts()).sidecars += 1
            for (kind, name), c in mine.items():
                c.rate = c.requests / seconds if seconds else 0.0
                if kind == "service":
                    assert isinstance(name, str)
                    agg.services[name].add(c)
                else:
                    assert isinstance(name, tuple)
                    c.sidecars = 1  # callers' sidecars that sent on this edge
                    agg.edges.setdefault(name, Counts()).add(c)
        return agg


def render(agg: Aggregate, **extra: Any) -> dict[str, Any]:
    """The answer of `GET /api/v1/stats`: edges and services with their summaries."""
    services = set(agg.services)
    for src, dst, _ in agg.edges:
        services.add(src)
        if dst != "egress":
            services.add(dst)
    edges = []
    for (src, dst, subset), c in sorted(agg.edges.items()):
        edges.append({"source": src, "destination": dst, "subset": subset, **c.summary()})
    rows = []
    for name in sorted(services):
        row: dict[str, Any] = {"service": name}
        row.update(agg.services.get(name, Counts()).summary())
        rows.append(row)
    return {**extra, "services": rows, "edges": edges}


class StatsPublisher:
    """Writes this replica's aggregate to the KV and reads the other replicas'."""

    def __init__(
        self,
        stats: MeshStats,
        consul: Any,
        replica: str,
        *,
        prefix: str = STATS_PREFIX,
        interval: float = PUBLISH_INTERVAL,
        token: str | None = None,
    ) -> None:
        self.stats = stats
        self.consul = consul
        self.replica = replica
        self.prefix = prefix
        self.interval = interval
        self.token = token
        self.writes = 0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        # Gone: the others stop counting this replica's sidecars at once.
        with contextlib.suppress(Exception):
            await self.consul.kv.delete(f"{self.prefix}{self.replica}", token=self.token)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.publish()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.info("stats: aggregate not written (%s); retrying", exc)

    async def publish(self) -> None:
        body = {"replica": self.replica, "updated": time.time(), **self.stats.aggregate().to_dict()}
        text = json.dumps(body, separators=(",", ":"))
        await self.consul.kv.put(f"{self.prefix}{self.replica}", text, token=self.token)
        self.writes += 1

    async def mesh(self) -> tuple[Aggregate, list[str]]:
        """Every replica's aggregate merged (this one's live), and the replicas counted."""
        agg = self.stats.aggregate()
        replicas = [self.replica]
        try:
            _, items = await self.consul.kv.get(self.prefix, recurse=True, token=self.token)
        except Exception as exc:
            log.info("stats: other replicas' aggregates unreadable: %s", exc)
            items = None
        now = time.time()
        for item in _others(items or (), self.replica):
            try:
                body = json.loads(item.get("Value") or b"{}")
                if now - float(body.get("updated", 0)) > STALE_AFTER:
                    continue
                agg.merge(Aggregate.from_dict(body))
            except (ValueError, TypeError, KeyError, AttributeError):
                continue
            replicas.append(str(body.get("replica")))
        return agg, replicas


def _others(items: Iterable[Mapping[str, Any]], replica: str) -> Iterable[Mapping[str, Any]]:
    for item in items:
        if not str(item.get("Key", "")).endswith(f"/{replica}"):
            yield item


STATS_PUBLISHER: web.AppKey[StatsPublisher] = web.AppKey("stats_publisher")


def install(cp: ControlPlane, stats: MeshStats, replica: Callable[[], str]) -> StatsPublisher:
    """`GET /api/v1/stats` on the control plane, and the publishing of this replica's
    aggregate while it runs (under the replica's name as it is at start)."""
    publisher = StatsPublisher(stats, None, replica())

    async def handle(request: web.Request) -> web.Response:
        agg, replicas = await publisher.mesh()
        body = render(agg, window=stats.window, replicas=sorted(replicas), time=time.time())
        return web.json_response(body)

    async def _start(_app: web.Application) -> None:
        publisher.consul = cp.consul
        publisher.replica = replica()
        publisher.start()

    async def _stop(_app: web.Application) -> None:
        await publisher.aclose()

    route(cp.app, "GET", "/api/v1/stats", handle, READ_STATS)
    cp.app[STATS_PUBLISHER] = publisher
    cp.app.on_startup.append(_start)
    cp.app.on_shutdown.append(_stop)
    return publisher
