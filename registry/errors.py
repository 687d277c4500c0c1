"""Errors the registry answers with; the HTTP layer turns each into a Consul-style reply."""

from __future__ import annotations


class RegistryError(Exception):
    """An error with an HTTP status; the message is sent as Consul does, as plain text."""

    status = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class BadRequestError(RegistryError):
    status = 400


class PermissionDeniedError(RegistryError):
    status = 403

    def __init__(self, message: str = "Permission denied") -> None:
        super().__init__(message)


class NotFoundError(RegistryError):
    status = 404


class MethodNotAllowedError(RegistryError):
    status = 405


class ConflictError(RegistryError):
    status = 409


class TooLargeError(RegistryError):
    status = 413


class NotSupportedError(RegistryError):
    """A Consul endpoint this registry does not have (501: every client treats it as an error)."""

    status = 501


class StoreError(RegistryError):
    """The durable store could not commit a write; nothing was applied."""

    status = 500


class DataDirError(Exception):
    """The data directory cannot be used (a damaged database); the registry cannot start."""
