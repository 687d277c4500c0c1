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

import os
import random
import ssl as ssl_module
from typing import TYPE_CHECKING, Any, Literal

from proxy import local_reply
from proxy.cluster import Cluster, ServiceDirectory
from proxy.dispatch import OutboundRouter
from proxy.downstream import RNG, TimeoutPolicy
from proxy.egress import EgressGuard
from proxy.errors import BadMessageError
from proxy.heads import RequestHead
from proxy.listener import Listener, _listen_outbound
from proxy.policy import Policy
from proxy.pool import PoolPolicy
from proxy.route_result import Peer, RouteResult
from proxy.stats import ProxyStats
from proxy.target import Authority, parse_authority

if TYPE_CHECKING:
    from proxy.tls import MeshTLS


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
        **kw: Any,
    ) -> None:
        super().__init__(directory, stats, **kw)
        self.policy = policy
        # The sidecar's --egress, what applies while no MeshConfig says otherwise.
        self.default_egress: Literal["allow", "deny"] = self.egress
        # Split draws; a seeded one (TETHER_POLICY_SEED) replays the same choices.
        self.rng = rng if rng is not None else RNG
        # The specs' connect timeouts fall back to this router's own.
        policy.use_pool_policy(self.pool_policy)

    def _to_cluster(
        self, head: RequestHead, peer: Peer, path: bytes | None, cluster: Cluster
    ) -> RouteResult:
        policy = self.policy
        specs = policy.specs
        sp = policy.route(cluster.namespace, cluster.service)
        if sp is None:
            spec = specs.get(cluster.namespace, cluster.service)
            return self._concrete(head, peer, path, cluster, spec)
        decision = policy.table.decide(
            sp,
            head.method.decode("latin-1"),
            (path or head.target).decode("latin-1"),
            sp.read_headers(head.headers),
            self.rng,
        )
        if decision.request_headers:
            decision.request_headers.apply(head.headers)
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
        return result

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
