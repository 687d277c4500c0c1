"""The control plane's errors; each knows the HTTP status and code the API answers with."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from controlplane.schema import Problem, SchemaError

__all__ = [
    "BadRequestError",
    "ConflictError",
    "ControlPlaneError",
    "NotFoundError",
    "PermissionDeniedError",
    "Problem",
    "RegistryUnavailableError",
    "SchemaError",
    "UnauthorizedError",
    "ValidationError",
]


class ControlPlaneError(Exception):
    status = 500
    code = "internal"
    # Headers the API answers with, besides the JSON error.
    headers: Mapping[str, str] = {}


class BadRequestError(ControlPlaneError):
    status = 400
    code = "bad_request"


class ValidationError(ControlPlaneError):
    """Documents rejected before anything was stored; `problems` names every field."""

    status = 422
    code = "invalid"

    def __init__(self, problems: Sequence[Problem]) -> None:
        self.problems = list(problems)
        errors = [p for p in self.problems if p.is_error]
        first = str(errors[0]) if errors else "invalid"
        more = len(errors) - 1
        super().__init__(first + (f" (and {more} more)" if more > 0 else ""))


class NotFoundError(ControlPlaneError):
    status = 404
    code = "not_found"


class ConflictError(ControlPlaneError):
    """A check-and-set write kept losing to other writers and was not applied."""

    status = 409
    code = "conflict"


class UnauthorizedError(ControlPlaneError):
    """The registry has ACLs on and the caller sent no token."""

    status = 401
    code = "unauthorized"
    # RFC 9110 §11.6.1: a 401 says how to authenticate.
    headers = {"WWW-Authenticate": 'Bearer realm="tether"'}


class PermissionDeniedError(ControlPlaneError):
    """The registry's ACLs refused the caller's token (or it does not have a permission)."""

    status = 403
    code = "permission_denied"


class RegistryUnavailableError(ControlPlaneError):
    status = 503
    code = "registry_unavailable"
