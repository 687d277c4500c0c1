"""User events: fire, the agent's buffer of the last 256, and Consul's hash-based index.

Events are gossip in Consul, not replicated state, so they live in the store's volatile
`events` table (memory only) and touch the `events` resource. The local agent keeps an
event only if its filters select it (node name, then a local service, then one of that
service's tags; Go regexps (RE2) matched anywhere in the name), as each Consul agent
does.

The index of an event listing is not a Raft index: Consul derives it from the ID of the
newest event listed (`uuidToUint64`: the first half of the UUID's hex XOR the second),
and a blocking list returns as soon as that value differs from the client's `index`.
"""

from __future__ import annotations

import uuid
from typing import Any

import re2

from registry.errors import BadRequestError, TooLargeError
from registry.store import Obj, Store, Txn

TABLE = "events"
RESOURCE = "events"
BUFFER = 256
SIZE_LIMIT = 512  # serf's UserEventSizeLimit


def uuid_to_index(event_id: str) -> int:
    """Consul's `uuidToUint64`."""
    lower = event_id[0:8] + event_id[9:13] + event_id[14:18]
    upper = event_id[19:23] + event_id[24:36]
    return int(lower, 16) ^ int(upper, 16)


def list_index(events: list[Obj]) -> int:
    """The index of a listing: 1 when empty (never 0, which would spin a watcher)."""
    return uuid_to_index(events[-1]["ID"]) if events else 1


def _compile(pattern: str, what: str) -> Any:
    """A filter as Go compiles it (RE2: linear time, so no pattern can stall us)."""
    if not pattern:
        return None
    options = re2.Options()
    options.log_errors = False
    try:
        return re2.compile(pattern, options=options)
    except re2.error as exc:
        reason = exc.args[0].decode() if exc.args and isinstance(exc.args[0], bytes) else exc
        raise BadRequestError(f"Invalid {what} filter: {reason}") from None


def ordered(store: Store) -> list[Obj]:
    """Buffered events, oldest first."""
    return sorted(store.table(TABLE).values(), key=lambda e: e["LTime"])


def selects_local(event: Obj, node: str, services: list[Obj]) -> bool:
    """Whether an event's filters select this agent (Consul's shouldProcessUserEvent)."""
    node_re = _compile(event["NodeFilter"], "node")
    if node_re is not None and not node_re.search(node):
        return False
    svc_re = _compile(event["ServiceFilter"], "service")
    if svc_re is None:
        return True
    tag_re = _compile(event["TagFilter"], "tag")
    for svc in services:
        if not svc_re.search(svc.get("Service", "")):
            continue
        if tag_re is None or any(tag_re.search(t) for t in svc.get("Tags") or []):
            return True
    return False


def make(name: str, payload: str | None, node: str, service: str, tag: str, raw_size: int) -> Obj:
    """A validated event (not yet buffered); `payload` is base64 or None."""
    if not name:
        raise BadRequestError("User event missing name")
    if tag and not service:
        raise BadRequestError("Cannot provide tag filter without service filter")
    _compile(node, "node")
    _compile(service, "service")
    _compile(tag, "tag")
    size = raw_size + len(name) + len(node) + len(service) + len(tag)
    if size > SIZE_LIMIT:
        raise TooLargeError(f"User event exceeds configured limit of {SIZE_LIMIT} bytes")
    return {
        "ID": str(uuid.uuid4()),
        "Name": name,
        "Payload": payload,
        "NodeFilter": node,
        "ServiceFilter": service,
        "TagFilter": tag,
        "Version": 1,
        "LTime": 0,
    }


def record(txn: Txn, store: Store, event: Obj) -> Obj:
    """Buffer an event the local agent received, dropping the oldest past 256."""
    current = ordered(store)
    ltime = (current[-1]["LTime"] if current else 0) + 1
    stored = {**event, "LTime": ltime}
    txn.put(TABLE, stored["ID"], stored)
    for old in current[: max(0, len(current) + 1 - BUFFER)]:
        txn.delete(TABLE, old["ID"])
    txn.touch(RESOURCE)
    return stored
