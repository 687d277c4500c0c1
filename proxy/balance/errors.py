"""Errors of the balance package."""

from __future__ import annotations


class PolicyError(ValueError):
    """A load-balancer policy is invalid; `field` names the offending field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message
