"""Clusters: the concrete targets a sidecar sends to, and the directory that finds them.

A `Cluster` is one service in one namespace (Envoy's cluster, Linkerd's concrete
target): its endpoints, the balancer over them and where that membership came from.
Discovery (proxy/discovery.py) feeds clusters with `set_endpoints`; the outbound path
asks a `ServiceDirectory` for the cluster of a logical name.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Literal, Protocol

from proxy.balance import Balancer, Endpoint, WeightedRoundRobin

Source = Literal["live", "cached", "static"]


class Cluster:
    def __init__(
        self,
        service: str,
        namespace: str,
        balancer: Balancer | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.service = service
        self.namespace = namespace
        self.name = f"{service}.{namespace}"
        self.balancer: Balancer = balancer or WeightedRoundRobin()
        self.endpoints: tuple[Endpoint, ...] = ()
        self.source: Source = "static"
        # Bumped on every membership change, so holders of derived state can refresh.
        self.generation = 0
        # The balancers' clock (what the proxy passes as `now`): slow start's origin.
        self.clock = clock

    def set_endpoints(self, endpoints: Sequence[Endpoint], source: Source = "live") -> None:
        """Replace the membership; an endpoint whose `id` survives keeps its state.

        After the first membership, an endpoint that joins, or comes back to health, is
        stamped `added_at = now`, so a configured slow-start window ramps it (Envoy ramps
        new hosts and hosts that turned healthy again). The first membership is not
        stamped: a sidecar starting up has no reason to spare its upstreams.
        """
        old = {ep.id: ep for ep in self.endpoints}
        stamp = self.generation > 0
        now = self.clock() if stamp else 0.0
        merged: list[Endpoint] = []
        for ep in endpoints:
            prev = old.get(ep.id)
            if prev is not None:
                # `ep.healthy` is the registry's word, unless `ep` is an endpoint an
                # active check already judged (a subset's, shared with its parent).
                registry = ep.registry_healthy if ep.check is not None else ep.healthy
                check = prev.check
                healthy = registry and (check is None or check.healthy)
                if stamp and healthy and not prev.healthy:
                    prev.added_at = now
                prev.host, prev.port = ep.host, ep.port
                prev.weight, prev.zone, prev.meta = ep.weight, ep.zone, ep.meta
                prev.registry_healthy, prev.healthy = registry, healthy
                prev.draining = ep.draining
                merged.append(prev)
            else:
                if ep.check is None:
                    ep.registry_healthy = ep.healthy
                # A subset cluster shares its parent's endpoints: one stamp is enough.
                if stamp and ep.added_at <= 0:
                    ep.added_at = now
                merged.append(ep)
        self.endpoints = tuple(merged)
        self.source = source
        self.generation += 1
        self.balancer.update(self.endpoints)

    def mark_source(self, source: Source) -> None:
        self.source = source

    def __repr__(self) -> str:
        return f"<Cluster {self.name} endpoints={len(self.endpoints)} source={self.source}>"


class ServiceDirectory(Protocol):
    """Finds the cluster for a logical service name.

    `lookup` answers from what is already known, without waiting (the hot path);
    `resolve` may wait for discovery's first answer about a service seen for the first
    time. Both return None for a service the registry does not know.
    """

    def lookup(self, namespace: str, service: str) -> Cluster | None: ...

    async def resolve(self, namespace: str, service: str) -> Cluster | None: ...


class StaticDirectory:
    """A fixed set of clusters (tests, benchmarks, and static configuration)."""

    def __init__(self, clusters: Sequence[Cluster] = ()) -> None:
        self.clusters = {(c.namespace, c.service): c for c in clusters}

    def add(self, cluster: Cluster) -> None:
        self.clusters[(cluster.namespace, cluster.service)] = cluster

    def lookup(self, namespace: str, service: str) -> Cluster | None:
        return self.clusters.get((namespace, service))

    async def resolve(self, namespace: str, service: str) -> Cluster | None:
        return self.lookup(namespace, service)
