"""Data-plane counters and histograms, kept as plain ints and lists, rendered as Prometheus.

The hot path touches only `DestinationStats.record` (two list increments, a bisect and
a float add) and the connection gauges; rendering happens in the admin listener, and
`ProxyStats.report` turns what changed since the last report into the push protocol's
`stats` message (docs/push-protocol.md). Every label value is bounded: destinations are
mesh services (and their policy's subsets), `egress` for every egress host together,
or `app`; pools are labelled by destination, never by address. docs/metrics.md lists
every metric.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any, Final

from wire import push as protocol

# Upper bounds (seconds) of the latency histogram's buckets; the last bucket is +Inf.
# The push protocol's (stats reports add up across sidecars only with the same buckets).
LATENCY_BOUNDS = protocol.LATENCY_BOUNDS
# The same bounds as the compiled module's own constant (read without a global lookup).
_BOUNDS: Final[tuple[float, ...]] = tuple(LATENCY_BOUNDS)
_NBOUNDS: Final = len(_BOUNDS)
_CLASSES = ("none", "1xx", "2xx", "3xx", "4xx", "5xx")
# Inbound `source` label values: at most MAX_SOURCES distinct callers get their own; the
# callers after them count under OTHER_SOURCE. A plaintext caller (no identity): UNKNOWN.
MAX_SOURCES = 64
OTHER_SOURCE = "other"
UNKNOWN_SOURCE = "unknown"


class DestinationStats:
    """Requests to one destination (a cluster `svc.ns` or `svc.ns/subset`, all egress, or
    the local app)."""

    __slots__ = (
        "attempts",
        "buckets",
        "by_class",
        "latency_sum",
        "name",
        "reasons",
        "retries",
        "retries_refused",
        "route",
        "source",
    )

    def __init__(self, name: str, route: str = "", source: str = "") -> None:
        self.name = name
        # The caller (`svc.ns`) on the inbound listener, from its verified mTLS identity
        # (a bounded label: `ProxyStats.source_label`); "" on the outbound listener,
        # whose source is the sidecar's own service.
        self.source = source
        # The Route rule that sent the requests here (`<route>#<rule index>`), "" when
        # no rule matched (or the destination has no Route): a bounded label value.
        self.route = route
        # Index status // 100; index 0 counts requests that ended without a status.
        self.by_class = [0, 0, 0, 0, 0, 0]
        self.buckets = [0] * (len(LATENCY_BOUNDS) + 1)
        self.latency_sum = 0.0
        # Local replies (the sidecar answered itself) by reason; reasons are a fixed set.
        self.reasons: dict[str, int] = {}
        # Upstream attempts (first ones and retries), retries made, and retries a policy
        # would have made but did not, by why not (proxy/retry.py's fixed reasons).
        self.attempts = 0
        self.retries = 0
        self.retries_refused: dict[str, int] = {}

    def record(self, status: int, latency: float) -> None:
        by_class = self.by_class
        i = status // 100 if 0 < status < 600 else 0
        by_class[i] = by_class[i] + 1
        # bisect_left(LATENCY_BOUNDS, latency), as compiled code (no call into bisect).
        lo = 0
        hi = _NBOUNDS
        while lo < hi:
            mid = (lo + hi) >> 1
            if _BOUNDS[mid] < latency:
                lo = mid + 1
            else:
                hi = mid
        buckets = self.buckets
        buckets[lo] = buckets[lo] + 1
        self.latency_sum += latency

    @property
    def total(self) -> int:
        return sum(self.by_class)

    def __repr__(self) -> str:
        return f"<DestinationStats {self.name} total={self.total} 5xx={self.by_class[5]}>"


def split_destination(name: str) -> tuple[str, str]:
    """`orders.default/v2` -> ("orders.default", "v2"); a name without subset -> (name, "")."""
    service, _, subset = name.partition("/")
    return service, subset


class ProxyStats:
    """All counters of one sidecar's listeners (shared by outbound and inbound)."""

    def __init__(self, source: str = "", started: float | None = None) -> None:
        # The service this sidecar fronts (`svc.ns`): the source of its outbound requests.
        self.source = source
        # By (listener, destination, route, source); source "" on the outbound listener.
        self.destinations: dict[tuple[str, str, str, str], DestinationStats] = {}
        # Inbound callers given a label of their own (`svc.ns` -> itself), and requests
        # counted under OTHER_SOURCE because MAX_SOURCES callers already had one.
        self.sources: dict[str, str] = {}
        self.sources_overflowed = 0
        self.local_replies: dict[str, int] = {}
        # Local replies before any destination was known (bad requests, unknown names).
        self.unrouted = DestinationStats("none")
        # Per listener name: open downstream connections and all ever accepted.
        self.downstream_active: dict[str, int] = {}
        self.downstream_total: dict[str, int] = {}
        self.tunnels_active = 0
        self.tunnels_total = 0
        # Callables returning the live pools (set by the listeners that own them).
        self.pool_sources: list[Callable[[], Iterable[Any]]] = []
        # Callables returning the lines of outlier and circuit-breaker metrics.
        self.resilience_sources: list[Callable[[], list[str]]] = []
        # What the last `report` covered: per destination key, its counts then.
        self._reported: dict[tuple[str, str, str, str], tuple[tuple[int, ...], float]] = {}
        # The sidecar's mesh certificate's expiry (Unix time) for the reports, when it
        # runs mTLS (set by the sidecar: proxy/tls_stats.py's `expiry`).
        self.cert_expiry: Callable[[], float | None] | None = None
        # When the last report ended (monotonic): the first covers the time since start.
        self._reported_at = time.monotonic() if started is None else started

    def destination(
        self, listener: str, name: str, route: str = "", source: str = ""
    ) -> DestinationStats:
        key = (listener, name, route, source)
        ds = self.destinations.get(key)
        if ds is None:
            ds = self.destinations[key] = DestinationStats(name, route, source)
        return ds

    def source_label(self, source: str) -> str:
        """The inbound `source` key of a caller (`svc.ns` from its verified identity):
        itself for the first MAX_SOURCES callers, OTHER_SOURCE after them (each such
        lookup counted); "" for a caller without an identity (rendered UNKNOWN_SOURCE)."""
        if not source:
            return ""
        label = self.sources.get(source)
        if label is not None:
            return label
        if len(self.sources) >= MAX_SOURCES:
            self.sources_overflowed += 1
            return OTHER_SOURCE
        self.sources[source] = source
        return source

    def local_reply(self, reason: str, dstats: DestinationStats | None = None) -> None:
        self.local_replies[reason] = self.local_replies.get(reason, 0) + 1
        reasons = (dstats or self.unrouted).reasons
        reasons[reason] = reasons.get(reason, 0) + 1

    def pools(self) -> list[Any]:
        return [pool for source in self.pool_sources for pool in source()]

    # -- reports to the control plane ---------------------------------------------------

    def report(self, now: float) -> protocol.Stats:
        """What every destination handled since the previous call (since the start, the
        first time). `now` is a monotonic clock reading; the busiest MAX_STATS_ROWS
        destinations are reported when there are more."""
        since, self._reported_at = self._reported_at, now
        rows: list[tuple[int, protocol.StatsRow]] = []
        # The push protocol has no route: a destination's routes are summed.
        merged: dict[tuple[str, str], tuple[tuple[int, ...], float]] = {}
        for key, ds in self.destinations.items():
            counts = (*ds.by_class, *ds.buckets)
            before = self._reported.get(key)
            self._reported[key] = (counts, ds.latency_sum)
            if before is None:
                before = ((0,) * len(counts), 0.0)
            delta = tuple(a - b for a, b in zip(counts, before[0], strict=True))
            dsum = max(ds.latency_sum - before[1], 0.0)
            other = merged.get(key[:2])
            if other is not None:
                delta = tuple(a + b for a, b in zip(delta, other[0], strict=True))
                dsum += other[1]
            merged[key[:2]] = (delta, dsum)
        for (listener, name), (delta, dsum) in merged.items():
            n = sum(delta[: len(protocol.STATUS_CLASSES)])
            if not n:
                continue
            service, subset = split_destination(name)
            row = protocol.StatsRow(
                listener=listener,
                destination=service,
                subset=subset,
                classes=delta[: len(protocol.STATUS_CLASSES)],
                buckets=delta[len(protocol.STATUS_CLASSES) :],
                latency_sum=dsum,
            )
            rows.append((n, row))
        rows.sort(key=lambda r: -r[0])
        expiry = self.cert_expiry
        return protocol.Stats(
            seconds=max(now - since, 0.001),
            rows=tuple(row for _, row in rows[: protocol.MAX_STATS_ROWS]),
            cert_expiry=expiry() if expiry is not None else None,
        )

    # -- Prometheus ---------------------------------------------------------------------

    def _labels(self, listener: str, name: str, route: str, source: str = "") -> str:
        service, subset = split_destination(name)
        # Outbound: this sidecar's service; inbound: the caller's verified identity
        # (`source_label`), `unknown` without one.
        if listener == "outbound":
            source = self.source
        elif not source:
            source = UNKNOWN_SOURCE
        labels = (
            f'source="{source}",listener="{listener}",destination="{service}",subset="{subset}"'
        )
        # An empty label is the same as none to Prometheus: written only when set.
        return f'{labels},route="{route}"' if route else labels

    def render_prometheus(self, prefix: str = "tether") -> str:
        """Prometheus text exposition format (version 0.0.4)."""
        out: list[str] = []
        p = prefix
        dests = sorted(self.destinations.items())
        out.append(
            f"# HELP {p}_requests_total Requests by source, destination, subset, status class."
        )
        out.append(f"# TYPE {p}_requests_total counter")
        for (listener, name, route, source), ds in dests:
            labels = self._labels(listener, name, route, source)
            for i, cls in enumerate(_CLASSES):
                if ds.by_class[i]:
                    out.append(
                        f'{p}_requests_total{{{labels},status_class="{cls}"}} {ds.by_class[i]}'
                    )
        out.append(f"# HELP {p}_request_duration_seconds Time from request head to response end.")
        out.append(f"# TYPE {p}_request_duration_seconds histogram")
        for (listener, name, route, source), ds in dests:
            labels = self._labels(listener, name, route, source)
            running = 0
            for bound, count in zip(LATENCY_BOUNDS, ds.buckets, strict=False):
                running += count
                le = f'le="{bound}"'
                out.append(f"{p}_request_duration_seconds_bucket{{{labels},{le}}} {running}")
            running += ds.buckets[-1]
            out.append(f'{p}_request_duration_seconds_bucket{{{labels},le="+Inf"}} {running}')
            out.append(f"{p}_request_duration_seconds_sum{{{labels}}} {ds.latency_sum:.6f}")
            out.append(f"{p}_request_duration_seconds_count{{{labels}}} {running}")
        out.append(
            f"# HELP {p}_local_replies_total Replies the sidecar answered itself, by reason."
        )
        out.append(f"# TYPE {p}_local_replies_total counter")
        unrouted = [(("none", "none", "", ""), self.unrouted)] if self.unrouted.reasons else []
        reasons: dict[tuple[str, str, str], int] = {}
        for (listener, name, _, _), ds in [*dests, *unrouted]:
            for reason, count in ds.reasons.items():
                key = (listener, name, reason)
                reasons[key] = reasons.get(key, 0) + count
        for (listener, name, reason), count in sorted(reasons.items()):
            service, subset = split_destination(name)
            out.append(
                f'{p}_local_replies_total{{listener="{listener}",destination="{service}",'
                f'subset="{subset}",reason="{reason}"}} {count}'
            )
        self._render_resilience(out, dests)
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
        out.append(
            f"# HELP {p}_inbound_source_overflow_total Inbound requests labelled"
            f' source="{OTHER_SOURCE}": {MAX_SOURCES} callers already had a label.'
        )
        out.append(f"# TYPE {p}_inbound_source_overflow_total counter")
        out.append(f"{p}_inbound_source_overflow_total {self.sources_overflowed}")
        # Pools are per endpoint (an address): summed per destination, so no address
        # becomes a label value. A pool's name is "<destination>/<host>:<port>".
        idle: dict[str, int] = {}
        busy: dict[str, int] = {}
        pending: dict[str, int] = {}
        for pool in self.pools():
            dest = split_destination(pool.name)[0]
            idle[dest] = idle.get(dest, 0) + len(pool.idle)
            busy[dest] = busy.get(dest, 0) + pool.size - len(pool.idle)
            pending[dest] = pending.get(dest, 0) + len(pool.waiters)
        out.append(
            f"# HELP {p}_upstream_pool_connections Upstream connections by destination and state."
        )
        out.append(f"# TYPE {p}_upstream_pool_connections gauge")
        for dest in sorted(idle):
            out.append(f'{p}_upstream_pool_connections{{destination="{dest}",state="idle"}} '
                       f"{idle[dest]}")  # fmt: skip
            out.append(f'{p}_upstream_pool_connections{{destination="{dest}",state="busy"}} '
                       f"{busy[dest]}")  # fmt: skip
        out.append(f"# HELP {p}_upstream_pool_pending Requests waiting for a pooled connection.")
        out.append(f"# TYPE {p}_upstream_pool_pending gauge")
        for dest in sorted(pending):
            out.append(f'{p}_upstream_pool_pending{{destination="{dest}"}} {pending[dest]}')
        return "\n".join(out) + "\n"

    def _render_resilience(
        self, out: list[str], dests: list[tuple[tuple[str, str, str, str], DestinationStats]]
    ) -> None:
        p = "tether"
        # Per destination: a Route rule's requests (their own `route` entry) add in.
        attempts: dict[tuple[str, str, str], int] = {}
        made: dict[tuple[str, str, str], int] = {}
        refused: dict[tuple[str, str, str, str], int] = {}
        for (listener, name, _, source), ds in dests:
            key = (listener, name, source)
            attempts[key] = attempts.get(key, 0) + ds.attempts
            made[key] = made.get(key, 0) + ds.retries
            for reason, n in ds.retries_refused.items():
                rkey = (listener, name, source, reason)
                refused[rkey] = refused.get(rkey, 0) + n
        out.append(f"# HELP {p}_upstream_attempts_total Upstream attempts, retries included.")
        out.append(f"# TYPE {p}_upstream_attempts_total counter")
        for (listener, name, source), n in sorted(attempts.items()):
            if n:
                labels = self._labels(listener, name, "", source)
                out.append(f"{p}_upstream_attempts_total{{{labels}}} {n}")
        out.append(f"# HELP {p}_retries_total Retries made.")
        out.append(f"# TYPE {p}_retries_total counter")
        for (listener, name, source), n in sorted(made.items()):
            if n:
                labels = self._labels(listener, name, "", source)
                out.append(f"{p}_retries_total{{{labels}}} {n}")
        out.append(f"# HELP {p}_retries_refused_total Retries the policy allowed but not made.")
        out.append(f"# TYPE {p}_retries_refused_total counter")
        for (listener, name, source, reason), n in sorted(refused.items()):
            labels = self._labels(listener, name, "", source)
            out.append(f'{p}_retries_refused_total{{{labels},reason="{reason}"}} {n}')
        for lines in self.resilience_sources:
            out.extend(lines())

    def __repr__(self) -> str:
        total = sum(ds.total for ds in self.destinations.values())
        return f"<ProxyStats destinations={len(self.destinations)} requests={total}>"


def render_config_metrics(
    version: int, connected: bool, acks: int, nacks: int, last: str, prefix: str = "tether"
) -> str:
    """The config the sidecar runs and how its last push went (`last`: ack, nack or none)."""
    p = prefix
    out = [
        f"# HELP {p}_config_version Version of the policy snapshot the sidecar runs (0: defaults).",
        f"# TYPE {p}_config_version gauge",
        f"{p}_config_version {version}",
        f"# HELP {p}_controlplane_connected Whether the push connection is up (1) or not (0).",
        f"# TYPE {p}_controlplane_connected gauge",
        f"{p}_controlplane_connected {int(connected)}",
        f"# HELP {p}_config_pushes_total Snapshots received, by the answer the sidecar gave.",
        f"# TYPE {p}_config_pushes_total counter",
        f'{p}_config_pushes_total{{result="ack"}} {acks}',
        f'{p}_config_pushes_total{{result="nack"}} {nacks}',
        f"# HELP {p}_config_last_push Result of the last snapshot (1 on the current result).",
        f"# TYPE {p}_config_last_push gauge",
    ]
    for result in ("ack", "nack", "none"):
        out.append(f'{p}_config_last_push{{result="{result}"}} {int(result == last)}')
    return "\n".join(out) + "\n"
