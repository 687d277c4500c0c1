"""Discovery: a `ServiceDirectory` fed by the registry's blocking health queries.

`ConsulDirectory` keeps one watch per service name in use: a `consul.aio` blocking query
on `/v1/health/service/<name>` (every instance, with its checks), started the first time
the outbound path resolves the name and kept warm afterwards, so a new or removed
instance, or a change of health, reaches the balancer as soon as the registry answers
(well under a second). Consul OSS has no namespaces, so an instance's namespace is its
`Meta.namespace` (absent: "default") and one watch feeds the clusters of every namespace
asked about under that name.

Health is read as Consul's own data plane reads it (the xDS endpoints Consul generates
for Envoy, with a service-resolver's default `OnlyPassing = false`): an instance with a
critical check (maintenance mode is a critical check) is in the cluster but unhealthy,
so balancers skip it and the locality layer counts it against its zone's healthy share;
an instance whose worst check is `warning` stays healthy with weight `Weights.Warning`.
Asking `?passing` instead would hide failing instances, and a zone would always look
100% healthy to the locality layer.

Static stability: when the registry cannot be reached the clusters keep their last
known endpoints, marked "cached", and the watch retries with backoff and jitter. A name
the registry has never had an instance of (in that namespace) resolves to None, so the
outbound path answers 404 `unknown_service`; a known name without healthy instances is
a cluster with none available (503 `no_healthy_upstream`). A registry back from an
outage reports every check critical until the instances report again; for
`recovery_hold` seconds an answer that would leave a cluster which had healthy endpoints
with none is not applied.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from proxy.backoff import BackoffPolicy
from proxy.balance import Balancer, Endpoint, WeightedRoundRobin
from proxy.balance.outlier import describe as describe_outlier
from proxy.cluster import Cluster, Source
from proxy.health_check import describe as describe_check

log = logging.getLogger("tether.discovery")

DEFAULT_NAMESPACE = "default"

Key = tuple[str, str]  # (namespace, service)


def instance_namespace(meta: Mapping[str, Any] | None) -> str:
    ns = meta.get("namespace") if isinstance(meta, Mapping) else None
    return ns if isinstance(ns, str) and ns else DEFAULT_NAMESPACE


def instance_health(checks: Any) -> str:
    """An instance's aggregate status from its checks (node's and service's): the worst
    of them, as Consul aggregates; no checks at all is passing (Consul's view too)."""
    worst = "passing"
    if not isinstance(checks, list):
        return worst
    for check in checks:
        status = check.get("Status") if isinstance(check, dict) else None
        if status == "critical" or status not in ("passing", "warning"):
            return "critical"  # critical, maintenance, or anything not understood
        if status == "warning":
            worst = "warning"
    return worst


def _weight(weights: Any, key: str) -> int:
    w = weights.get(key, 1) if isinstance(weights, dict) else 1
    return max(0, w) if isinstance(w, int) and not isinstance(w, bool) else 1


def endpoints_from_health(entries: Any) -> dict[str, list[Endpoint]]:
    """Endpoints of a `/v1/health/service` answer, grouped by namespace, with health.

    A critical instance is an unhealthy endpoint; a warning one is healthy with weight
    `Weights.Warning` (Consul's DNS and xDS do the same); a weight of 0 is unhealthy.

    Malformed entries are skipped rather than failing the whole answer: one bad
    registration must not take a service's other instances out of rotation.
    """
    by_ns: dict[str, list[Endpoint]] = {}
    if not isinstance(entries, list):
        return by_ns
    seen_ids: set[str] = set()
    for entry in entries:
        if not isinstance(entry, dict):
            continue
        svc = entry.get("Service")
        node = entry.get("Node")
        if not isinstance(svc, dict):
            continue
        node = node if isinstance(node, dict) else {}
        port = svc.get("Port")
        if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
            continue
        host = svc.get("Address") or node.get("Address")
        if not isinstance(host, str) or not host:
            continue
        sid = svc.get("ID") or svc.get("Service")
        if not isinstance(sid, str) or not sid:
            continue
        # Service IDs are unique per node only; qualify a duplicate with its node.
        if sid in seen_ids:
            sid = f"{node.get('Node', '')}/{sid}"
        seen_ids.add(sid)
        raw_meta = svc.get("Meta")
        meta = {str(k): str(v) for k, v in raw_meta.items()} if isinstance(raw_meta, dict) else {}
        status = instance_health(entry.get("Checks"))
        weights = svc.get("Weights")
        weight = _weight(weights, "Warning" if status == "warning" else "Passing")
        ep = Endpoint(
            id=sid,
            host=host,
            port=port,
            weight=weight,
            zone=meta.get("zone", ""),
            meta=meta,
            # A zero weight takes the instance out of rotation too, as in Consul's xDS
            # (usually `Weights.Warning: 0`: "send nothing to a warning instance").
            healthy=status != "critical" and weight > 0,
        )
        by_ns.setdefault(instance_namespace(meta), []).append(ep)
    return by_ns


def namespaces_in_catalog(entries: Any) -> set[str]:
    """Namespaces with any instance (passing or not) in a `/v1/catalog/service` answer."""
    if not isinstance(entries, list):
        return set()
    return {instance_namespace(e.get("ServiceMeta")) for e in entries if isinstance(e, dict)}


def _health(ep: Endpoint, now: float) -> str:
    if ep.draining:
        return "draining"
    if not ep.healthy:
        # The registry's verdict, or the sidecar's own active check (proxy/health_check.py).
        return "critical" if not ep.registry_healthy else "check_failing"
    return "ejected" if now < ep.ejected_until else "passing"


def _signature(endpoints: Iterable[Endpoint]) -> tuple[Any, ...]:
    return tuple(
        (ep.id, ep.host, ep.port, ep.weight, ep.zone, ep.healthy, tuple(sorted(ep.meta.items())))
        for ep in endpoints
    )


class ServiceWatch:
    """The blocking query for one service name and what it has learnt so far."""

    def __init__(self, service: str, now: float) -> None:
        self.service = service
        self.namespaces: set[str] = set()  # asked about by the outbound path
        self.known: set[str] = set()  # namespaces the registry has had instances in
        self.instances: dict[str, list[Endpoint]] = {}  # last answer, by namespace
        self.index = 0
        self.answered = asyncio.Event()  # set after the first answer or failure
        self.reached = False  # the registry has answered this watch at least once
        self.failures = 0
        self.last_error: str | None = None
        self.last_used = now
        self.last_answer_at: float | None = None
        # After an outage, until when an answer without a healthy instance is not applied.
        self.hold_until = 0.0
        self.task: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        state = "live" if self.failures == 0 and self.reached else "cached"
        return f"<ServiceWatch {self.service} index={self.index} {state} ns={sorted(self.known)}>"


class ConsulDirectory:
    """A `ServiceDirectory` over a `consul.aio.Consul` client (the registry or Consul).

    `lookup` is a dictionary read for the hot path; `resolve` starts the watch of a new
    name and waits (up to `first_answer_timeout`) for its first answer.
    """

    def __init__(
        self,
        client: Any,
        *,
        wait: float = 30.0,
        backoff: BackoffPolicy | None = None,
        first_answer_timeout: float = 3.0,
        idle_unknown: float = 60.0,
        max_watches: int = 512,
        recovery_hold: float = 15.0,
        balancer_factory: Callable[[], Balancer] = WeightedRoundRobin,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.client = client
        self.wait = wait
        self.backoff = backoff or BackoffPolicy()
        self.first_answer_timeout = first_answer_timeout
        self.idle_unknown = idle_unknown
        self.max_watches = max_watches
        self.recovery_hold = recovery_hold
        self.balancer_factory = balancer_factory
        self.rng = rng or random.Random()
        self.clock = clock
        self.watches: dict[str, ServiceWatch] = {}
        self.clusters: dict[Key, Cluster] = {}  # every (namespace, service) asked about
        self._known: dict[Key, Cluster] = {}  # those the registry knows: the hot path's map
        self.up = False  # the registry has answered at least once
        self._probe: asyncio.Task[None] | None = None
        self._closed = False

    # -- ServiceDirectory --------------------------------------------------------------

    def lookup(self, namespace: str, service: str) -> Cluster | None:
        return self._known.get((namespace, service))

    async def resolve(self, namespace: str, service: str) -> Cluster | None:
        key = (namespace, service)
        cluster = self._known.get(key)
        if cluster is not None:
            return cluster
        if self._closed:
            return None
        watch = self.watches.get(service)
        if watch is None:
            watch = self._start_watch(service)
            if watch is None:
                log.warning("discovery: watch limit reached; %r not watched", service)
                return None
        watch.last_used = self.clock()
        if namespace not in watch.namespaces:
            if watch.reached and namespace not in watch.known:
                # An answered watch has not been asked about this namespace yet, and its
                # last answer may be up to one blocking wait old: ask the catalog now
                # rather than answer a false 404 for an instance registered meanwhile.
                # (The namespace joins the watch after the answer, so a concurrent
                # resolve asks too rather than reading "unknown" too early.)
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(self.first_answer_timeout):
                        await self._learn_namespaces(watch)
            watch.namespaces.add(namespace)
            self.clusters.setdefault(key, self._new_cluster(namespace, service))
            self._apply(watch)
        if not watch.answered.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.first_answer_timeout):
                    await watch.answered.wait()
        cluster = self._known.get(key)
        if cluster is not None:
            return cluster
        if watch.reached and watch.failures == 0:
            return None  # the registry says: no such service in this namespace
        # Registry unreachable and nothing cached: an empty cluster, so the caller gets
        # 503 no_healthy_upstream (try again) rather than a 404 that may be false.
        return self.clusters.get(key)

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        """Probe the registry in the background until it answers once (`up`)."""
        if self._probe is None and not self._closed:
            self._probe = asyncio.get_running_loop().create_task(self._probe_registry())

    async def aclose(self) -> None:
        self._closed = True
        tasks = [w.task for w in self.watches.values() if w.task is not None]
        if self._probe is not None:
            tasks.append(self._probe)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.watches.clear()

    def watch(self, namespace: str, service: str) -> None:
        """Start watching a service before the first request for it (pre-warming)."""
        w = self.watches.get(service) or self._start_watch(service)
        if w is not None:
            w.namespaces.add(namespace)
            self.clusters.setdefault((namespace, service), self._new_cluster(namespace, service))

    # -- what /clusters shows ----------------------------------------------------------

    def describe(self) -> list[dict[str, Any]]:
        out = []
        now = self.clock()
        for (ns, svc), cluster in sorted(self.clusters.items()):
            watch = self.watches.get(svc)
            out.append(
                {
                    "name": cluster.name,
                    "service": svc,
                    "namespace": ns,
                    "known": (ns, svc) in self._known,
                    "source": cluster.source,
                    "index": watch.index if watch else 0,
                    "last_error": watch.last_error if watch else None,
                    "balancer": cluster.balancer.name,
                    "endpoints": [
                        {
                            "id": ep.id,
                            "address": ep.host,
                            "port": ep.port,
                            "weight": ep.weight,
                            "zone": ep.zone,
                            "version": ep.meta.get("version", ""),
                            "health": _health(ep, now),
                            "active_requests": ep.active,
                            # Outlier detection: ejected or not, why, for how long.
                            "outlier": describe_outlier(ep, now),
                            # Active health check: its verdict, streaks, last error.
                            "health_check": describe_check(ep, now),
                        }
                        for ep in cluster.endpoints
                    ],
                }
            )
        return out

    # -- the watches -------------------------------------------------------------------

    def _new_cluster(self, namespace: str, service: str) -> Cluster:
        cluster = Cluster(service, namespace, self.balancer_factory(), clock=self.clock)
        cluster.mark_source("cached")  # nothing live until the registry answers
        return cluster

    def _start_watch(self, service: str) -> ServiceWatch | None:
        if len(self.watches) >= self.max_watches:
            self._reap(self.clock())
            if len(self.watches) >= self.max_watches:
                return None
        watch = ServiceWatch(service, self.clock())
        watch.task = asyncio.get_running_loop().create_task(
            self._run(watch), name=f"discovery:{service}"
        )
        self.watches[service] = watch
        return watch

    def _reap(self, now: float) -> None:
        """Drop watches of names never known that nobody asked about for a while."""
        for w in list(self.watches.values()):
            if not w.known and now - w.last_used > self.idle_unknown:
                self._drop(w)

    def _drop(self, watch: ServiceWatch) -> None:
        self.watches.pop(watch.service, None)
        for ns in watch.namespaces:
            self.clusters.pop((ns, watch.service), None)
            self._known.pop((ns, watch.service), None)
        if watch.task is not None and watch.task is not asyncio.current_task():
            watch.task.cancel()

    async def _run(self, watch: ServiceWatch) -> None:
        attempt = 0
        min_gap = 0.05  # Consul's advice: rate-limit blocking queries that return at once
        last_start = 0.0
        while not self._closed:
            gap = self.clock() - last_start
            if gap < min_gap:
                await asyncio.sleep(min_gap - gap)
            last_start = self.clock()
            try:
                # Consul adds up to wait/16 of jitter to a blocking query; allow for it.
                wait = self.wait
                if watch.hold_until:
                    # Holding cached endpoints after an outage: look again soon.
                    wait = min(wait, max(1.0, watch.hold_until - self.clock()))
                async with asyncio.timeout(wait * 1.1 + 10):
                    # Every instance, failing ones too: health is read from the checks,
                    # and a namespace absent from the answer has no instance at all.
                    index, entries = await self.client.health.service(
                        watch.service,
                        index=watch.index or None,
                        wait=f"{int(wait)}s",
                    )
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._failed(watch, exc)
                await asyncio.sleep(self.backoff.delay(attempt, self.rng))
                attempt += 1
                continue
            attempt = 0
            self._answered(watch, index, entries)
            if not watch.known and self.clock() - watch.last_used > self.idle_unknown:
                self._drop(watch)
                return

    async def _learn_namespaces(self, watch: ServiceWatch) -> None:
        _, entries = await self.client.catalog.service(watch.service)
        watch.known |= namespaces_in_catalog(entries)

    def _answered(self, watch: ServiceWatch, index: Any, entries: Any) -> None:
        try:
            new_index = int(index)
        except (TypeError, ValueError):
            new_index = 0
        # Consul's rules for blocking-query indexes: reset when it goes backwards, and
        # never block on 0 (that would return at once forever).
        watch.index = 0 if new_index < watch.index else max(new_index, 1)
        watch.instances = endpoints_from_health(entries)
        watch.known |= set(watch.instances)
        now = self.clock()
        if watch.failures and watch.reached:
            watch.hold_until = now + self.recovery_hold
        elif watch.hold_until and now >= watch.hold_until:
            watch.hold_until = 0.0
        watch.reached = True
        watch.failures = 0
        watch.last_error = None
        watch.last_answer_at = self.clock()
        self.up = True
        self._apply(watch)
        watch.answered.set()

    def _apply(self, watch: ServiceWatch) -> None:
        if not watch.reached:
            return
        source: Source = "live" if watch.failures == 0 else "cached"
        for ns in watch.namespaces:
            key = (ns, watch.service)
            cluster = self.clusters.get(key)
            if cluster is None or ns not in watch.known:
                continue
            endpoints = watch.instances.get(ns, [])
            if (
                watch.hold_until
                and not any(ep.healthy for ep in endpoints)
                and any(ep.healthy for ep in cluster.endpoints)
            ):
                # A registry back from an outage holds every check critical until the
                # instances report again (Consul trusts no result from before a
                # restart). Leaving the cluster without a healthy endpoint now would
                # turn a registry restart into an outage of the service: keep the
                # cached endpoints a little longer.
                cluster.mark_source("cached")
                self._known[key] = cluster
                continue
            if _signature(endpoints) != _signature(cluster.endpoints) or key not in self._known:
                cluster.set_endpoints(endpoints, source)
            else:
                cluster.mark_source(source)
            self._known[key] = cluster

    def _failed(self, watch: ServiceWatch, exc: Exception) -> None:
        watch.failures += 1
        watch.last_error = f"{type(exc).__name__}: {exc}".strip().rstrip(":")
        if watch.failures == 1:
            log.warning(
                "discovery of %r: registry unreachable (%s); serving cached endpoints",
                watch.service,
                watch.last_error,
            )
        for ns in watch.namespaces:
            cluster = self.clusters.get((ns, watch.service))
            if cluster is not None:
                cluster.mark_source("cached")
        watch.answered.set()

    async def _probe_registry(self) -> None:
        attempt = 0
        while not self.up and not self._closed:
            try:
                async with asyncio.timeout(5):
                    await self.client.status.leader()
                self.up = True
                return
            except asyncio.CancelledError:
                raise
            except Exception:
                await asyncio.sleep(self.backoff.delay(attempt, self.rng))
                attempt += 1

    def __repr__(self) -> str:
        n, k = len(self.watches), len(self._known)
        return f"<ConsulDirectory watches={n} known={k} up={self.up}>"
