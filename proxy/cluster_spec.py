"""Cluster specs: a snapshot's policy compiled once into frozen, typed settings per cluster.

`compile_specs` runs when a snapshot applies (proxy/policy.py) and resolves, for every
service with ServiceDefaults, what the hot path needs without looking at a resource
again: the load-balancer policy, the connect timeout (ServiceDefaults, else
MeshConfig, else the sidecar's own) as the endpoints' `PoolPolicy`, and the request
timeout (ServiceDefaults, else MeshConfig, else 0: the listener's). Services without
ServiceDefaults share `ClusterSpecs.default`. The whole `ClusterSpecs` is replaced in
one assignment when a snapshot applies, so a request sees one snapshot's settings.

Pools are keyed by endpoint and spec (`(host, port, spec.pool_key)`), never changed
per request: equal pool policies get the same key in every snapshot (`PoolKeys`), so
an unchanged timeout keeps its warm connections across snapshots, and a changed one
gets new pools while the old ones drain and are swept.

Retries, circuit breakers, outlier detection and active health checks are typed
fields of the same spec (ServiceDefaults', else MeshConfig's; a Route rule's own retries
and limits are compiled onto its `RouteRule`, proxy/routing.py). A circuit breaker's
`maxConnections` and `maxPendingRequests` become the endpoints' pool policy.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from proxy import balance
from proxy.balance.outlier import OutlierSpec
from proxy.circuit_breaker import CircuitBreakerSpec
from proxy.health_check import HealthCheckSpec
from proxy.hedging import HedgeSpec
from proxy.pool import PoolPolicy
from proxy.retry import DEFAULT as DEFAULT_RETRY
from proxy.retry import RetrySpec

if TYPE_CHECKING:
    # Only compile_specs reads them, when a snapshot applies (proxy/policy.py imports
    # them anyway): a sidecar without a control plane never loads them (nor RE2).
    from proxy.routing import RoutingTable
    from wire import resources as schema


@dataclass(frozen=True, slots=True)
class ClusterSpec:
    """One destination service's settings, as compiled from one snapshot."""

    namespace: str
    service: str
    # The balancer ServiceDefaults asks for; None: the sidecar's default balancer.
    load_balancer: balance.LoadBalancerPolicy | None
    pool: PoolPolicy  # each endpoint's pool (its connect_timeout is the resolved one)
    pool_key: int  # equal `pool`s, equal keys (PoolKeys)
    request_timeout: float = 0.0  # seconds; 0: the listener's
    # Retries, resource limits and ejection (ServiceDefaults', else MeshConfig's);
    # None: off. The runtime halves (budget, counters, detector) are proxy/resilience.py's.
    retry: RetrySpec | None = None
    circuit_breaker: CircuitBreakerSpec | None = None
    outlier_detection: OutlierSpec | None = None
    # Active health checks of its endpoints (proxy/health_check.py); None: off.
    health_check: HealthCheckSpec | None = None
    # Hedged requests (proxy/hedging.py); None: none.
    hedging: HedgeSpec | None = None

    @property
    def connect_timeout(self) -> float:
        return self.pool.connect_timeout


class PoolKeys:
    """Small integer keys for pool policies, equal policies equal keys (kept by the
    sidecar across snapshots: an int hashes at C speed on the hot path, a dataclass not)."""

    def __init__(self) -> None:
        self._keys: dict[PoolPolicy, int] = {}

    def key(self, policy: PoolPolicy) -> int:
        k = self._keys.get(policy)
        if k is None:
            k = self._keys[policy] = len(self._keys)
        return k

    def __repr__(self) -> str:
        return f"<PoolKeys {len(self._keys)}>"


class ClusterSpecs:
    """Every service's spec in one snapshot; `default` for the services without one."""

    __slots__ = ("by_service", "default", "version")

    def __init__(
        self,
        default: ClusterSpec,
        by_service: Mapping[tuple[str, str], ClusterSpec] | None = None,
        version: int = 0,
    ) -> None:
        self.default = default
        self.by_service = dict(by_service or {})
        self.version = version

    def get(self, namespace: str, service: str) -> ClusterSpec:
        return self.by_service.get((namespace, service), self.default)

    def load_balancers(self) -> dict[tuple[str, str], balance.LoadBalancerPolicy]:
        """The services whose ServiceDefaults name a balancer, with it."""
        return {k: s.load_balancer for k, s in self.by_service.items() if s.load_balancer}

    def __repr__(self) -> str:
        return f"<ClusterSpecs v{self.version} services={len(self.by_service)}>"


def default_specs(pool: PoolPolicy, keys: PoolKeys) -> ClusterSpecs:
    """The specs of a sidecar without policy: every service on `pool`, listener timeouts,
    the default retry policy."""
    return ClusterSpecs(ClusterSpec("", "", None, pool, keys.key(pool), retry=DEFAULT_RETRY))


def compile_specs(
    table: RoutingTable,
    mesh: schema.MeshConfigSpec | None,
    base: PoolPolicy,
    keys: PoolKeys,
) -> ClusterSpecs:
    """The specs of one snapshot. `base` is the sidecar's own pool policy (its connect
    timeout applies where neither ServiceDefaults nor MeshConfig set one). The
    resources were checked (`check_resource`) before they compile."""
    from wire import resources as schema

    mesh_connect = mesh.connect_timeout if mesh is not None else 0.0
    mesh_request = mesh.request_timeout if mesh is not None else 0.0
    mesh_retry = _retry(mesh.retries if mesh is not None else None) or DEFAULT_RETRY
    mesh_breaker = _breaker(mesh.circuit_breaker if mesh is not None else None)
    mesh_outlier = _outlier(mesh.outlier_detection if mesh is not None else None)
    mesh_check = _health_check(mesh.health_check if mesh is not None else None)
    mesh_hedge = _hedge(mesh.hedging if mesh is not None else None)

    def pool_for(
        connect: float | None, breaker: CircuitBreakerSpec | None
    ) -> tuple[PoolPolicy, int]:
        timeout = float(connect or mesh_connect or base.connect_timeout)
        pool = (
            base
            if timeout == base.connect_timeout
            else dataclasses.replace(base, connect_timeout=timeout)
        )
        if breaker is not None:
            # maxConnections and maxPendingRequests bound each endpoint's pool.
            pool = dataclasses.replace(
                pool,
                max_connections=breaker.max_connections,
                max_pending=breaker.max_pending_requests,
            )
        return pool, keys.key(pool)

    pool, key = pool_for(None, mesh_breaker)
    default = ClusterSpec(
        "",
        "",
        None,
        pool,
        key,
        request_timeout=float(mesh_request or 0.0),
        retry=mesh_retry,
        circuit_breaker=mesh_breaker,
        outlier_detection=mesh_outlier,
        health_check=mesh_check,
        hedging=mesh_hedge,
    )
    specs: dict[tuple[str, str], ClusterSpec] = {}
    for (ns, svc), pol in table.services.items():
        d = pol.defaults
        if not isinstance(d, schema.ServiceDefaultsSpec):
            continue
        # Validated with the resource (check_resource) before the snapshot compiles.
        lbp = d.load_balancer
        breaker = _breaker(d.circuit_breaker) or mesh_breaker
        pool, key = pool_for(d.connect_timeout, breaker)
        specs[(ns, svc)] = ClusterSpec(
            ns,
            svc,
            lbp,
            pool,
            key,
            request_timeout=float(d.request_timeout or mesh_request or 0.0),
            retry=_retry(d.retries) or mesh_retry,
            circuit_breaker=breaker,
            outlier_detection=_outlier(d.outlier_detection) or mesh_outlier,
            health_check=_health_check(d.health_check) or mesh_check,
            hedging=_hedge(d.hedging) or mesh_hedge,
        )
    return ClusterSpecs(default, specs, table.version)


def _retry(p: schema.RetryPolicy | None) -> RetrySpec | None:
    return RetrySpec.of(p) if p is not None else None


def _breaker(p: schema.CircuitBreakerPolicy | None) -> CircuitBreakerSpec | None:
    return CircuitBreakerSpec.of(p) if p is not None else None


def _outlier(p: schema.OutlierDetectionPolicy | None) -> OutlierSpec | None:
    return OutlierSpec.of(p) if p is not None else None


def _health_check(p: schema.HealthCheckPolicy | None) -> HealthCheckSpec | None:
    return HealthCheckSpec.of(p) if p is not None else None


def _hedge(p: schema.HedgingPolicy | None) -> HedgeSpec | None:
    return HedgeSpec.of(p) if p is not None else None
