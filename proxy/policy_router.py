"""The outbound router with policy: logical target → route → concrete target.

`PolicyRouter` is the outbound router of proxy/dispatch.py with one step added where
the logical target's cluster becomes the concrete target (`_to_cluster`, which both the
synchronous and the first-request paths go through): if the applied policy
(proxy/policy.py) has nothing for the service, the request goes on exactly as without
a control plane (one dict lookup more); otherwise the route's first matching rule and
the destination's split choose the service and subset, the request's header edits are
made, and the subset's cluster (its endpoints filtered by Meta) is what the balancer
picks from. Response header edits (a rule's, and a sticky split's Set-Cookie) are
handed to the connection (`response_edit`), which makes them on the response head.
Calls outside the mesh follow MeshConfig's egress policy once there is one (the
`--egress` flag until then). A request to a service with a request timeout
(ServiceDefaults, else MeshConfig) carries it on the connection (`request_timeout`),
enforced by the listener's sweep, so at its tick's granularity (1 s by default). The
connect timeout (ServiceDefaults, else MeshConfig, else the sidecar's own) is the
endpoint pool's: checked when the policy's version changes, not per request.
"""

from __future__ import annotations

import dataclasses
import os
import random
import ssl as ssl_module
from typing import Any, Literal

from proxy import local_reply
from proxy.cluster import Cluster, ServiceDirectory
from proxy.codec import RequestHead
from proxy.dispatch import OutboundRouter
from proxy.downstream import RNG, DownstreamConnection, TimeoutPolicy
from proxy.egress import EgressGuard
from proxy.errors import BadMessageError
from proxy.listener import Listener, _listen_outbound
from proxy.policy import Policy
from proxy.pool import Pool, PoolPolicy
from proxy.stats import ProxyStats
from proxy.target import Authority, parse_authority


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

    def _to_cluster(self, conn: DownstreamConnection, cluster: Cluster) -> Pool | None:
        policy = self.policy
        sp = policy.route(cluster.namespace, cluster.service)
        head = conn.head
        if sp is None or head is None:
            self._timeout(conn, cluster)
            return self._concrete(conn, cluster)
        decision = policy.table.decide(
            sp,
            head.method.decode("latin-1"),
            conn.path.decode("latin-1"),
            sp.read_headers(head.headers),
            self.rng,
        )
        if decision.request_headers:
            decision.request_headers.apply(head.headers)
        if decision.response_headers:
            conn.response_edit = decision.response_headers.apply
        target: Cluster | None = cluster
        if (decision.namespace, decision.service) != (cluster.namespace, cluster.service):
            target = self.directory.lookup(decision.namespace, decision.service)
            if target is None:
                conn.local_reply(
                    local_reply.UNKNOWN_SERVICE,
                    f"route to {decision.service}.{decision.namespace}: no such service",
                )
                return None
        if decision.subset is not None:
            target = policy.subset_cluster(decision.namespace, decision.service, decision.subset)
        if target is None:
            conn.local_reply(
                local_reply.NO_HEALTHY_UPSTREAM,
                f"subset {decision.subset} of {decision.service}.{decision.namespace} "
                "is not known yet",
            )
            return None
        self._timeout(conn, target)
        return self._concrete(conn, target)

    def _concrete(self, conn: DownstreamConnection, cluster: Cluster) -> Pool | None:
        """The endpoint's pool, its connect timeout brought up to the policy's version."""
        pool = super()._to_cluster(conn, cluster)
        if pool is not None and pool.policy_version != self.policy.version:
            policy = self.policy
            timeout = (
                policy.connect_timeouts.get(
                    (cluster.namespace, cluster.service), policy.default_connect_timeout
                )
                or self.pool_policy.connect_timeout
            )
            if pool.policy.connect_timeout != timeout:
                pool.policy = dataclasses.replace(pool.policy, connect_timeout=timeout)
            pool.policy_version = policy.version
        return pool

    def _timeout(self, conn: DownstreamConnection, cluster: Cluster) -> None:
        """The destination service's request timeout (ServiceDefaults, else MeshConfig)."""
        policy = self.policy
        timeout = policy.request_timeouts.get(
            (cluster.namespace, cluster.service), policy.default_request_timeout
        )
        if timeout:
            conn.request_timeout = timeout

    # -- egress: MeshConfig's policy, when there is one, over the --egress flag ----------

    def _egress_mode(self, host: str) -> Literal["allow", "deny"]:
        mesh = self.policy.mesh
        if mesh is None:
            return self.default_egress
        eg = mesh.egress
        return "allow" if eg.mode == "allow" or egress_allowed(host, eg.hosts) else "deny"

    def _egress(self, conn: DownstreamConnection, auth: Authority) -> Pool | None:
        self.egress = self._egress_mode(auth.host)
        return super()._egress(conn, auth)

    def connect(self, conn: DownstreamConnection, head: RequestHead) -> tuple[str, int] | None:
        try:
            host = parse_authority(head.target, 443).host
        except BadMessageError:
            host = ""  # the plain router answers the bad target
        self.egress = self._egress_mode(host)
        return super().connect(conn, head)

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
    )
    return await _listen_outbound(router, stats, timeouts, host, port, ssl)
