"""`PUT /v1/txn`: up to 64 operations applied atomically, or none of them.

As Consul's `txn_endpoint.go`: the body is a list of `{"KV": {...}}` (and `{"Session":
{"Verb": "delete", ...}}`) operations; every operation runs against the state the
previous ones staged; if any fails, every error is reported (409 with `Errors`:
`[{OpIndex, What}]`) and nothing is applied. On success the answer is 200 with one
result per operation that has one: the entry for get, get-tree (one per key), set,
cas, lock, unlock, check-index and check-session, with its Value only for reads.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from registry import kv
from registry.acl import Grant
from registry.errors import BadRequestError, RegistryError, TooLargeError
from registry.http import Body, context, dumps, read_body
from registry.session_api import sessions_of
from registry.sessions import Sessions
from registry.store import Obj, Txn

MAX_OPS = 64
_READ_VERBS = ("get", "get-tree", "check-index", "check-session", "check-not-exists")


class OpError(Exception):
    """One operation failed; the transaction reports it and applies nothing."""


def _json(data: Any, status: int, index: int | None = None) -> web.Response:
    resp = web.Response(text=dumps(data), status=status, content_type="application/json")
    if index is not None:
        resp.headers["X-Consul-Index"] = str(max(1, index))
    return resp


class KVOp:
    """One decoded KV operation."""

    def __init__(self, body: Body) -> None:
        self.verb = body.text("Verb")
        self.key = body.text("Key")
        self.value = kv.decode_b64(body.text("Value") or None, f"{body.path}.Value")
        self.flags = body.integer("Flags")
        self.index = body.integer("Index")
        self.session = body.text("Session")
        if self.flags < 0 or self.index < 0:
            raise BadRequestError(f"{body.path}: Flags and Index must not be negative")

    @property
    def writes(self) -> bool:
        return self.verb not in _READ_VERBS

    def precheck(self, grant: Grant, sessions: Sessions) -> None:
        """Consul's kvsPreApply: key present, ACL, lock-delay; before anything runs."""
        verb = self.verb
        if not self.key and verb != "delete-tree":
            raise OpError("Must provide key")
        if verb == "delete-tree":
            ok = grant.write_prefix("key", self.key)
        elif verb in ("get", "get-tree"):
            ok = True  # what the token may not read is filtered from the results
        elif verb in ("check-session", "check-index"):
            ok = grant.allows("key", self.key, "read")
        else:
            ok = grant.allows("key", self.key, "write")
        if not ok:
            raise OpError("Permission denied")
        if verb == "lock" and sessions.lock_delayed(self.key):
            raise OpError(f'failed to lock key "{self.key}" due to lock delay')

    def apply(self, txn: Txn) -> list[Obj]:
        key, verb = self.key, self.verb
        if verb == "get":
            entry = txn.get(kv.TABLE, key)
            if entry is None:
                raise OpError(f'key "{key}" doesn\'t exist')
            return [kv.view(entry)]
        if verb == "get-tree":
            return [kv.view(e) for k in kv.txn_keys(txn, key) if (e := txn.get(kv.TABLE, k))]
        if verb == "set":
            return [_blank(kv.put(txn, key, self.value, self.flags))]
        if verb == "cas":
            entry = kv.cas(txn, key, self.value, self.flags, self.index)
            if entry is None:
                raise OpError(f'failed to set key "{key}", index is stale')
            return [_blank(entry)]
        if verb == "lock":
            entry = kv.lock(txn, key, self.value, self.flags, self.session)
            if entry is None:
                raise OpError(f'failed to lock key "{key}", lock is already held')
            return [_blank(entry)]
        if verb == "unlock":
            entry = kv.unlock(txn, key, self.value, self.flags, self.session)
            if entry is None:
                raise OpError(
                    f'failed to unlock key "{key}", lock isn\'t held, or is held by another session'
                )
            return [_blank(entry)]
        if verb == "delete":
            kv.delete(txn, key)
            return []
        if verb == "delete-tree":
            kv.delete_tree(txn, key)
            return []
        if verb == "delete-cas":
            if not kv.delete_cas(txn, key, self.index):
                raise OpError(f'failed to delete key "{key}", index is stale')
            return []
        entry = txn.get(kv.TABLE, key)
        if verb == "check-index":
            if entry is None:
                raise OpError(f'key "{key}" doesn\'t exist')
            if entry["ModifyIndex"] != self.index:
                raise OpError(f"current modify index {entry['ModifyIndex']} != {self.index}")
            return [_blank(entry)]
        if verb == "check-session":
            if entry is None:
                raise OpError(f'key "{key}" doesn\'t exist')
            if entry.get("Session", "") != self.session:
                raise OpError(
                    f'failed session check for key "{key}", current session '
                    f'"{entry.get("Session", "")}" != "{self.session}"'
                )
            return [_blank(entry)]
        if verb == "check-not-exists":
            if entry is not None:
                raise OpError(f'key "{key}" exists')
            return []
        raise OpError(f'unknown KV verb "{verb}"')


class SessionOp:
    """`{"Session": {"Verb": "delete", "Session": {"ID": ...}}}`."""

    def __init__(self, body: Body) -> None:
        self.verb = body.text("Verb")
        sess = body.obj("Session")
        self.id = sess.text("ID") if sess is not None else ""
        self.writes = True

    def precheck(self, grant: Grant, sessions: Sessions) -> None:
        sess = sessions.store.get("sessions", self.id)
        node = sess["Node"] if sess is not None else ""
        if not grant.allows("session", node, "write"):
            raise OpError("Permission denied")

    def apply(self, txn: Txn, sessions: Sessions) -> list[Obj]:
        if self.verb != "delete":
            raise OpError(f'unknown Session verb "{self.verb}"')
        if not self.id:
            raise OpError("Missing session ID")
        sessions.destroy(txn, self.id)
        return []


def _blank(entry: Obj) -> Obj:
    out = kv.view(entry)
    out["Value"] = None
    return out


def decode_ops(doc: Any) -> list[KVOp | SessionOp]:
    if not isinstance(doc, list):
        raise BadRequestError("Request decode failed: expected a list of operations")
    if len(doc) > MAX_OPS:
        raise TooLargeError(f"Transaction contains too many operations ({len(doc)} > {MAX_OPS})")
    ops: list[KVOp | SessionOp] = []
    for i, raw in enumerate(doc):
        op = Body(raw, f"[{i}]")
        if (kv_body := op.obj("KV")) is not None:
            ops.append(KVOp(kv_body))
        elif (sess_body := op.obj("Session")) is not None:
            ops.append(SessionOp(sess_body))
        else:
            kinds = ", ".join(sorted(str(k) for k in op.raw)) or "nothing"
            raise BadRequestError(
                f"[{i}]: unsupported operation ({kinds}); this registry applies KV and "
                "Session operations"
            )
    return ops


async def txn(request: web.Request) -> web.Response:
    ctx = context(request)
    ops = decode_ops(await read_body(request))
    grant = ctx.acl.grant(request)
    sessions = sessions_of(request)
    results: list[Obj] = []
    errors: list[Obj] = []
    store = ctx.store
    for i, op in enumerate(ops):
        try:
            op.precheck(grant, sessions)
        except OpError as exc:
            errors.append({"OpIndex": i, "What": str(exc)})
    if errors:
        return _json({"Results": None, "Errors": errors}, 409)

    class Abort(Exception):
        pass

    try:
        with store.write() as t:
            for i, op in enumerate(ops):
                try:
                    out = op.apply(t) if isinstance(op, KVOp) else op.apply(t, sessions)
                except OpError as exc:
                    errors.append({"OpIndex": i, "What": str(exc)})
                    continue
                except RegistryError as exc:
                    errors.append({"OpIndex": i, "What": exc.message})
                    continue
                # As Consul's FilterTxnResults: entries the token may not read are dropped.
                results.extend({"KV": e} for e in out if grant.allows("key", e["Key"], "read"))
            if errors:
                raise Abort()
    except Abort:
        return _json({"Results": None, "Errors": errors}, 409)
    read_only = not any(op.writes for op in ops)
    return _json(
        {"Results": results or None, "Errors": None},
        200,
        store.index if read_only else None,
    )
