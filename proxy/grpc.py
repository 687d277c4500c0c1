"""gRPC over the mesh: who is a gRPC caller, its deadline, and local replies as gRPC errors.

A request is gRPC when its `content-type` is `application/grpc` (or `application/grpc+...`,
`application/grpc;...`), per the gRPC over HTTP/2 protocol. A gRPC client cannot read an
HTTP error page, so the sidecar's own answers to it are "Trailers-Only" responses:
`:status 200`, `content-type: application/grpc`, `grpc-status`, `grpc-message`, plus the
usual `x-tether-error` reason. Codes follow the reason (the issue's table), else the
HTTP status as gRPC maps it (doc/http-grpc-status-mapping.md in the gRPC repository).
"""

from __future__ import annotations

from urllib.parse import quote

from proxy import local_reply

OK = 0
CANCELLED = 1
UNKNOWN = 2
DEADLINE_EXCEEDED = 4
UNIMPLEMENTED = 12
INTERNAL = 13
UNAVAILABLE = 14
RESOURCE_EXHAUSTED = 8
PERMISSION_DENIED = 7
UNAUTHENTICATED = 16

# Reasons whose gRPC code the HTTP status would not say right.
_BY_REASON: dict[str, int] = {
    local_reply.UNKNOWN_SERVICE: UNAVAILABLE,
    local_reply.NO_HEALTHY_UPSTREAM: UNAVAILABLE,
    local_reply.UPSTREAM_CONNECT_ERROR: UNAVAILABLE,
    local_reply.UPSTREAM_RESET: UNAVAILABLE,
    local_reply.DRAINING: UNAVAILABLE,
    local_reply.UPSTREAM_TIMEOUT: DEADLINE_EXCEEDED,
    local_reply.REQUEST_TIMEOUT: DEADLINE_EXCEEDED,
    local_reply.PER_TRY_TIMEOUT: DEADLINE_EXCEEDED,
    local_reply.UPSTREAM_CONNECT_TIMEOUT: UNAVAILABLE,
    local_reply.FORBIDDEN_BY_POLICY: PERMISSION_DENIED,
    local_reply.OVERFLOW: RESOURCE_EXHAUSTED,
    "rate_limited": RESOURCE_EXHAUSTED,
    local_reply.EGRESS_DENIED: PERMISSION_DENIED,
    "forbidden": PERMISSION_DENIED,
    "unauthorized": PERMISSION_DENIED,
    "mtls_required": UNAUTHENTICATED,
    local_reply.UPSTREAM_PROTOCOL_ERROR: INTERNAL,
    local_reply.UPSTREAM_RESPONSE_TOO_LARGE: INTERNAL,
}
_BY_HTTP: dict[int, int] = {
    400: INTERNAL,
    401: UNAUTHENTICATED,
    403: PERMISSION_DENIED,
    404: UNIMPLEMENTED,
    429: UNAVAILABLE,
    502: UNAVAILABLE,
    503: UNAVAILABLE,
    504: UNAVAILABLE,
}
# A gRPC status as the HTTP status it stands for, to outlier detection (Envoy's
# Grpc::Utility::grpcToHttpStatus): UNAVAILABLE counts as a 503, and so on.
_TO_HTTP: dict[int, int] = {
    OK: 200,
    CANCELLED: 499,
    UNKNOWN: 500,
    3: 400,  # INVALID_ARGUMENT
    DEADLINE_EXCEEDED: 504,
    5: 404,  # NOT_FOUND
    6: 409,  # ALREADY_EXISTS
    PERMISSION_DENIED: 403,
    RESOURCE_EXHAUSTED: 429,
    9: 400,  # FAILED_PRECONDITION
    10: 409,  # ABORTED
    11: 400,  # OUT_OF_RANGE
    UNIMPLEMENTED: 501,
    INTERNAL: 500,
    UNAVAILABLE: 503,
    15: 500,  # DATA_LOSS
    UNAUTHENTICATED: 401,
}
# grpc-timeout units (the protocol: at most 8 digits, then one of these).
_UNITS: dict[int, float] = {
    ord("H"): 3600.0,
    ord("M"): 60.0,
    ord("S"): 1.0,
    ord("m"): 1e-3,
    ord("u"): 1e-6,
    ord("n"): 1e-9,
}


def is_grpc(content_type: bytes | None) -> bool:
    if content_type is None or not content_type.startswith(b"application/grpc"):
        return False
    rest = content_type[16:17]
    return rest in (b"", b"+", b";")


def status_for(reason: str, http_status: int) -> int:
    """The gRPC status code of a local reply."""
    code = _BY_REASON.get(reason)
    if code is not None:
        return code
    return _BY_HTTP.get(http_status, UNKNOWN)


def http_status(code: int) -> int:
    """The HTTP status a gRPC status stands for (500 for a code gRPC does not define)."""
    return _TO_HTTP.get(code, 500)


def status_of(fields: list[tuple[bytes, bytes]] | None) -> int:
    """The `grpc-status` in a HEADERS block (trailers, or a Trailers-Only response), -1
    when it has none, UNKNOWN when it is not a number."""
    for name, value in fields or ():
        if name == b"grpc-status":
            return int(value) if value.isdigit() and len(value) < 4 else UNKNOWN
    return -1


def parse_timeout(value: bytes) -> float | None:
    """A `grpc-timeout` value in seconds, or None when malformed (then it is ignored)."""
    if not 2 <= len(value) <= 9 or not value[:-1].isdigit():
        return None
    unit = _UNITS.get(value[-1])
    if unit is None:
        return None
    return int(value[:-1]) * unit


def reply_headers(reason: str, message: str, http_status: int) -> list[tuple[bytes, bytes]]:
    """A Trailers-Only gRPC error for a local reply (the whole response, END_STREAM)."""
    return [
        (b":status", b"200"),
        (b"content-type", b"application/grpc"),
        (b"grpc-status", b"%d" % status_for(reason, http_status)),
        # Percent-encoded, as the protocol asks of grpc-message.
        (b"grpc-message", quote(message, safe=" !#$&'()*+,/:;=?@[]~").encode()),
        (b"x-tether-error", reason.encode()),
    ]
