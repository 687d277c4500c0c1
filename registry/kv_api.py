"""`/v1/kv/<key>`: Consul's KV endpoint (get, list, keys, raw; put with cas/flags/locks; delete).

Answers exactly as Consul's `kvs_endpoint.go`: a missing key (or an empty listing) is a
404 with an empty body that still carries `X-Consul-Index`; a single key's index is its
ModifyIndex, a listing's the highest index under its prefix including deletions; a PUT
or DELETE answers `true` or `false`. Blocking queries wait on the key or on the prefix.
"""

from __future__ import annotations

import base64

from aiohttp import web

from registry import kv
from registry.errors import BadRequestError, PermissionDeniedError, TooLargeError
from registry.http import block, context, reply
from registry.session_api import sessions_of

_UINT64_MAX = 2**64 - 1


def _uint(request: web.Request, name: str) -> int | None:
    v = request.query.get(name)
    if v is None:
        return None
    try:
        n = int(v)
    except ValueError:
        n = -1
    if not 0 <= n <= _UINT64_MAX:
        raise BadRequestError(f"Invalid {name} value: {v!r} is not an unsigned 64-bit integer")
    return n


def _conflicting(request: web.Request, *flags: str) -> None:
    """Consul refuses parameters that do not compose (cas with acquire, recurse with cas)."""
    if sum(1 for f in flags if f in request.query) > 1:
        raise BadRequestError(f"Conflicting flags: {request.query_string}")


def _not_found(index: int) -> web.Response:
    resp = web.Response(status=404)
    resp.headers["X-Consul-Index"] = str(max(1, index))
    return resp


async def kv_get(request: web.Request) -> web.StreamResponse:
    ctx = context(request)
    store = ctx.store
    key = request.match_info["key"]
    grant = ctx.acl.grant(request)
    if "keys" in request.query:
        index = await block(
            request, [], prefixes=[kv.resource(key)], index_fn=lambda: kv.tree_index(store, key)
        )
        # "seperator" is Consul's historic spelling, still accepted.
        sep = request.query.get("separator", request.query.get("seperator", ""))
        names = kv.keys(store, key, sep, lambda k: grant.allows("key", k, "read"))
        if not names and key:
            return _not_found(index)
        return reply(names, index)
    if "recurse" in request.query:
        index = await block(
            request, [], prefixes=[kv.resource(key)], index_fn=lambda: kv.tree_index(store, key)
        )
        found = [
            kv.view(e) for e in kv.entries(store, key) if grant.allows("key", e["Key"], "read")
        ]
        return reply(found, index) if found else _not_found(index)
    if not key:
        raise BadRequestError("Missing key name")
    if not grant.allows("key", key, "read"):
        raise PermissionDeniedError()
    index = await block(request, [kv.resource(key)], index_fn=lambda: kv.key_index(store, key))
    entry = kv.get(store, key)
    if entry is None:
        return _not_found(index)
    if "raw" in request.query:
        body = base64.b64decode(entry["Value"]) if entry["Value"] else b""
        resp = web.Response(body=body, content_type="text/plain")
        resp.headers["X-Consul-Index"] = str(index)
        resp.headers["X-Content-Type-Options"] = "nosniff"
        resp.headers["Content-Security-Policy"] = "sandbox"
        return resp
    return reply([kv.view(entry)], index)


async def kv_put(request: web.Request) -> web.Response:
    ctx = context(request)
    key = request.match_info["key"]
    if not key:
        raise BadRequestError("Missing key name")
    ctx.acl.require(request, "key", key, "write")
    _conflicting(request, "cas", "acquire", "release")
    if request.content_length is not None and request.content_length > kv.MAX_VALUE:
        raise TooLargeError(
            f"Request body({request.content_length} bytes) too large, "
            f"max size: {kv.MAX_VALUE} bytes"
        )
    flags = _uint(request, "flags") or 0
    cas = _uint(request, "cas")
    acquire = request.query.get("acquire")
    release = request.query.get("release")
    body = await request.read()
    if len(body) > kv.MAX_VALUE:
        raise TooLargeError(
            f"Request body({len(body)} bytes) too large, max size: {kv.MAX_VALUE} bytes"
        )
    value = kv.encode(body)
    if release is None and acquire is not None and sessions_of(request).lock_delayed(key):
        return reply(False)
    with ctx.store.write() as txn:
        if release is not None:
            ok = kv.unlock(txn, key, value, flags, release) is not None
        elif acquire is not None:
            ok = kv.lock(txn, key, value, flags, acquire) is not None
        elif cas is not None:
            ok = kv.cas(txn, key, value, flags, cas) is not None
        else:
            ok = kv.put(txn, key, value, flags) is not None
    return reply(ok)


async def kv_delete(request: web.Request) -> web.Response:
    ctx = context(request)
    key = request.match_info["key"]
    _conflicting(request, "recurse", "cas")
    recurse = "recurse" in request.query
    if recurse:
        if not ctx.acl.grant(request).write_prefix("key", key):
            raise PermissionDeniedError()
    else:
        if not key:
            raise BadRequestError("Missing key name")
        ctx.acl.require(request, "key", key, "write")
    cas = _uint(request, "cas")
    with ctx.store.write() as txn:
        if recurse:
            kv.delete_tree(txn, key)
            ok = True
        elif cas is not None:
            ok = kv.delete_cas(txn, key, cas)
        else:
            kv.delete(txn, key)
            ok = True
    return reply(ok)
