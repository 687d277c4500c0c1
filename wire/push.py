"""The push protocol's messages: encode, decode and check them, without any I/O.

One definition of the wire format (docs/push-protocol.md) for both ends: the sidecar's
policy client and the control plane's push server, both of which import this package
and nothing of each other. Every message is one JSON object in one WebSocket
text frame and carries `proto`, the protocol version: a peer speaking another version
is refused with a clear error instead of being misread.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

# Re-exported: both ends catch them as `wire.push.PushProtocolError` and so on.
from wire.errors import ProtocolVersionError as ProtocolVersionError
from wire.errors import PushProtocolError as PushProtocolError

PROTOCOL = 1
# Offered in the WebSocket handshake too, so a proxy in between (or a log) shows it.
SUBPROTOCOL = f"tether.push.v{PROTOCOL}"
PATH = "/api/v1/push"
MAX_MESSAGE = 16 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class NodeIdentity:
    """Who a sidecar is: the instance it fronts."""

    service: str
    namespace: str = "default"
    instance: str = ""
    zone: str = ""

    @property
    def key(self) -> str:
        """A stable id for this sidecar across reconnects."""
        return f"{self.namespace}/{self.service}/{self.instance}"


@dataclass(frozen=True, slots=True)
class Hello:
    node: NodeIdentity
    calls: tuple[str, ...] = ()
    version: int = 0
    hash: str = ""


@dataclass(frozen=True, slots=True)
class Interest:
    add: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Snapshot:
    version: int
    hash: str
    nonce: str
    resources: tuple[dict[str, Any], ...]


@dataclass(frozen=True, slots=True)
class Ack:
    version: int
    nonce: str


@dataclass(frozen=True, slots=True)
class Nack:
    version: int
    nonce: str
    error: str


@dataclass(frozen=True, slots=True)
class ErrorMessage:
    """Sent by the control plane just before it closes a connection it refuses."""

    code: str
    message: str


Message = Hello | Interest | Snapshot | Ack | Nack | ErrorMessage


def service_key(service: str, namespace: str) -> str:
    """The name the protocol uses for a service: `orders.payments` (service.namespace)."""
    return f"{service}.{namespace}"


def split_service_key(key: str) -> tuple[str, str]:
    """`orders.payments` -> ("orders", "payments"); the namespace never holds a dot."""
    service, dot, namespace = key.rpartition(".")
    if not dot or not service or not namespace:
        raise PushProtocolError(f"service {key!r} is not of the form service.namespace")
    return service, namespace


def canonical_json(resources: Sequence[dict[str, Any]]) -> str:
    """The one byte form both ends hash: sorted keys, no spaces."""
    return json.dumps(list(resources), sort_keys=True, separators=(",", ":"))


def content_hash(canonical: str) -> str:
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


# -- encoding ---------------------------------------------------------------------------


def _dump(obj: dict[str, Any]) -> str:
    return json.dumps(obj, separators=(",", ":"))


def encode(msg: Message) -> str:
    if isinstance(msg, Hello):
        return _dump(
            {
                "proto": PROTOCOL,
                "type": "hello",
                "node": {
                    "service": msg.node.service,
                    "namespace": msg.node.namespace,
                    "instance": msg.node.instance,
                    "zone": msg.node.zone,
                },
                "calls": list(msg.calls),
                "version": msg.version,
                "hash": msg.hash,
            }
        )
    if isinstance(msg, Interest):
        return _dump({"proto": PROTOCOL, "type": "interest", "add": list(msg.add)})
    if isinstance(msg, Snapshot):
        return encode_snapshot(msg.version, msg.hash, msg.nonce, canonical_json(msg.resources))
    if isinstance(msg, Ack):
        return _dump({"proto": PROTOCOL, "type": "ack", "version": msg.version, "nonce": msg.nonce})
    if isinstance(msg, Nack):
        return _dump(
            {
                "proto": PROTOCOL,
                "type": "nack",
                "version": msg.version,
                "nonce": msg.nonce,
                "error": msg.error,
            }
        )
    return _dump({"proto": PROTOCOL, "type": "error", "code": msg.code, "message": msg.message})


def encode_snapshot(version: int, hash_: str, nonce: str, resources_json: str) -> str:
    """A snapshot around resources already in canonical JSON (encoded once per push)."""
    head = _dump({"proto": PROTOCOL, "type": "snapshot", "version": version, "hash": hash_})
    return f'{head[:-1]},"nonce":{json.dumps(nonce)},"resources":{resources_json}}}'


# -- decoding ---------------------------------------------------------------------------


def _field(
    obj: dict[str, Any], name: str, kind: type | tuple[type, ...], default: Any = ...
) -> Any:
    if name not in obj:
        if default is ...:
            raise PushProtocolError(f"{obj.get('type', 'message')}: missing field {name!r}")
        return default
    value = obj[name]
    # bool is an int in Python; a version must not be `true`.
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
        raise PushProtocolError(f"{obj.get('type', 'message')}: field {name!r} has the wrong type")
    return value


def _names(obj: dict[str, Any], name: str) -> tuple[str, ...]:
    values = _field(obj, name, list, [])
    out = []
    for v in values:
        if not isinstance(v, str):
            raise PushProtocolError(f"{obj.get('type')}: {name} must be a list of strings")
        split_service_key(v)
        out.append(v)
    return tuple(out)


def decode(text: str | bytes) -> Message:
    """Parse one frame. Raises ProtocolVersionError for another version, before
    reading anything else of the message, and PushProtocolError for anything invalid."""
    try:
        obj = json.loads(text)
    except (ValueError, UnicodeDecodeError) as exc:
        raise PushProtocolError(f"not JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise PushProtocolError("a message is a JSON object")
    proto = obj.get("proto")
    if proto != PROTOCOL:
        raise ProtocolVersionError(
            f"peer speaks push protocol {proto!r}, this side speaks {PROTOCOL}"
            if proto is not None
            else f"message without a protocol version (this side speaks {PROTOCOL})"
        )
    kind = obj.get("type")
    if kind == "hello":
        node = _field(obj, "node", dict)
        service = _field(node, "service", str)
        if not service:
            raise PushProtocolError("hello: node.service is empty")
        identity = NodeIdentity(
            service=service,
            namespace=_field(node, "namespace", str, "default") or "default",
            instance=_field(node, "instance", str, ""),
            zone=_field(node, "zone", str, ""),
        )
        return Hello(
            node=identity,
            calls=_names(obj, "calls"),
            version=_field(obj, "version", int, 0),
            hash=_field(obj, "hash", str, ""),
        )
    if kind == "interest":
        return Interest(add=_names(obj, "add"))
    if kind == "snapshot":
        resources = _field(obj, "resources", list)
        if not all(isinstance(r, dict) for r in resources):
            raise PushProtocolError("snapshot: resources must be JSON objects")
        return Snapshot(
            version=_field(obj, "version", int),
            hash=_field(obj, "hash", str),
            nonce=_field(obj, "nonce", str),
            resources=tuple(resources),
        )
    if kind == "ack":
        return Ack(version=_field(obj, "version", int), nonce=_field(obj, "nonce", str))
    if kind == "nack":
        return Nack(
            version=_field(obj, "version", int),
            nonce=_field(obj, "nonce", str),
            error=_field(obj, "error", str),
        )
    if kind == "error":
        return ErrorMessage(code=_field(obj, "code", str), message=_field(obj, "message", str, ""))
    raise PushProtocolError(f"unknown message type {kind!r}")


def union(names: Iterable[str], more: Iterable[str]) -> tuple[str, ...]:
    """Service names in first-seen order without repeats."""
    return tuple(dict.fromkeys((*names, *more)))
