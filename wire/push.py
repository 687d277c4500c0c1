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
import math
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

# Stats reports (sidecar -> control plane): upper bounds (seconds) of the latency
# histogram's buckets, the last bucket being +Inf; the sidecar's histograms
# (proxy/stats.py) use these, so a report's buckets add up across sidecars.
LATENCY_BOUNDS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
# Response classes of a report's `classes`: no status (ended without a response), 1xx..5xx.
STATUS_CLASSES = ("none", "1xx", "2xx", "3xx", "4xx", "5xx")
# A report names at most this many destinations (a sidecar sends its busiest), and is
# at most this many bytes: the control plane drops bigger ones.
MAX_STATS_ROWS = 256
MAX_STATS_BYTES = 256 * 1024


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


@dataclass(frozen=True, slots=True)
class StatsRow:
    """Requests one listener of a sidecar handled for one destination, over a report's
    `seconds`: counts by response class, latency histogram counts, and counters that
    later features fill (retries, outlier ejections)."""

    listener: str
    destination: str
    subset: str = ""
    classes: tuple[int, ...] = (0,) * len(STATUS_CLASSES)
    buckets: tuple[int, ...] = (0,) * (len(LATENCY_BOUNDS) + 1)
    latency_sum: float = 0.0
    retries: int = 0
    ejections: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "listener": self.listener,
            "destination": self.destination,
            "subset": self.subset,
            "classes": list(self.classes),
            "buckets": list(self.buckets),
            "sum": round(self.latency_sum, 6),
            "retries": self.retries,
            "ejections": self.ejections,
        }


@dataclass(frozen=True, slots=True)
class Stats:
    """What a sidecar handled since its previous report (deltas, not totals)."""

    seconds: float
    rows: tuple[StatsRow, ...]
    # When the sidecar's mesh certificate expires (Unix time); None without mTLS.
    cert_expiry: float | None = None


@dataclass(frozen=True, slots=True)
class Bundle:
    """The mesh CA's trust bundle (control plane -> sidecar): sent after the hello and
    again whenever the trusted roots change (a rotation, a retired root). PEM roots."""

    trust_domain: str
    roots: tuple[str, ...]
    index: int = 0


Message = Hello | Interest | Snapshot | Ack | Nack | ErrorMessage | Stats | Bundle


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
    if isinstance(msg, Stats):
        return _dump(
            {
                "proto": PROTOCOL,
                "type": "stats",
                "seconds": round(msg.seconds, 3),
                "rows": [r.to_dict() for r in msg.rows],
                **({} if msg.cert_expiry is None else {"certExpiry": round(msg.cert_expiry)}),
            }
        )
    if isinstance(msg, Bundle):
        return _dump(
            {
                "proto": PROTOCOL,
                "type": "bundle",
                "trustDomain": msg.trust_domain,
                "roots": list(msg.roots),
                "index": msg.index,
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
    if kind == "stats":
        return _stats(obj)
    if kind == "bundle":
        return _bundle(obj)
    if kind == "error":
        return ErrorMessage(code=_field(obj, "code", str), message=_field(obj, "message", str, ""))
    raise PushProtocolError(f"unknown message type {kind!r}")


def _counts(row: dict[str, Any], name: str, size: int) -> tuple[int, ...]:
    values = _field(row, name, list)
    if len(values) != size or not all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values
    ):
        raise PushProtocolError(f"{name} must be {size} counts (non-negative integers)")
    return tuple(values)


def _count(row: dict[str, Any], name: str) -> int:
    value = _field(row, name, int, 0)
    if value < 0:
        raise PushProtocolError(f"{name} must not be negative")
    return int(value)


def _stats(obj: dict[str, Any]) -> Stats:
    seconds = _field(obj, "seconds", (int, float))
    # A first report covers the sidecar's whole life so far: days are fine, NaN is not.
    if isinstance(seconds, bool) or not 0 < seconds < math.inf:
        raise PushProtocolError("stats: seconds must be a positive number")
    raw = _field(obj, "rows", list)
    if len(raw) > MAX_STATS_ROWS:
        raise PushProtocolError(f"stats: more than {MAX_STATS_ROWS} rows")
    rows = []
    for i, item in enumerate(raw):
        if not isinstance(item, dict):
            raise PushProtocolError("stats: rows must be JSON objects")
        try:
            rows.append(_stats_row(item))
        except PushProtocolError as exc:
            raise PushProtocolError(f"stats: rows[{i}]: {exc}") from None
    expiry = obj.get("certExpiry")
    if expiry is not None and (
        isinstance(expiry, bool) or not isinstance(expiry, (int, float)) or not 0 <= expiry < 1e11
    ):
        raise PushProtocolError("stats: certExpiry must be a Unix time")
    return Stats(
        seconds=float(seconds),
        rows=tuple(rows),
        cert_expiry=float(expiry) if expiry is not None else None,
    )


def _stats_row(item: dict[str, Any]) -> StatsRow:
    latency_sum = _field(item, "sum", (int, float), 0.0)
    if isinstance(latency_sum, bool) or not 0 <= latency_sum < math.inf:
        raise PushProtocolError("sum must be a non-negative number")
    names = [_field(item, k, str, "") for k in ("listener", "destination", "subset")]
    if not names[0] or not names[1] or any(len(n) > 256 for n in names):
        raise PushProtocolError("listener and destination are 1 to 256 characters")
    return StatsRow(
        listener=names[0],
        destination=names[1],
        subset=names[2],
        classes=_counts(item, "classes", len(STATUS_CLASSES)),
        buckets=_counts(item, "buckets", len(LATENCY_BOUNDS) + 1),
        latency_sum=float(latency_sum),
        retries=_count(item, "retries"),
        ejections=_count(item, "ejections"),
    )


MAX_BUNDLE_ROOTS = 16


def _bundle(obj: dict[str, Any]) -> Bundle:
    roots = _field(obj, "roots", list)
    if not roots or len(roots) > MAX_BUNDLE_ROOTS:
        raise PushProtocolError(f"bundle: 1 to {MAX_BUNDLE_ROOTS} roots")
    if not all(isinstance(r, str) and r.startswith("-----BEGIN CERTIFICATE-----") for r in roots):
        raise PushProtocolError("bundle: roots must be PEM certificates")
    trust_domain = _field(obj, "trustDomain", str)
    if not trust_domain:
        raise PushProtocolError("bundle: trustDomain is empty")
    return Bundle(trust_domain=trust_domain, roots=tuple(roots), index=_field(obj, "index", int, 0))


def union(names: Iterable[str], more: Iterable[str]) -> tuple[str, ...]:
    """Service names in first-seen order without repeats."""
    return tuple(dict.fromkeys((*names, *more)))
