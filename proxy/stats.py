"""Data-plane counters and histograms, kept as plain ints and lists, rendered as Prometheus.

The hot path touches only `DestinationStats.record` (two list increments, a bisect and
a float add) and the connection gauges; rendering happens in the admin listener.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterable
from typing import Any

# Upper bounds (seconds) of the latency histogram's buckets; the last bucket is +Inf.
LATENCY_BOUNDS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
_CLASSES = ("none", "1xx", "2xx", "3xx", "4xx", "5xx")


class DestinationStats:
    """Requests to one destination (a cluster `svc.ns`, an egress host, or the local app)."""

    __slots__ = ("buckets", "by_class", "latency_sum", "name")

    def __init__(self, name: str) -> None:
        self.name = name
        # Index status // 100; index 0 counts requests that ended without a status.
        self.by_class = [0, 0, 0, 0, 0, 0]
        self.buckets = [0] * (len(LATENCY_BOUNDS) + 1)
        self.latency_sum = 0.0

    def record(self, status: int, latency: float) -> None:
        self.by_class[status // 100 if 0 < status < 600 else 0] += 1
        self.buckets[bisect_left(LATENCY_BOUNDS, latency)] += 1
        self.latency_sum += latency

    @property
    def total(self) -> int:
        return sum(self.by_class)

    def __repr__(self) -> str:
        return f"<DestinationStats {self.name} total={self.total} 5xx={self.by_class[5]}>"


class ProxyStats:
    """All counters of one sidecar's listeners (shared by outbound and inbound)."""

    def __init__(self) -> None:
        self.destinations: dict[tuple[str, str], DestinationStats] = {}
        self.local_replies: dict[str, int] = {}
        # Per listener name: open downstream connections and all ever accepted.
        self.downstream_active: dict[str, int] = {}
        self.downstream_total: dict[str, int] = {}
        self.tunnels_active = 0
        self.tunnels_total = 0
        # Callables returning the live pools (set by the listeners that own them).
        self.pool_sources: list[Callable[[], Iterable[Any]]] = []

    def destination(self, listener: str, name: str) -> DestinationStats:
        key = (listener, name)
        ds = self.destinations.get(key)
        if ds is None:
            ds = self.destinations[key] = DestinationStats(name)
        return ds

    def local_reply(self, reason: str) -> None:
        self.local_replies[reason] = self.local_replies.get(reason, 0) + 1

    def pools(self) -> list[Any]:
        return [pool for source in self.pool_sources for pool in source()]

    def render_prometheus(self, prefix: str = "tether") -> str:
        """Prometheus text exposition format (version 0.0.4)."""
        out: list[str] = []
        p = prefix
        out.append(f"# HELP {p}_requests_total Requests by listener, destination, status class.")
        out.append(f"# TYPE {p}_requests_total counter")
        for (listener, name), ds in sorted(self.destinations.items()):
            for i, cls in enumerate(_CLASSES):
                if ds.by_class[i]:
                    out.append(
                        f'{p}_requests_total{{listener="{listener}",destination="{name}",'
                        f'status_class="{cls}"}} {ds.by_class[i]}'
                    )
        out.append(f"# HELP {p}_request_duration_seconds Time from request head to response end.")
        out.append(f"# TYPE {p}_request_duration_seconds histogram")
        for (listener, name), ds in sorted(self.destinations.items()):
            labels = f'listener="{listener}",destination="{name}"'
            running = 0
            for bound, count in zip(LATENCY_BOUNDS, ds.buckets, strict=False):
                running += count
                le = f'le="{bound}"'
                out.append(f"{p}_request_duration_seconds_bucket{{{labels},{le}}} {running}")
            running += ds.buckets[-1]
            out.append(f'{p}_request_duration_seconds_bucket{{{labels},le="+Inf"}} {running}')
            out.append(f"{p}_request_duration_seconds_sum{{{labels}}} {ds.latency_sum:.6f}")
            out.append(f"{p}_request_duration_seconds_count{{{labels}}} {running}")
        out.append(f"# HELP {p}_local_replies_total Replies the sidecar answered itself.")
        out.append(f"# TYPE {p}_local_replies_total counter")
        for reason, count in sorted(self.local_replies.items()):
            out.append(f'{p}_local_replies_total{{reason="{reason}"}} {count}')
        out.append(f"# HELP {p}_downstream_connections_active Open client connections.")
        out.append(f"# TYPE {p}_downstream_connections_active gauge")
        for listener, n in sorted(self.downstream_active.items()):
            out.append(f'{p}_downstream_connections_active{{listener="{listener}"}} {n}')
        out.append(f"# HELP {p}_downstream_connections_total Accepted client connections.")
        out.append(f"# TYPE {p}_downstream_connections_total counter")
        for listener, n in sorted(self.downstream_total.items()):
            out.append(f'{p}_downstream_connections_total{{listener="{listener}"}} {n}')
        out.append(f"# HELP {p}_tunnels_active Open tunnels (CONNECT, Upgrade, opaque TCP).")
        out.append(f"# TYPE {p}_tunnels_active gauge")
        out.append(f"{p}_tunnels_active {self.tunnels_active}")
        out.append(f"# HELP {p}_upstream_pool_connections Upstream connections by pool and state.")
        out.append(f"# TYPE {p}_upstream_pool_connections gauge")
        for pool in self.pools():
            labels = f'pool="{pool.name}"'
            out.append(f'{p}_upstream_pool_connections{{{labels},state="idle"}} {len(pool.idle)}')
            busy = pool.size - len(pool.idle)
            out.append(f'{p}_upstream_pool_connections{{{labels},state="busy"}} {busy}')
        out.append(f"# HELP {p}_upstream_pool_pending Requests waiting for a pooled connection.")
        out.append(f"# TYPE {p}_upstream_pool_pending gauge")
        for pool in self.pools():
            out.append(f'{p}_upstream_pool_pending{{pool="{pool.name}"}} {len(pool.waiters)}')
        return "\n".join(out) + "\n"

    def __repr__(self) -> str:
        total = sum(ds.total for ds in self.destinations.values())
        return f"<ProxyStats destinations={len(self.destinations)} requests={total}>"
