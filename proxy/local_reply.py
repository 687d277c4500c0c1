"""Local replies: responses the sidecar answers itself, with a reason header and JSON body.

Every local reply carries `x-tether-error: <reason>` and a short body
`{"error": reason, "message": ...}`, so a caller (or a test) can tell a sidecar's answer
from the application's without parsing prose.
"""

from __future__ import annotations

import json
import math

UNKNOWN_SERVICE = "unknown_service"
NO_HEALTHY_UPSTREAM = "no_healthy_upstream"
UPSTREAM_CONNECT_ERROR = "upstream_connect_error"
UPSTREAM_RESET = "upstream_reset"
UPSTREAM_TIMEOUT = "upstream_timeout"
UPSTREAM_PROTOCOL_ERROR = "upstream_protocol_error"
UPSTREAM_RESPONSE_TOO_LARGE = "upstream_response_too_large"
EGRESS_DENIED = "egress_denied"
OVERFLOW = "overflow"
BAD_REQUEST = "bad_request"
HEADERS_TOO_LARGE = "request_header_fields_too_large"
REQUEST_LINE_TOO_LONG = "request_line_too_long"
NOT_IMPLEMENTED = "not_implemented"
HEADER_TIMEOUT = "request_header_timeout"
PROXY_LOOP = "proxy_loop"
DRAINING = "draining"
FAULT_ABORT = "fault_abort"
RATE_LIMITED = "rate_limited"
REDIRECT = "redirect"
FORBIDDEN_BY_POLICY = "forbidden_by_policy"
REQUEST_TIMEOUT = "request_timeout"
PER_TRY_TIMEOUT = "per_try_timeout"
UPSTREAM_CONNECT_TIMEOUT = "upstream_connect_timeout"
RETRY_BUDGET_EXHAUSTED = "retry_budget_exhausted"
# Plaintext at an inbound port that accepts mutual TLS only (proxy/tls.py).
MTLS_REQUIRED = "mtls_required"
# The TLS handshake with a remote sidecar failed, or it is not the destination.
UPSTREAM_TLS_ERROR = "upstream_tls_error"
# The health-check listener serves the app's health path only (proxy/expose.py).
NOT_EXPOSED = "not_exposed"
# Counted with the local replies, though no reply is sent: an HTTP/2 connection closed
# with GOAWAY for resetting streams too fast (CVE-2023-44487), or for a protocol error.
H2_RAPID_RESET = "h2_rapid_reset"
H2_PROTOCOL_ERROR = "h2_protocol_error"

# Status and default message per reason; the caller may give a more precise message.
REPLIES: dict[str, tuple[int, str]] = {
    UNKNOWN_SERVICE: (404, "no such service in the mesh"),
    NO_HEALTHY_UPSTREAM: (503, "the service has no healthy endpoint"),
    OVERFLOW: (503, "the upstream's connection pool is full"),
    DRAINING: (503, "the sidecar is shutting down"),
    UPSTREAM_CONNECT_ERROR: (502, "could not connect to the upstream"),
    UPSTREAM_RESET: (502, "the upstream closed the connection before a full response"),
    UPSTREAM_PROTOCOL_ERROR: (502, "the upstream sent an invalid HTTP response"),
    UPSTREAM_RESPONSE_TOO_LARGE: (502, "the upstream's response head is over the limits"),
    UPSTREAM_TIMEOUT: (504, "the upstream did not answer in time"),
    EGRESS_DENIED: (403, "calls outside the mesh are denied by policy"),
    FORBIDDEN_BY_POLICY: (403, "the destination's authorization policy refuses this call"),
    BAD_REQUEST: (400, "malformed request"),
    REQUEST_LINE_TOO_LONG: (400, "request line longer than 8 KiB"),
    HEADERS_TOO_LARGE: (431, "request header section larger than 64 KiB"),
    NOT_IMPLEMENTED: (501, "not implemented"),
    HEADER_TIMEOUT: (408, "the request head did not arrive in time"),
    PROXY_LOOP: (508, "the request would loop back into this sidecar"),
    FAULT_ABORT: (503, "aborted by the route's fault injection"),
    RATE_LIMITED: (429, "over the route's rate limit"),
    REDIRECT: (302, "redirected by the route"),
    REQUEST_TIMEOUT: (504, "no response within the request timeout"),
    PER_TRY_TIMEOUT: (504, "no response within the per-try timeout"),
    UPSTREAM_CONNECT_TIMEOUT: (503, "the connection to the upstream timed out"),
    RETRY_BUDGET_EXHAUSTED: (503, "the failure was not retried: the retry budget is spent"),
    MTLS_REQUIRED: (400, "this port accepts mutual TLS only"),
    NOT_EXPOSED: (404, "only the app's health path is served here"),
    UPSTREAM_TLS_ERROR: (502, "the upstream's TLS identity could not be verified"),
}

_PHRASES = {
    301: b"Moved Permanently",
    302: b"Found",
    303: b"See Other",
    307: b"Temporary Redirect",
    308: b"Permanent Redirect",
    400: b"Bad Request",
    403: b"Forbidden",
    404: b"Not Found",
    408: b"Request Timeout",
    417: b"Expectation Failed",
    429: b"Too Many Requests",
    431: b"Request Header Fields Too Large",
    500: b"Internal Server Error",
    501: b"Not Implemented",
    502: b"Bad Gateway",
    503: b"Service Unavailable",
    504: b"Gateway Timeout",
    508: b"Loop Detected",
}


def render(
    reason: str,
    message: str | None = None,
    *,
    status: int | None = None,
    close: bool = False,
    head_only: bool = False,
    request_id: bytes | None = None,
    headers: tuple[tuple[bytes, bytes], ...] = (),
) -> bytes:
    """The full bytes of a local reply (head and body) for one reason."""
    default_status, default_message = REPLIES.get(reason, (500, "internal error"))
    code = status if status is not None else default_status
    body = json.dumps({"error": reason, "message": message or default_message}).encode()
    lines = [
        b"HTTP/1.1 %d %s" % (code, _PHRASES.get(code, b"Error")),
        b"content-type: application/json",
        b"content-length: %d" % len(body),
        b"x-tether-error: " + reason.encode(),
    ]
    if request_id is not None:
        lines.append(b"x-request-id: " + request_id)
    for name, value in headers:
        lines.append(name + b": " + value)
    if close:
        lines.append(b"connection: close")
    head = b"\r\n".join(lines) + b"\r\n\r\n"
    return head if head_only else head + body


def retry_after(wait: float) -> bytes:
    """A Retry-After value in whole seconds (RFC 9110 10.2.3), at least 1."""
    return b"%d" % max(1, math.ceil(wait))
