"""A stream's request fields as a `RequestHead`, and the fields it goes upstream with.

The router, policies, mirrors, tracing and the access log read an HTTP/2 request as
they read an HTTP/1 one: a `RequestHead` (proxy/heads.py) with its method, target
(`:path`), host (`:authority`, else `host`) and the fields that are not pseudo-headers,
`version` "2", its trace fields noted (`traceparent`, `b3`) as HTTP/1's codec notes
them. Upstream, the head goes out again as HTTP/2 fields: pseudo-headers
first, field names lower-case (RFC 9113 8.2.1: a policy's request edits may name `X-Y`),
`x-forwarded-for`/`-proto`, the caller's verified identity and an `x-request-id`.

Fields a proxy does not pass on are dropped from the head: `host` (carried as
`:authority`; RFC 9113 8.2.2's connection-specific fields h2 refuses already), and what
only the sidecar may say (`x-forwarded-*`, `x-tether-peer-identity`, proxy/fields.py): a
value arriving from outside is not believed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final, NamedTuple

from proxy import grpc
from proxy.heads import RequestHead

if TYPE_CHECKING:
    from proxy.h2_downstream import H2DownstreamConnection
    from proxy.h2_link import Fields
    from proxy.route_result import RouteResult

_DROP: Final = frozenset(
    {b"host", b"x-forwarded-for", b"x-forwarded-proto", b"x-tether-peer-identity"}
)


class StreamRequest(NamedTuple):
    head: RequestHead
    grpc: bool  # a gRPC call (its content-type)
    timeout: float | None  # the caller's grpc-timeout, in seconds


def request_head(headers: Fields) -> StreamRequest:
    """The request of a HEADERS block (h2 checked its pseudo-headers already)."""
    method = path = authority = b""
    host = None
    content_type = None
    timeout = None
    fields: Fields = []
    for name, value in headers:
        if name[:1] == b":":
            if name == b":method":
                method = value
            elif name == b":path":
                path = value
            elif name == b":authority":
                authority = value
        elif name == b"host":
            host = value
        else:
            if name == b"content-type":
                content_type = value
            elif name == b"grpc-timeout":
                timeout = grpc.parse_timeout(value)
            fields.append((name, value))
    head = RequestHead(
        method=method, target=path or b"/", host=authority or host, keep_alive=True, version="2"
    )
    head.headers = [(n, v) for n, v in fields if n not in _DROP]
    for n, v in fields:
        if n == b"x-request-id":
            head.request_id = v
        elif n == b"x-forwarded-for":
            head.forwarded_for = v
        elif n == b"traceparent":
            # Noted as HTTP/1's codec notes them (proxy/trace_context.py reads these).
            if head.traceparent is None:
                head.traceparent = v
        elif n == b"b3" or n[:5] == b"x-b3-":
            head.b3 = True
    return StreamRequest(head, grpc.is_grpc(content_type), timeout)


def upstream_fields(
    head: RequestHead, route: RouteResult | None, conn: H2DownstreamConnection
) -> Fields:
    """The fields of the request as it goes upstream (the route may rewrite its path)."""
    path = route.path if route is not None and route.path is not None else head.target
    front = conn.front
    out: Fields = [
        (b":method", head.method),
        (b":scheme", front.scheme),
        (b":authority", head.host or b""),
        (b":path", path),
    ]
    # Lowercase (RFC 9113 8.2.1): a policy's request edits may name X-Y.
    out.extend([(n.lower(), v) for n, v in head.headers])
    ff = head.forwarded_for
    peer = conn.peer.address
    out.append((b"x-forwarded-for", peer if ff is None else ff + b", " + peer))
    out.append((b"x-forwarded-proto", front.scheme))
    identity = conn.peer.identity
    if identity:  # the caller's SPIFFE ID, proved by its certificate (inbound, mTLS)
        out.append((b"x-tether-peer-identity", identity.encode()))
    if head.request_id is None:
        head.request_id = rid = front.server.new_request_id()
        out.append((b"x-request-id", rid))
    return out
