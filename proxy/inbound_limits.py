"""Rate limits at the inbound sidecar: the `at: inbound` limits of its own service's Route.

A rule's `rateLimit` with `at: inbound` runs where the service is, over all its callers
(DESIGN.md: per-caller limits at the inbound sidecar, where mTLS proves who the caller
is): the inbound router asks `InboundLimits.wait` for each request, which matches the
Route of this sidecar's own service with the same compiled matcher the outbound uses
(proxy/routing.py) and takes a token from the matched rule's buckets, keyed by nothing,
a header, or the caller: its SPIFFE identity, or its address when it came in plaintext
(permissive mode).
A table without such a limit costs one identity check per request.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from proxy.heads import RequestHead
    from proxy.policy import Policy
    from proxy.route_result import Peer
    from proxy.routing import RoutingTable, ServicePolicy


class InboundLimits:
    """The inbound rate limits of one service, following the policy's applied table."""

    __slots__ = ("_limited", "_table", "namespace", "policy", "service")

    def __init__(self, policy: Policy, namespace: str, service: str) -> None:
        self.policy = policy
        self.namespace = namespace
        self.service = service
        self._table: RoutingTable | None = None
        self._limited: ServicePolicy | None = None

    def _current(self) -> ServicePolicy | None:
        table = self.policy.table
        if table is not self._table:
            self._table = table
            pol = table.policy(self.namespace, self.service)
            limited = pol is not None and any(
                r.filters is not None
                and r.filters.rate_limit is not None
                and r.filters.rate_limit.at == "inbound"
                for r in pol.rules
            )
            self._limited = pol if limited else None
        return self._limited

    def wait(self, head: RequestHead, peer: Peer) -> float:
        """0.0: let the request in; else the seconds until the caller may retry."""
        pol = self._current()
        if pol is None:
            return 0.0
        target = head.target.decode("latin-1")
        path, _, qs = target.partition("?")
        headers = pol.read_headers(head.headers)
        rule = pol.match(head.method.decode("latin-1"), path, headers, qs)
        rl = rule.filters.rate_limit if rule is not None and rule.filters is not None else None
        if rl is None or rl.at != "inbound":
            return 0.0
        caller = peer.identity or peer.address.decode("latin-1")
        return rl.check(headers, caller, time.monotonic())

    def __repr__(self) -> str:
        return f"<InboundLimits {self.service}.{self.namespace} {self._limited is not None}>"
