"""The health-check listener: one path of the app, in plaintext, for a registry outside.

With mTLS on, a registry in another network namespace (containers, Kubernetes) cannot
check the app through the inbound port: it has no mesh certificate. As Consul's
`expose` paths do, the sidecar then opens a second, plaintext listener that forwards
only `GET`/`HEAD` of the app's health path (exactly, no query) and answers
`404 not_exposed` to anything else; the registration's check points at it.
"""

from __future__ import annotations

from proxy import local_reply
from proxy.dispatch import InboundRouter
from proxy.heads import RequestHead
from proxy.pool import PoolPolicy
from proxy.route_result import Peer, RouteResult
from proxy.stats import ProxyStats


class ExposeRouter(InboundRouter):
    """An inbound router that lets exactly one path through."""

    name = "expose"

    def __init__(
        self,
        path: str,
        app_port: int,
        stats: ProxyStats,
        *,
        app_host: str = "127.0.0.1",
        pool_policy: PoolPolicy | None = None,
    ) -> None:
        super().__init__(app_port, stats, app_host=app_host, pool_policy=pool_policy)
        self.path = ("/" + path.lstrip("/")).encode()

    def route(self, head: RequestHead, peer: Peer) -> RouteResult:
        if head.method not in (b"GET", b"HEAD") or head.target != self.path:
            return RouteResult.answer(local_reply.NOT_EXPOSED, dstats=self.dstats)
        return super().route(head, peer)

    def __repr__(self) -> str:
        return f"<ExposeRouter {self.path.decode()} {self.pool!r}>"
