"""What a router returns for one request (`RouteResult`), and who asked (`Peer`).

A router (proxy/dispatch.py, proxy/policy_router.py) reads a request head and the peer
and returns a `RouteResult`; it never writes into the connection or the exchange. The
exchange (proxy/exchange.py) acts on the result: a local reply, or the pool to take a
connection from, with the endpoint the balancer picked and the tracker to tell of its
start and end, the destination's stats, the origin-form path when the request named an
absolute URI, response header edits and the request timeout. Later issues add their
settings here (retry and hedging, mirroring, fault injection) rather than to the
connection. When a router must wait (discovery's first answer about a service),
`pending` is an awaitable of the final result; the connection awaits it and hands the
answer to the exchange.
"""

from __future__ import annotations

import copy
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from proxy.balance import Balancer, Endpoint
    from proxy.cluster_spec import ClusterSpec
    from proxy.heads import Fields
    from proxy.mirror import MirrorTap
    from proxy.pool import Pool
    from proxy.resilience import Resilience
    from proxy.stats import DestinationStats


class Peer:
    """The downstream side of a connection: its address now, its SPIFFE identity once
    mTLS lands. One per connection; `routing` is the router's own per-connection state
    (the hashing balancers' pick context), which the router alone reads and writes."""

    __slots__ = ("address", "identity", "identity_line", "routing", "source", "xff", "xff_line")

    def __init__(self, address: bytes, identity: str | None = None) -> None:
        self.address = address
        self.identity = identity
        self.routing: Any = None
        # The X-Forwarded-For this peer adds (as a field, and as a ready line).
        self.xff = (b"X-Forwarded-For", address)
        self.xff_line = b"X-Forwarded-For: " + address + b"\r\n"
        # What the inbound sidecar tells the app of a caller proven by mTLS.
        self.identity_line = b""
        # The caller's service as `svc.ns`, from its verified identity ("" without one):
        # the inbound listener's `source` (stats, spans, access log), never from a header.
        self.source = ""
        if identity:
            self.set_identity(identity)

    def set_identity(self, identity: str) -> None:
        """The caller's SPIFFE ID from its certificate (the inbound listener's check)."""
        self.identity = identity
        self.identity_line = b"x-tether-peer-identity: " + identity.encode() + b"\r\n"
        self.source = source_of_identity(identity)

    def __repr__(self) -> str:
        who = f" {self.identity}" if self.identity else ""
        return f"<Peer {self.address.decode('latin-1')}{who}>"


def source_of_identity(identity: str) -> str:
    """`spiffe://<td>/ns/<ns>/dc/<dc>/svc/<svc>` (already verified) -> `svc.ns`; "" for
    anything else. Plain string work: this module never loads the X.509 code."""
    parts = identity.split("/")
    if len(parts) != 9 or parts[3] != "ns" or parts[7] != "svc" or not parts[4] or not parts[8]:
        return ""
    return f"{parts[8]}.{parts[4]}"


@dataclass(frozen=True, slots=True)
class Reply:
    """A local reply a router decided on: reason (local_reply.py), optional message and
    status (default: the reason's), and whether the connection closes after it."""

    reason: str
    message: str | None = None
    status: int | None = None
    close: bool = False
    # Fields the reply carries besides its own (Retry-After, Location).
    headers: tuple[tuple[bytes, bytes], ...] = ()


class RouteResult:
    """Where one request goes. Exactly one of `reply`, `pool`, `tunnel`, `pending` is set.

    Never changed once made: a router may hand the same result to many requests (the
    outbound router keeps one per endpoint pool, the inbound one for every origin-form
    request); `replace` makes a changed copy."""

    __slots__ = (
        "dstats",
        "endpoint",
        "mirror",
        "path",
        "pending",
        "pool",
        "reply",
        "request_timeout",
        "resilience",
        "response_edit",
        "serve",
        "spec",
        "tracker",
        "tunnel",
    )

    def __init__(
        self,
        pool: Pool | None = None,
        *,
        dstats: DestinationStats | None = None,
        endpoint: Endpoint | None = None,
        tracker: Balancer | None = None,
        path: bytes | None = None,
        response_edit: Callable[[Fields], None] | None = None,
        request_timeout: float = 0.0,
        reply: Reply | None = None,
        tunnel: tuple[str, int] | None = None,
        pending: Awaitable[RouteResult] | None = None,
        spec: ClusterSpec | None = None,
        serve: bytes | None = None,
        mirror: MirrorTap | None = None,
        resilience: Resilience | None = None,
    ) -> None:
        self.pool = pool
        self.dstats = dstats
        # The endpoint the balancer picked and the balancer to tell of the request's
        # start and end (`tracker.on_start` / `on_end`; a layer may delegate).
        self.endpoint = endpoint
        self.tracker = tracker
        # The origin-form target when the request named an absolute URI (else None).
        self.path = path
        self.response_edit = response_edit
        self.request_timeout = request_timeout  # seconds; 0: the listener's
        self.reply = reply
        self.tunnel = tunnel  # CONNECT: (host, port) to dial
        self.pending = pending
        self.spec = spec  # the destination cluster's compiled settings (proxy/cluster_spec.py)
        # CONNECT to a mesh name (a gRPC client honouring http_proxy): answer 200 and
        # serve what follows on this connection here, each request (each HTTP/2
        # stream) routed on its own, instead of a blind tunnel. The authority named.
        self.serve = serve
        # Copy this request to a shadow (proxy/mirror.py); None: no copy.
        self.mirror = mirror
        # Retries, breakers and outlier detection for requests on this route
        # (proxy/resilience.py); None: none.
        self.resilience = resilience

    def replace(self, **changes: Any) -> RouteResult:
        """A copy with `changes` (the fields' names as keywords)."""
        # A copy, not a rebuild from `__slots__`: a compiled class has no `__slots__`.
        result = copy.copy(self)
        for name, value in changes.items():
            setattr(result, name, value)
        return result

    @classmethod
    def answer(
        cls,
        reason: str,
        message: str | None = None,
        *,
        status: int | None = None,
        close: bool = False,
        dstats: DestinationStats | None = None,
        headers: tuple[tuple[bytes, bytes], ...] = (),
    ) -> RouteResult:
        """A local reply instead of a destination."""
        return cls(reply=Reply(reason, message, status, close, headers), dstats=dstats)

    def __repr__(self) -> str:
        if self.reply is not None:
            return f"<RouteResult reply {self.reply.reason}>"
        if self.pending is not None:
            return "<RouteResult pending>"
        if self.serve is not None:
            return f"<RouteResult serve {self.serve.decode('latin-1')}>"
        if self.tunnel is not None:
            return f"<RouteResult tunnel {self.tunnel[0]}:{self.tunnel[1]}>"
        where = self.pool.name if self.pool is not None else "?"
        ep = f" endpoint={self.endpoint.id}" if self.endpoint is not None else ""
        return f"<RouteResult {where}{ep}>"
