"""The ingress listener: callers outside the mesh (a browser, curl) in plaintext.

`--ingress-port P` opens a listener that routes like the outbound one (route rules,
splits, balancing, and mTLS to the chosen instance's sidecar) but for callers that are
not the app: every request goes to one mesh service, the sidecar's own by default, as
an ingress gateway's listener does. The caller's `Host` is kept for the app as
`X-Forwarded-Host`, and the request is routed with `Host` set to that service; an
absolute-form request goes there too (its authority kept as `X-Forwarded-Host`). Egress
is never open from here (an outsider must not use the sidecar as an open proxy), and
CONNECT is refused.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from proxy import local_reply
from proxy.errors import BadMessageError
from proxy.heads import RequestHead
from proxy.route_result import Peer, RouteResult
from proxy.target import split_absolute_form

if TYPE_CHECKING:
    from proxy.balance import Endpoint
    from proxy.dispatch import OutboundRouter
    from proxy.egress import EgressGuard
    from proxy.head_cache import HeadCache
    from proxy.pool import Pool


class IngressRouter:
    """Routes outside callers' requests to `service` through an outbound router."""

    name = "ingress"

    def __init__(self, inner: OutboundRouter, service: str, namespace: str) -> None:
        self.inner = inner
        self.authority = f"{service}.{namespace}".encode()
        self.head_cache: HeadCache = inner.head_cache

    @property
    def egress_guard(self) -> EgressGuard | None:
        return None  # no tunnels from here

    def route(self, head: RequestHead, peer: Peer) -> RouteResult:
        host = head.host
        if head.target[:1] != b"/":
            # Absolute-form (RFC 9112 3.2.2: a server accepts it): the URI's authority is
            # what the caller named; it goes to this listener's service all the same.
            try:
                split = split_absolute_form(head.target)
            except BadMessageError as e:
                return RouteResult.answer(e.reason, e.message, status=e.status)
            if split is None:
                return RouteResult.answer(local_reply.BAD_REQUEST, "no path to route")
            host, head.target = split
        if host is not None and host != self.authority:
            head.headers.append((b"X-Forwarded-Host", host))
        head.set_host(self.authority)
        return self.inner.route(head, peer)

    def retry_route(
        self, head: RequestHead, peer: Peer, previous: RouteResult, tried: list[Endpoint]
    ) -> RouteResult:
        return self.inner.retry_route(head, peer, previous, tried)  # as the outbound's

    def connect(self, head: RequestHead, peer: Peer) -> RouteResult:
        return RouteResult.answer(
            local_reply.BAD_REQUEST, "CONNECT is not accepted on the ingress listener", close=True
        )

    def sweep(self, now: float) -> None:
        self.inner.sweep(now)

    def pools(self) -> list[Pool]:
        return self.inner.pools()

    def close(self) -> None:
        self.inner.close()

    def __repr__(self) -> str:
        return f"<IngressRouter to {self.authority.decode()} {self.inner!r}>"
