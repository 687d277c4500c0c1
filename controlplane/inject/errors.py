"""Errors of sidecar injection; each names the document and field at fault."""

from __future__ import annotations


class InjectError(Exception):
    """Input that cannot be injected: bad YAML, an unknown format, a bad annotation."""


class AnnotationError(InjectError):
    """A `tether.dev/*` annotation (or an option standing for one) has a bad value."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class CertificateError(InjectError):
    """The webhook's certificate or key cannot be loaded."""
