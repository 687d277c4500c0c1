"""The outbound router with policy: logical target → route → concrete target.

`PolicyRouter` is the outbound router of proxy/dispatch.py with one step added where
the logical target's cluster becomes the concrete target (`_to_cluster`, which both the
synchronous and the first-request paths go through): if the applied policy
(proxy/policy.py) has nothing for the service, the request goes on exactly as without
a control plane (one dict lookup more); otherwise the route's first matching rule and
the destination's split choose the service and subset, the request's header edits are
made, and the subset's cluster (its endpoints filtered by Meta) is what the balancer
picks from. The router returns all of it as a `RouteResult` (proxy/route_result.py):
response header edits (a rule's, and a sticky split's Set-Cookie) as `response_edit`,
which the exchange applies to the response head, and the destination's request timeout
from its compiled `ClusterSpec` (proxy/cluster_spec.py: ServiceDefaults, else
MeshConfig), enforced by the listener's sweep, so at its tick's granularity (1 s by
default). The connect timeout (ServiceDefaults, else MeshConfig, else the sidecar's own)
is the spec's pool policy: the endpoint's pool is the one for that spec.
Calls outside the mesh follow MeshConfig's egress policy once there is one (the
`--egress` flag until then).
"""

from __future__ import annotations

import asyncio
import os
import random
import ssl as ssl_module
import time
import zlib
from collections.abc import Mapping
from typing import TYPE_CHECKING, Literal

from proxy import local_reply
from proxy.balance import Endpoint
from proxy.cluster import Cluster, ServiceDirectory
from proxy.cluster_spec import ClusterSpec, ClusterSpecs
from proxy.dispatch import OutboundRouter
from proxy.downstream import RNG, TimeoutPolicy
from proxy.egress import EgressGuard
from proxy.errors import BadMessageError
from proxy.head_cache import HeadCache
from proxy.heads import RequestHead
from proxy.listener import Listener, _listen_outbound
from proxy.mirror import MirrorSender, MirrorTap, pick_endpoint
from proxy.policy import Policy
from proxy.pool import PoolPolicy
from proxy.resilience import Resilience
from proxy.route_filters import Mirror, RuleFilters
from proxy.route_result import Peer, RouteResult
from proxy.routing import Decision, RouteRule
from proxy.stats import DestinationStats, ProxyStats
from proxy.target import Authority, parse_authority

if TYPE_CHECKING:
    from proxy.tls import MeshTLS, UpstreamTLS


class PolicyRouter(OutboundRouter):
    """Routes the app's calls by the control plane's policy (when it has any)."""

    name = "outbound"

    def __init__(
        self,
        directory: ServiceDirectory,
        stats: ProxyStats,
        policy: Policy,
        *,
        rng: random.Random | None = None,
        namespace: str = "default",
        egress: Literal["allow", "deny"] = "allow",
        pool_policy: PoolPolicy | None = None,
        upstream_ssl: ssl_module.SSLContext | None = None,
        resolve_timeout: float = 5.0,
        egress_guard: EgressGuard | None = None,
        head_cache: HeadCache | None = None,
        mesh_tls: MeshTLS | None = None,
    ) -> None:
        # OutboundRouter's keywords spelled out: the compiled build cannot pass `**kw`
        # on to keyword-only parameters.
        super().__init__(
            directory,
            stats,
            namespace=namespace,
            egress=egress,
            pool_policy=pool_policy,
            upstream_ssl=upstream_ssl,
            resolve_timeout=resolve_timeout,
            egress_guard=egress_guard,
            head_cache=head_cache,
            mesh_tls=mesh_tls,
        )
        self.policy = policy
        # The sidecar's --egress, what applies while no MeshConfig says otherwise.
        self.default_egress: Literal["allow", "deny"] = self.egress
        # Split draws; a seeded one (TETHER_POLICY_SEED) replays the same choices.
        self.rng = rng if rng is not None else RNG
        # The specs' connect timeouts fall back to this router's own.
        policy.use_pool_policy(self.pool_policy)
        self._route_dstats: dict[tuple[str, str], DestinationStats] = {}
        # Copies for rules with `mirror` (proxy/mirror.py), over the same mTLS.
        self.mirrors = MirrorSender(self._mirror_endpoint, ssl=self.upstream_ssl)
        # Route rules' Resilience (their own retries or limits), per rule and cluster.
        self._rule_res: dict[
            tuple[int, str], tuple[RouteRule, ClusterSpec, Cluster, Resilience]
        ] = {}

    def current_specs(self) -> ClusterSpecs:
        return self.policy.specs

    def _to_cluster(
        self, head: RequestHead, peer: Peer, path: bytes | None, cluster: Cluster
    ) -> RouteResult:
        policy = self.policy
        specs = policy.specs
        sp = policy.route(cluster.namespace, cluster.service)
        if sp is None:
            spec = specs.get(cluster.namespace, cluster.service)
            return self._concrete(head, peer, path, cluster, spec)
        headers = sp.read_headers(head.headers)
        decision = policy.table.decide(
            sp,
            head.method.decode("latin-1"),
            (path or head.target).decode("latin-1"),
            headers,
            self.rng,
        )
        if decision.request_headers:
            decision.request_headers.apply(head.headers)
        rule = decision.rule
        if rule is not None and rule.filters is not None:
            # The rule's L7 filters (proxy/route_filters.py): an answer of their own, or
            # the request rewritten, held and/or copied to a shadow.
            step = self._filter(rule.filters, head, peer, path, headers)
            if isinstance(step, RouteResult):
                return step
            path, delay, tap = step
            if delay > 0.0:
                return RouteResult(
                    pending=self._delayed(delay, head, peer, path, cluster, decision, tap)
                )
            return self._destination(head, peer, path, cluster, decision, tap)
        return self._destination(head, peer, path, cluster, decision, None)

    def _destination(
        self,
        head: RequestHead,
        peer: Peer,
        path: bytes | None,
        cluster: Cluster,
        decision: Decision,
        tap: MirrorTap | None,
    ) -> RouteResult:
        """The decision's concrete target: its service's (or subset's) cluster."""
        policy = self.policy
        specs = policy.specs
        target: Cluster | None = cluster
        if (decision.namespace, decision.service) != (cluster.namespace, cluster.service):
            target = self.directory.lookup(decision.namespace, decision.service)
            if target is None:
                return RouteResult.answer(
                    local_reply.UNKNOWN_SERVICE,
                    f"route to {decision.service}.{decision.namespace}: no such service",
                )
        if decision.subset is not None:
            target = policy.subset_cluster(decision.namespace, decision.service, decision.subset)
        if target is None:
            return RouteResult.answer(
                local_reply.NO_HEALTHY_UPSTREAM,
                f"subset {decision.subset} of {decision.service}.{decision.namespace} "
                "is not known yet",
            )
        spec = specs.get(target.namespace, target.service)
        result = self._concrete(head, peer, path, target, spec)
        if decision.response_headers and result.reply is None:
            result = result.replace(response_edit=decision.response_headers.apply)
        if tap is not None and result.reply is None:
            result = result.replace(mirror=tap)
        rule = decision.rule
        if (
            rule is not None
            and (
                rule.retry is not None or rule.circuit_breaker is not None or rule.hedge is not None
            )
            and result.reply is None
        ):
            # The rule's own retries and limits, over its destination's.
            result = result.replace(resilience=self._rule_resilience(rule, target, spec, result))
        if rule is not None and rule.label:
            # Requests a Route rule sent are counted under that rule (a bounded label).
            result = result.replace(dstats=self._route_stats(target.name, rule.label))
        return result

    def _rule_resilience(
        self, rule: RouteRule, cluster: Cluster, spec: ClusterSpec, result: RouteResult
    ) -> Resilience:
        key = (id(rule), cluster.name)
        got = self._rule_res.get(key)
        if got is not None and got[0] is rule and got[1] is spec and got[2] is cluster:
            return got[3]
        rule_key = (
            cluster.namespace,
            cluster.service,
            f"rule-{zlib.crc32(repr(rule.match).encode()):08x}",
        )
        res = self.resilience.for_rule(
            result.resilience, cluster, rule_key, rule.retry, rule.circuit_breaker, rule.hedge
        )
        if len(self._rule_res) > 4096:
            self._rule_res.clear()
        self._rule_res[key] = (rule, spec, cluster, res)
        return res

    def _route_stats(self, name: str, route: str) -> DestinationStats:
        key = (name, route)
        ds = self._route_dstats.get(key)
        if ds is None:
            ds = self._route_dstats[key] = self.stats.destination(self.name, name, route)
        return ds

    # -- a matched rule's L7 filters --------------------------------------------------------

    def _filter(
        self,
        filters: RuleFilters,
        head: RequestHead,
        peer: Peer,
        path: bytes | None,
        headers: Mapping[str, str],
    ) -> RouteResult | tuple[bytes | None, float, MirrorTap | None]:
        """Rate limit, redirect, fault, rewrite and mirror draw, in that order: a local
        answer, or (the origin-form target if rewritten, seconds to hold, the copy)."""
        limit = filters.outbound_limit
        if limit is not None:
            wait = limit.check(headers, peer.identity, time.monotonic())
            if wait > 0.0:
                return RouteResult.answer(
                    local_reply.RATE_LIMITED,
                    f"over the route's rate limit; retry in {wait:.3f}s",
                    headers=((b"retry-after", local_reply.retry_after(wait)),),
                )
        target = path or head.target
        rd = filters.redirect
        if rd is not None:
            host = (head.host or b"").decode("latin-1")
            location = rd.location(host, target.decode("latin-1"))
            return RouteResult.answer(
                local_reply.REDIRECT,
                f"redirected to {location}",
                status=rd.status,
                headers=((b"location", location.encode("latin-1")),),
            )
        delay = 0.0
        fault = filters.fault
        if fault is not None:
            status, delay = fault.draw(headers, self.rng)
            if status:
                return RouteResult.answer(
                    local_reply.FAULT_ABORT, "aborted by fault injection", status=status
                )
        rw = filters.rewrite
        if rw is not None:
            new = rw.path(target.decode("latin-1"))
            if new is not None:
                path = new.encode("latin-1")
            if rw.host is not None:
                head.set_host(rw.host.encode("latin-1"))
        tap = None
        mirror = filters.mirror
        if mirror is not None and mirror.draw(self.rng):
            tap = self.mirrors.tap(mirror)
        return path, delay, tap

    async def _delayed(
        self,
        delay: float,
        head: RequestHead,
        peer: Peer,
        path: bytes | None,
        cluster: Cluster,
        decision: Decision,
        tap: MirrorTap | None,
    ) -> RouteResult:
        """A fault's delay: the request is held, then goes where it was going."""
        await asyncio.sleep(delay)
        return self._destination(head, peer, path, cluster, decision, tap)

    def _mirror_endpoint(self, mirror: Mirror) -> tuple[Endpoint, UpstreamTLS | None] | None:
        if mirror.subset is not None:
            cluster = self.policy.subset_cluster(mirror.namespace, mirror.service, mirror.subset)
        else:
            cluster = self.directory.lookup(mirror.namespace, mirror.service)
        if cluster is None:
            return None
        ep = pick_endpoint(cluster.endpoints, time.monotonic(), self.rng)
        return None if ep is None else (ep, self._upstream_tls(cluster))

    # -- egress: MeshConfig's policy, when there is one, over the --egress flag ----------

    def _egress_mode(self, host: str) -> Literal["allow", "deny"]:
        mesh = self.policy.mesh
        if mesh is None:
            return self.default_egress
        eg = mesh.egress
        return "allow" if eg.mode == "allow" or egress_allowed(host, eg.hosts) else "deny"

    def _egress(self, auth: Authority, path: bytes | None) -> RouteResult:
        self.egress = self._egress_mode(auth.host)
        return super()._egress(auth, path)

    def connect(self, head: RequestHead, peer: Peer) -> RouteResult:
        try:
            host = parse_authority(head.target, 443).host
        except BadMessageError:
            host = ""  # the plain router answers the bad target
        self.egress = self._egress_mode(host)
        return super().connect(head, peer)

    def close(self) -> None:
        self.mirrors.close()
        super().close()

    def __repr__(self) -> str:
        return f"<PolicyRouter {self.policy!r} {super().__repr__()}>"


def egress_allowed(host: str, patterns: tuple[str, ...]) -> bool:
    """`api.example.com` matches itself; `*.example.com` matches every name under it."""
    for pattern in patterns:
        p = pattern.lower().rstrip(".")
        if p.startswith("*."):
            if host.endswith(p[1:]):
                return True
        elif host == p:
            return True
    return False


async def start_policy_outbound(
    directory: ServiceDirectory,
    policy: Policy,
    *,
    stats: ProxyStats | None = None,
    host: str = "127.0.0.1",
    port: int = 15001,
    namespace: str = "default",
    egress: Literal["allow", "deny"] = "allow",
    timeouts: TimeoutPolicy | None = None,
    pool_policy: PoolPolicy | None = None,
    ssl: ssl_module.SSLContext | None = None,
    upstream_ssl: ssl_module.SSLContext | None = None,
    rng: random.Random | None = None,
    egress_guard: EgressGuard | None = None,
    mesh_tls: MeshTLS | None = None,
) -> Listener:
    """`proxy.listener.start_outbound`, with the policy step in the router.

    Without `rng`, split draws use the proxy's shared random source, or one seeded from
    TETHER_POLICY_SEED when that is set (so a test or a replay sees the same choices).
    """
    seed = os.environ.get("TETHER_POLICY_SEED")
    if rng is None and seed:
        rng = random.Random(seed)
    stats = stats if stats is not None else ProxyStats()
    timeouts = timeouts or TimeoutPolicy()
    router = PolicyRouter(
        directory,
        stats,
        policy,
        namespace=namespace,
        egress=egress,
        pool_policy=pool_policy or PoolPolicy(connect_timeout=timeouts.connect),
        upstream_ssl=upstream_ssl,
        rng=rng,
        egress_guard=egress_guard,
        mesh_tls=mesh_tls,
    )
    return await _listen_outbound(router, stats, timeouts, host, port, ssl)
