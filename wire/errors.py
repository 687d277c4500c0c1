"""Errors of the wire package: a push-protocol message that cannot be taken."""

from __future__ import annotations


class PushProtocolError(Exception):
    """A push-protocol message that is not valid (bad JSON, field or type)."""

    code = "bad_message"


class ProtocolVersionError(PushProtocolError):
    """The peer speaks another push-protocol version (mixed versions during an upgrade)."""

    code = "unsupported_protocol"
