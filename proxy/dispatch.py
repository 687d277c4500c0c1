"""Dispatch: from a request head to the pool that carries it (outbound and inbound routers).

Outbound, the levels are Linkerd's: the *logical* target is the name the app dialled
(absolute-form URI or `Host`, see proxy/target.py); the *concrete* target is the
cluster the directory returns for it; the *endpoint* is what the cluster's balancer
picks, and each endpoint address has its own keep-alive pool. Egress hosts get a pool
per host:port. The first request to a service the directory has not seen waits for
discovery (`ServiceDirectory.resolve`, one Task then); every later one is answered
synchronously from `lookup`.

Inbound, every request goes to the local app's pool.
"""

from __future__ import annotations

import asyncio
import ssl as ssl_module
import time
from typing import TYPE_CHECKING, Any, Literal

from proxy import local_reply
from proxy.balance import Balancer, Endpoint, PickContext
from proxy.balance.outlier import EJECTED, start_trial
from proxy.cluster import Cluster, ServiceDirectory
from proxy.cluster_spec import ClusterSpec, ClusterSpecs, PoolKeys, default_specs
from proxy.downstream import RNG
from proxy.egress import EgressGuard
from proxy.errors import BadMessageError
from proxy.head_cache import HeadCache
from proxy.heads import RequestHead
from proxy.health_check import HealthChecks
from proxy.hedging import render_metrics as render_hedging
from proxy.pool import Pool, PoolPolicy
from proxy.resilience import Resilience, ResilienceState
from proxy.route_result import Peer, RouteResult
from proxy.stats import OTHER_SOURCE, DestinationStats, ProxyStats
from proxy.target import Authority, parse_authority, split_absolute_form

if TYPE_CHECKING:
    from proxy.authz import InboundAuthz  # the schema loads only with a control plane
    from proxy.inbound_limits import InboundLimits
    from proxy.tls import MeshTLS, UpstreamTLS

_NO_HASH = PickContext()
# Picks a retry makes to find an endpoint the request has not tried.
_RETRY_PICKS = 3
# How long a two-label name the directory did not know stays classified as egress.
NOT_MESH_TTL = 5.0
_MAX_CACHED_AUTHORITIES = 4096
_LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})


class _PeerPick:
    """What a hashing balancer may read of a peer's requests: their fields (by
    case-insensitive name; repeated fields joined, cookies with "; "), the peer's
    address, the path.

    One per connection (kept in `Peer.routing`), made at its first hashed request: the
    source address is the peer's, `header` reads the request being routed (set for the
    pick only), and `path` is set per request."""

    __slots__ = ("ctx", "head")

    def __init__(self, peer: Peer) -> None:
        self.head: RequestHead | None = None
        self.ctx = PickContext(source_ip=peer.address.decode("latin-1"), header=self.header)

    def header(self, name: str) -> str | None:
        # Read lazily: a source-address hash must not make a cached head parse its fields.
        head = self.head
        if head is None:
            return None
        key = name.lower().encode("latin-1")
        values = [v for n, v in head.headers if n.lower() == key]
        if not values:
            return None
        return (b"; " if key == b"cookie" else b", ").join(values).decode("latin-1")


def _absolute_to_origin(head: RequestHead) -> tuple[bytes | None, bytes | None]:
    """(the authority a request names, its origin-form path or None when it had one):
    absolute-form is rewritten, Host replaced by the URI's authority."""
    target = head.target
    if target == b"*":
        return head.host, None
    split = split_absolute_form(target)
    if split is None:
        return head.host, None
    authority, path = split
    # RFC 9112 3.2.2: the URI's authority wins, and Host is replaced by it.
    head.set_host(authority)
    return authority, path


class OutboundRouter:
    """Routes the app's calls: mesh services by name, other hosts as egress."""

    name = "outbound"

    def __init__(
        self,
        directory: ServiceDirectory,
        stats: ProxyStats,
        *,
        namespace: str = "default",
        egress: Literal["allow", "deny"] = "allow",
        pool_policy: PoolPolicy | None = None,
        upstream_ssl: ssl_module.SSLContext | None = None,
        resolve_timeout: float = 5.0,
        egress_guard: EgressGuard | None = None,
        head_cache: HeadCache | None = None,
        mesh_tls: MeshTLS | None = None,
    ) -> None:
        self.directory = directory
        # The sidecar's identity when attached to a control plane: mesh endpoints are
        # dialled with mTLS and must prove they are the destination (proxy/tls.py).
        self.mesh_tls = mesh_tls
        # Heads llhttp already parsed, for this listener's requests and its pools'
        # responses (proxy/head_cache.py).
        self.head_cache = head_cache if head_cache is not None else HeadCache()
        # What egress may not reach (proxy/egress.py); checked on every egress connection.
        self.egress_guard = egress_guard if egress_guard is not None else EgressGuard()
        self.stats = stats
        self.namespace = namespace
        self.egress = egress
        self.pool_policy = pool_policy or PoolPolicy()
        self.upstream_ssl = upstream_ssl
        self.resolve_timeout = resolve_timeout
        self.listen_port = 0  # set by the listener, to refuse requests to itself
        self._authorities: dict[bytes, Authority] = {}
        # Endpoint pools by (host, port, the spec's pool key): never changed per request.
        self._pools: dict[tuple[str, int, int], Pool] = {}
        self._results: dict[tuple[str, int, int], RouteResult] = {}
        self._pool_keys = PoolKeys()
        # Without a control plane every cluster has the sidecar's own settings.
        self.specs: ClusterSpecs = default_specs(self.pool_policy, self._pool_keys)
        self._egress_pools: dict[tuple[str, int], Pool] = {}
        self._not_mesh: dict[tuple[str, str], float] = {}
        self._dstats: dict[str, DestinationStats] = {}
        self._egress_stats = stats.destination(self.name, "egress")
        self._tasks: set[asyncio.Task[None]] = set()
        # Retry budgets, breakers and outlier detectors, kept across snapshots; each
        # (cluster, spec) pair's Resilience, made when the pair is first seen.
        self.resilience = ResilienceState()
        self._resilience: dict[tuple[str, str], tuple[Cluster, ClusterSpec, Resilience | None]] = {}
        stats.resilience_sources.append(self._resilience_metrics)
        # Active health checks of the destinations requests go to (proxy/health_check.py).
        self.health_checks = HealthChecks(directory, self._mesh_tls_of, upstream_ssl)
        stats.resilience_sources.append(self.health_checks.metrics)
        stats.resilience_sources.append(self._hedging_metrics)

    def _authority(self, raw: bytes, default_port: int = 80) -> Authority:
        auth = self._authorities.get(raw)
        if auth is None:
            auth = parse_authority(raw, default_port)
            if len(self._authorities) >= _MAX_CACHED_AUTHORITIES:
                self._authorities.clear()
            self._authorities[raw] = auth
        return auth

    def route(self, head: RequestHead, peer: Peer) -> RouteResult:
        path = None
        try:
            # Origin-form (the app named the service in Host) is the common case.
            if head.target[0] == 47:
                raw = head.host
            else:
                raw, path = _absolute_to_origin(head)
            if raw is None:
                raise BadMessageError("the request names no host (no Host, no absolute URI)")
            auth = self._authorities.get(raw) or self._authority(raw)
        except BadMessageError as e:
            return RouteResult.answer(e.reason, e.message, status=e.status)
        service = auth.service
        if service is not None:
            ns = auth.namespace or self.namespace
            cluster = self.directory.lookup(ns, service)
            if cluster is not None:
                return self._to_cluster(head, peer, path, cluster)
            if auth.namespace is None:
                return RouteResult(pending=self._resolve(head, peer, path, ns, service, None))
            expiry = self._not_mesh.get((ns, service))
            if expiry is None or expiry < time.monotonic():
                return RouteResult(pending=self._resolve(head, peer, path, ns, service, auth))
        return self._egress(auth, path)

    def _to_cluster(
        self, head: RequestHead, peer: Peer, path: bytes | None, cluster: Cluster
    ) -> RouteResult:
        """The logical target's cluster is the concrete one (the policy router inserts
        route rules and splits here)."""
        return self._concrete(head, peer, path, cluster, self.specs.default)

    def _concrete(
        self,
        head: RequestHead,
        peer: Peer,
        path: bytes | None,
        cluster: Cluster,
        spec: ClusterSpec,
        tried: list[Endpoint] | None = None,
    ) -> RouteResult:
        """The balancer's pick in `cluster` and its pool under `spec`; for a retry
        (`tried`), an endpoint not tried yet where the balancer offers one in a few
        picks (Envoy's previous-hosts retry predicate)."""
        name = cluster.name
        dstats = self._dstats.get(name)
        if dstats is None:
            dstats = self._dstats[name] = self.stats.destination(self.name, name)
        balancer = cluster.balancer
        now = time.monotonic()
        # Only the hashing balancers read the request; the others share one empty context.
        if balancer.uses_context:
            pick = peer.routing
            if pick is None:
                pick = peer.routing = _PeerPick(peer)
            pick.head = head
            ctx = pick.ctx
            ctx.path = (path or head.target).decode("latin-1")
            ep = _pick_again(balancer, ctx, now, tried) if tried else balancer.pick(ctx, now, RNG)
            pick.head = None
        elif tried:
            ep = _pick_again(balancer, _NO_HASH, now, tried)
        else:
            ep = balancer.pick(_NO_HASH, now, RNG)
        if ep is None:
            return RouteResult.answer(
                local_reply.NO_HEALTHY_UPSTREAM,
                f"service {name} has no healthy endpoint",
                dstats=dstats,
            )
        h = ep.outlier
        if h is not None and h.state == EJECTED:
            # Back from ejection: this request is its one trial (balance/outlier.py).
            start_trial(ep, now)
        tracker = balancer.tracker  # a layer may delegate on_start/on_end
        key = (ep.host, ep.port, spec.pool_key)
        if path is None:
            # One result per endpoint pool, shared by its requests while it still says
            # the same (the balancer or the spec may have changed since it was made).
            result = self._results.get(key)
            if (
                result is not None
                and result.endpoint is ep
                and result.tracker is tracker
                and result.dstats is dstats
                and result.spec is spec
                and (result.resilience is None or result.resilience.cluster is cluster)
            ):
                return result
        pool = self._pools.get(key)
        if pool is None:
            pool = self._endpoint_pool(cluster, ep, spec)
        # The exchange tells the tracker of the start at once, and of the end once.
        result = RouteResult(
            pool,
            dstats=dstats,
            endpoint=ep,
            tracker=tracker,
            path=path,
            request_timeout=spec.request_timeout,
            spec=spec,
            resilience=self._resilience_of(cluster, spec),
        )
        if path is None:
            self._results[key] = result
        return result

    def _resilience_of(self, cluster: Cluster, spec: ClusterSpec) -> Resilience | None:
        """The Resilience of requests to `cluster` under `spec` (one per pair)."""
        key = (cluster.namespace, cluster.name)
        got = self._resilience.get(key)
        if got is not None and got[0] is cluster and got[1] is spec:
            return got[2]
        res = self.resilience.make(
            (cluster.namespace, cluster.service),
            cluster,
            spec.retry,
            spec.circuit_breaker,
            spec.outlier_detection,
            spec.hedging,
        )
        self._resilience[key] = (cluster, spec, res)
        self.health_checks.watch(cluster.namespace, cluster.service, spec.health_check)
        return res

    def retry_route(
        self, head: RequestHead, peer: Peer, previous: RouteResult, tried: list[Endpoint]
    ) -> RouteResult:
        res = previous.resilience
        spec = previous.spec
        if res is None or res.cluster is None or spec is None:
            return previous
        nxt = self._concrete(head, peer, previous.path, res.cluster, spec, tried)
        if nxt.pool is None or nxt.endpoint is previous.endpoint:
            return previous
        # The first attempt's route, on the new endpoint (a rule's edits and limits kept).
        return previous.replace(pool=nxt.pool, endpoint=nxt.endpoint, tracker=nxt.tracker)

    def _endpoint_pool(self, cluster: Cluster, ep: Endpoint, spec: ClusterSpec) -> Pool:
        key = (ep.host, ep.port, spec.pool_key)
        pool = self._pools.get(key)
        if pool is None:
            pool = self._pools[key] = Pool(
                ep.host,
                ep.port,
                spec.pool,
                ssl=self.upstream_ssl,
                name=f"{cluster.name}/{ep.host}:{ep.port}",
                head_cache=self.head_cache,
                tls=self._upstream_tls(cluster),
            )
        return pool

    def _resilience_metrics(self) -> list[str]:
        """Outlier ejections and circuit-breaker overflows (label sets bounded: services,
        and the fixed reasons)."""
        from proxy.balance.outlier import HEALTHY

        out = [
            "# HELP tether_outlier_ejected Endpoints out of rotation now, by destination.",
            "# TYPE tether_outlier_ejected gauge",
        ]
        totals: list[str] = []
        for (ns, svc), det in sorted(self.resilience.detectors().items()):
            cluster = self.directory.lookup(ns, svc)
            eps = cluster.endpoints if cluster is not None else ()
            n = sum(1 for e in eps if e.outlier is not None and e.outlier.state != HEALTHY)
            dest = f"{svc}.{ns}"
            out.append(f'tether_outlier_ejected{{destination="{dest}"}} {n}')
            for reason, count in sorted(det.ejections_total.items()):
                if count:
                    totals.append(
                        f'tether_outlier_ejections_total{{destination="{dest}",'
                        f'reason="{reason}"}} {count}'
                    )
        out.append("# HELP tether_outlier_ejections_total Ejections, by destination and reason.")
        out.append("# TYPE tether_outlier_ejections_total counter")
        out.extend(totals)
        out.append(
            "# HELP tether_circuit_breaker_overflows_total Requests and retries refused by a "
            "circuit breaker."
        )
        out.append("# TYPE tether_circuit_breaker_overflows_total counter")
        for b in sorted(self.resilience.breakers.all(), key=lambda b: b.name):
            ns, svc, *rule = b.key
            labels = f'destination="{svc}.{ns}",rule="{rule[0] if rule else ""}"'
            for limit, n in (("max_active_requests", b.overflows),
                             ("max_active_retries", b.retry_overflows)):  # fmt: skip
                if n:
                    out.append(
                        f'tether_circuit_breaker_overflows_total{{{labels},limit="{limit}"}} {n}'
                    )
        return out

    def _hedging_metrics(self) -> list[str]:
        return render_hedging(self.resilience.hedgings())

    def _upstream_tls(self, cluster: Cluster) -> UpstreamTLS | None:
        return self._mesh_tls_of(cluster.namespace, cluster.service)

    def _mesh_tls_of(self, namespace: str, service: str) -> UpstreamTLS | None:
        mesh = self.mesh_tls
        if mesh is None:
            return None
        from proxy.tls import UpstreamTLS  # cryptography: only for a sidecar with an identity

        return UpstreamTLS(mesh, namespace, service)

    def _egress(self, auth: Authority, path: bytes | None) -> RouteResult:
        dstats = self._egress_stats
        if self.egress == "deny":
            return RouteResult.answer(
                local_reply.EGRESS_DENIED, f"egress to {auth.host} is denied", dstats=dstats
            )
        if auth.host in _LOOPBACK and auth.port == self.listen_port:
            return RouteResult.answer(local_reply.PROXY_LOOP, dstats=dstats)
        key = (auth.host, auth.port)
        pool = self._egress_pools.get(key)
        if pool is None:
            pool = self._egress_pools[key] = Pool(
                auth.host,
                auth.port,
                self.pool_policy,
                name=f"egress/{auth.host}:{auth.port}",
                guard=self.egress_guard,
                head_cache=self.head_cache,
            )
        return RouteResult(pool, dstats=dstats, path=path)

    async def _resolve(
        self,
        head: RequestHead,
        peer: Peer,
        path: bytes | None,
        ns: str,
        service: str,
        egress: Authority | None,
    ) -> RouteResult:
        """The first request to a service the directory has not seen: wait for discovery."""
        try:
            cluster = await asyncio.wait_for(
                self.directory.resolve(ns, service), self.resolve_timeout
            )
        except TimeoutError:
            return RouteResult.answer(
                local_reply.NO_HEALTHY_UPSTREAM,
                f"discovery did not answer about {service}.{ns} in {self.resolve_timeout}s",
            )
        if cluster is not None:
            return self._to_cluster(head, peer, path, cluster)
        if egress is not None:
            self._not_mesh[(ns, service)] = time.monotonic() + NOT_MESH_TTL
            return self._egress(egress, path)
        # Counted under local replies only: names are unbounded.
        return RouteResult.answer(
            local_reply.UNKNOWN_SERVICE, f"no service {service!r} in namespace {ns!r}"
        )

    def connect(self, head: RequestHead, peer: Peer) -> RouteResult:
        dstats = self._egress_stats
        try:
            auth = parse_authority(head.target, 443)
        except BadMessageError as e:
            return RouteResult.answer(
                e.reason, e.message, status=e.status, close=True, dstats=dstats
            )
        if auth.service is not None and (
            auth.namespace is None
            or self.directory.lookup(auth.namespace, auth.service) is not None
        ):
            # A mesh name: what the client sends inside is served (and routed) here.
            return RouteResult(serve=head.target)
        if self.egress == "deny":
            return RouteResult.answer(
                local_reply.EGRESS_DENIED,
                f"egress to {auth.host} is denied",
                close=True,
                dstats=dstats,
            )
        return RouteResult(dstats=dstats, tunnel=(auth.host, auth.port))

    def sweep(self, now: float) -> None:
        _sweep(self._pools, now)
        _sweep(self._egress_pools, now)
        # Outlier detection's periodic half: success rate and failure percentage.
        for (ns, svc), det in self.resilience.detectors().items():
            cluster = self.directory.lookup(ns, svc)
            if cluster is not None:
                det.evaluate(cluster.endpoints, now)
        # Active health checks follow the specs of the destinations requests went to,
        # also when a snapshot changes them between two requests.
        specs = self.current_specs()
        for cluster, _, _ in self._resilience.values():
            ns, svc = cluster.namespace, cluster.service
            self.health_checks.watch(ns, svc, specs.get(ns, svc).health_check)
        for key in [k for k in self._results if k not in self._pools]:
            del self._results[key]

    def current_specs(self) -> ClusterSpecs:
        """The specs requests are routed with now (a policy router's are its policy's)."""
        return self.specs

    def pools(self) -> list[Pool]:
        return [*self._pools.values(), *self._egress_pools.values()]

    def close(self) -> None:
        self.health_checks.close()
        for pool in self.pools():
            pool.close()

    def __repr__(self) -> str:
        return (
            f"<OutboundRouter ns={self.namespace} egress={self.egress}"
            f" pools={len(self._pools)} egress_pools={len(self._egress_pools)}>"
        )


def _pick_again(
    balancer: Balancer, ctx: PickContext, now: float, tried: list[Endpoint]
) -> Endpoint | None:
    """A retry's (or hedge's) pick: an endpoint not in `tried` where the balancer offers
    one in a few picks; a rotating balancer is put back where it stood (`rotation`)."""
    mark = balancer.rotation()
    ep = balancer.pick(ctx, now, RNG)
    for _ in range(_RETRY_PICKS):
        if ep is None or ep not in tried:
            break
        ep = balancer.pick(ctx, now, RNG)
    balancer.rewind(mark)
    return ep


def _sweep(pools: dict[Any, Pool], now: float) -> None:
    """Close idle connections past their time; forget pools left with none."""
    for key, pool in list(pools.items()):
        pool.sweep(now)
        if pool.size == 0 and not pool.waiters:
            del pools[key]


class InboundRouter:
    """Routes other sidecars' requests to the local app (one pool)."""

    name = "inbound"
    egress_guard: EgressGuard | None = None  # no egress here: CONNECT is refused

    def __init__(
        self,
        app_port: int,
        stats: ProxyStats,
        *,
        app_host: str = "127.0.0.1",
        pool_policy: PoolPolicy | None = None,
        app_ssl: ssl_module.SSLContext | None = None,
        head_cache: HeadCache | None = None,
        authz: InboundAuthz | None = None,
    ) -> None:
        # Heads llhttp already parsed (proxy/head_cache.py), requests and responses.
        self.head_cache = head_cache if head_cache is not None else HeadCache()
        # Intentions for this sidecar's service (proxy/authz.py); None: not checked
        # (a sidecar without a control plane).
        self.authz = authz
        self.pool = Pool(
            app_host,
            app_port,
            pool_policy or PoolPolicy(),
            ssl=app_ssl,
            name="app",
            head_cache=self.head_cache,
        )
        self.stats = stats
        self.dstats = stats.destination(self.name, "app")
        # Every origin-form request's answer: one shared, unchanging result.
        self._result = RouteResult(self.pool, dstats=self.dstats)
        # Per caller (`Peer.source`: `svc.ns` from its verified mTLS identity, "" for
        # plaintext), that answer with the caller's own stats (`source` label). Only
        # callers given a label of their own are kept (ProxyStats.source_label bounds
        # them); `_labels` holds one entry per label.
        entry = (self._result, self.dstats)
        self._sources: dict[str, tuple[RouteResult, DestinationStats]] = {"": entry}
        self._labels: dict[str, tuple[RouteResult, DestinationStats]] = {"": entry}
        # Host values seen to be well-formed authorities (bounded like the outbound's).
        self._hosts: set[bytes] = set()
        # The Route's `at: inbound` rate limits (proxy/inbound_limits.py), once a control
        # plane's policy is attached; None: none.
        self.limits: InboundLimits | None = None

    def _caller(self, source: str) -> tuple[RouteResult, DestinationStats]:
        label = self.stats.source_label(source)
        entry = self._labels.get(label)
        if entry is None:
            dstats = self.stats.destination(self.name, "app", "", label)
            entry = self._labels[label] = (RouteResult(self.pool, dstats=dstats), dstats)
        if label != OTHER_SOURCE:
            self._sources[source] = entry
        return entry

    def route(self, head: RequestHead, peer: Peer) -> RouteResult:
        caller = self._sources.get(peer.source)
        if caller is None:
            caller = self._caller(peer.source)
        result, dstats = caller
        path = None
        try:
            if head.target[0] != 47:  # not origin-form (b"/"); llhttp never gives one empty
                path = _absolute_to_origin(head)[1]
            host = head.host
            if host is not None and host not in self._hosts:
                # The same authority syntax the outbound listener requires: the app must
                # not see a Host that carries a path or userinfo.
                parse_authority(host)
                if len(self._hosts) >= _MAX_CACHED_AUTHORITIES:
                    self._hosts.clear()
                self._hosts.add(host)
        except BadMessageError as e:
            return RouteResult.answer(e.reason, e.message, status=e.status, dstats=dstats)
        # Authorization before the rate limits (identity, authorization, per-caller
        # limits): a refused caller spends none of the budget of those let in.
        authz = self.authz
        if authz is not None and authz.policy is not None:
            refused = authz.check(head, peer, path, dstats)
            if refused is not None:
                return refused
        limits = self.limits
        if limits is not None:
            wait = limits.wait(head, peer)
            if wait > 0.0:
                return RouteResult.answer(
                    local_reply.RATE_LIMITED,
                    f"over the service's rate limit; retry in {wait:.3f}s",
                    dstats=dstats,
                    headers=((b"retry-after", local_reply.retry_after(wait)),),
                )
        if path is None:
            return result
        return RouteResult(self.pool, dstats=dstats, path=path)

    def retry_route(
        self, head: RequestHead, peer: Peer, previous: RouteResult, tried: list[Endpoint]
    ) -> RouteResult:
        return previous  # one destination: the local app

    def connect(self, head: RequestHead, peer: Peer) -> RouteResult:
        return RouteResult.answer(
            local_reply.BAD_REQUEST,
            "CONNECT is not accepted on the inbound listener",
            close=True,
            dstats=self.dstats,
        )

    def sweep(self, now: float) -> None:
        self.pool.sweep(now)

    def pools(self) -> list[Pool]:
        return [self.pool]

    def close(self) -> None:
        self.pool.close()

    def __repr__(self) -> str:
        return f"<InboundRouter {self.pool!r}>"
