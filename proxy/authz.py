"""Authorization at the inbound listener: the intentions for this sidecar's service.

`InboundAuthz` holds the `DestinationPolicy` (wire/authz.py) compiled from each applied
snapshot for the sidecar's own namespace and service; the inbound router asks it about
every request before routing to the app. A denied request is answered locally, 403
with reason `forbidden_by_policy`; the caller learns no more than that, and the
sidecar's log says who was refused and why (both identities and the deciding rule),
once per caller and reason per policy, at most `LOG_BURST` lines per `LOG_WINDOW`
seconds (what is left out is counted and said with the next line).

The caller is the SPIFFE ID mTLS verified on the connection (`Peer.identity`); a
connection without one (a sidecar without mTLS, a permissive port) is an anonymous
caller, which only intentions from `*` in namespace `*` and the default action let
in. Before the first snapshot, and in a sidecar without a control plane, there is no
policy and nothing is checked (as without a control plane).

Per request: one attribute read when there is no policy or it trivially allows. Which
rule decides depends on the caller alone, so it is found once per connection (and per
policy) and kept in the peer's router state, with the decision itself when that rule is
L4 or there is none; only an L7 rule's permissions are evaluated per request, on
the path without its query, normalized (`wire.authz.normalize_path`: `%2e` decoded,
`//` merged, dot segments removed) so `/public/../admin` is judged as `/admin`; the
app still receives the path as sent.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping

from proxy import local_reply
from proxy.heads import RequestHead
from proxy.route_result import Peer, RouteResult
from proxy.stats import DestinationStats
from wire import resources as schema
from wire.authz import (
    Decision,
    DestinationPolicy,
    Intentions,
    Source,
    normalize_path,
    read_headers,
    source_of_spiffe_id,
)

log = logging.getLogger("tether.authz")

LOG_BURST = 20
LOG_WINDOW = 10.0
# Distinct (caller, reason) pairs remembered per policy before the memory starts over.
MAX_REMEMBERED = 4096
MESSAGE = "the destination's authorization policy does not allow this caller or request"


NO_HEADERS: Mapping[str, str] = {}


def _headers(head: RequestHead, names: frozenset[bytes]) -> Mapping[str, str]:
    """The fields `names` (lower-case) of a request head. A cached head keeps its field
    lines as raw bytes until someone asks for the list (the forwarding path does not):
    they are searched there, so checking a permission does not cost the head its fast
    path."""
    raw = head.raw
    if raw is None:
        return read_headers(names, head.headers)
    low = b"\r\n" + raw.lower()  # position p in low is p - 2 in raw
    pairs: list[tuple[bytes, bytes]] = []
    for name in names:
        needle = b"\r\n" + name + b":"
        i = low.find(needle)
        while i >= 0:
            end = low.find(b"\r\n", i + 2)
            if end < 0:
                end = len(low)
            pairs.append((name, raw[i + len(name) + 1 : end - 2].strip(b" \t")))
            i = low.find(needle, end)
    return read_headers(names, pairs)


class DenialLog:
    """Says each refusal once per caller and reason, and at most `burst` lines per
    `window` seconds; the clock is injected (tests)."""

    def __init__(
        self,
        *,
        burst: int = LOG_BURST,
        window: float = LOG_WINDOW,
        clock: Callable[[], float] = time.monotonic,
        emit: Callable[[str], None] | None = None,
    ) -> None:
        self.burst = burst
        self.window = window
        self.clock = clock
        self.emit = emit or (lambda line: log.warning("%s", line))
        self.seen: set[tuple[str, str, int, int]] = set()
        self.window_start = -1e18
        self.in_window = 0
        self.suppressed = 0

    def reset(self) -> None:
        """A new policy: its decisions are news again."""
        self.seen.clear()

    def denied(self, caller: str, destination: str, decision: Decision) -> bool:
        """Log a refusal if it is news and the rate allows; True if a line was written."""
        # Which rule and permission decided, not the reason's text: no formatting unless
        # a line is written.
        key = (caller, decision.why, id(decision.rule), decision.permission)
        if key in self.seen:
            return False
        if len(self.seen) >= MAX_REMEMBERED:
            self.seen.clear()
        self.seen.add(key)
        now = self.clock()
        if now - self.window_start >= self.window:
            self.window_start, self.in_window = now, 0
        if self.in_window >= self.burst:
            self.suppressed += 1
            return False
        self.in_window += 1
        more = ""
        if self.suppressed:
            more = f" ({self.suppressed} more refusals not logged)"
            self.suppressed = 0
        self.emit(
            f"authz: refused {caller} -> {destination}: {local_reply.FORBIDDEN_BY_POLICY}: "
            f"{decision.reason}{more}"
        )
        return True


class InboundAuthz:
    """The inbound listener's authorization for one service; swapped per snapshot."""

    def __init__(self, namespace: str, service: str, denial_log: DenialLog | None = None) -> None:
        self.namespace = namespace
        self.service = service
        self.destination = f"{namespace}/{service}"
        # None: nothing to check (no policy yet, or one that allows everyone).
        self.policy: DestinationPolicy | None = None
        self.compiled: DestinationPolicy | None = None
        self.log = denial_log or DenialLog()
        self.denied = 0

    def compile(self, resources: Iterable[schema.Resource]) -> DestinationPolicy:
        """This service's policy from a snapshot's resources (raises on a bad regex; the
        snapshot was checked before, so only a bug gets there)."""
        return Intentions.compile(resources).for_destination(self.namespace, self.service)

    def install(self, policy: DestinationPolicy) -> None:
        """Make `policy` the one in force (no await: requests see the old or the new)."""
        self.compiled = policy
        self.policy = None if policy.trivially_allows else policy
        self.log.reset()

    def check(
        self, head: RequestHead, peer: Peer, path: bytes | None, dstats: DestinationStats
    ) -> RouteResult | None:
        """None if the request may go on; else the local reply refusing it."""
        policy = self.policy
        if policy is None:
            return None
        state = peer.routing
        if state is None or state[0] is not policy:
            # Once per connection and policy: who the caller is, the rule that decides
            # for it, and the decision when the request does not matter.
            ident = peer.identity
            src = source_of_spiffe_id(ident) if ident else None
            entry = policy.first(src)
            state = peer.routing = (policy, src, policy.fixed(src, entry), entry)
        decision: Decision | None = state[2]
        if decision is None:  # an L7 rule: its permissions judge this request
            entry = state[3]
            target = path if path is not None else head.target
            query = target.find(b"?")
            if query >= 0:
                target = target[:query]
            names = entry[4]
            decision = policy.permit(
                state[1],
                entry,
                head.method.decode("latin-1"),
                normalize_path(target.decode("latin-1")),
                _headers(head, names) if names else NO_HEADERS,
            )
        return None if decision.allowed else self._refuse(peer, state[1], decision, dstats)

    def _refuse(
        self, peer: Peer, src: Source | None, decision: Decision, dstats: DestinationStats
    ) -> RouteResult:
        self.denied += 1
        caller = peer.identity or f"anonymous ({peer.address.decode('latin-1')})"
        self.log.denied(caller, self.destination, decision)
        return RouteResult.answer(local_reply.FORBIDDEN_BY_POLICY, MESSAGE, dstats=dstats)

    def describe(self) -> dict[str, object]:
        pol = self.compiled
        return {
            "destination": self.destination,
            "rules": [str(r) for r in pol.rules] if pol else [],
            "defaultAction": ("allow" if pol.default_allow else "deny") if pol else "allow",
            "isolated": pol.isolated if pol else False,
            "enforced": self.policy is not None,
            "denied": self.denied,
        }

    def __repr__(self) -> str:
        pol = self.compiled
        rules = len(pol.rules) if pol else 0
        return f"<InboundAuthz {self.destination} rules={rules} enforced={self.policy is not None}>"
