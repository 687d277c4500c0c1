"""Errors of the sidecar's data plane; each carries the local reply it turns into."""

from __future__ import annotations


class ProxyError(Exception):
    """An error answered with a local reply: an HTTP status and a machine-readable reason."""

    status = 500
    reason = "internal_error"

    def __init__(self, message: str, *, status: int | None = None, reason: str | None = None):
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status
        if reason is not None:
            self.reason = reason


class BadMessageError(ProxyError):
    """A peer sent bytes that are not a valid HTTP/1.1 message: never forwarded.

    Requests answer 400, 431 (header section too large) or 501 (unknown transfer coding);
    an upstream's bad response becomes 502 `upstream_protocol_error`.
    """

    status = 400
    reason = "bad_request"


class SidecarStartError(Exception):
    """The sidecar cannot start (the mesh CA refused its identity); the message says why."""


# -- policy from the control plane (never a local reply; push errors: wire/errors.py) ---


class PolicyError(Exception):
    """A pushed snapshot this sidecar cannot apply; the message goes into the NACK."""
