"""`/v1/session/*`: create, destroy, renew, info, node and list, as Consul answers them."""

from __future__ import annotations

import math

from aiohttp import web

from registry.errors import BadRequestError, NotFoundError
from registry.http import Body, block, context, read_body, reply
from registry.sessions import (
    DEFAULT_LOCK_DELAY,
    SERF_CHECK,
    TABLE,
    Sessions,
    resource,
)
from registry.store import Obj

_LOCK_DELAY_SECONDS_BELOW = 1000  # Consul reads a bare number below this as seconds


def sessions_of(request: web.Request) -> Sessions:
    """The registry's sessions part (KV locks and transactions use it too)."""
    part = context(request).parts.get("sessions")
    if not isinstance(part, Sessions):
        raise RuntimeError("the sessions part is not installed")
    return part


def _lock_delay(body: Body) -> float:
    raw = body.value("LockDelay")
    if raw is None:
        return DEFAULT_LOCK_DELAY
    if isinstance(raw, int | float) and not isinstance(raw, bool):
        if not math.isfinite(raw):
            raise BadRequestError("Request decode failed: LockDelay: not a finite number")
        return float(raw) if raw < _LOCK_DELAY_SECONDS_BELOW else float(raw) / 1e9
    delay = body.duration("LockDelay")
    return DEFAULT_LOCK_DELAY if delay is None else delay


def _checks(body: Body) -> tuple[list[str], list[Obj]]:
    """Consul's defaults and its fix-up of the deprecated `Checks` field."""
    node_checks = body.strings("NodeChecks") if body.has("NodeChecks") else [SERF_CHECK]
    checks = body.strings("Checks") if body.has("Checks") else [SERF_CHECK]
    if not checks:
        node_checks = []
    elif checks == [SERF_CHECK] or (body.has("NodeChecks") and not node_checks):
        checks = []
    service_checks: list[Obj] = []
    for sc in body.obj_list("ServiceChecks"):
        cid = sc.text("ID")
        if not cid:
            raise BadRequestError(f"{sc.path}.ID: missing")
        service_checks.append({"ID": cid, "Namespace": sc.text("Namespace")})
    return list(dict.fromkeys(checks + node_checks)), service_checks


def view(session: Obj) -> Obj:
    out = dict(session)
    ids = list(session.get("NodeChecks") or [])
    ids += [c["ID"] for c in session.get("ServiceChecks") or []]
    out["Checks"] = ids
    return out


async def create(request: web.Request) -> web.Response:
    ctx = context(request)
    raw = await read_body(request, allow_empty=True)
    body = Body(raw if raw is not None else {})
    node = body.text("Node") or ctx.spec.node
    ctx.acl.require(request, "session", node, "write")
    node_checks, service_checks = _checks(body)
    spec: Obj = {
        "Name": body.text("Name"),
        "Node": node,
        "Behavior": body.text("Behavior"),
        "TTL": body.text("TTL"),
        "LockDelay": _lock_delay(body),
        "NodeChecks": node_checks,
        "ServiceChecks": service_checks,
    }
    sessions = sessions_of(request)
    with ctx.store.write() as txn:
        session = sessions.create(txn, spec)
    return reply({"ID": session["ID"]})


async def destroy(request: web.Request) -> web.Response:
    ctx = context(request)
    sid = request.match_info["id"]
    sess = ctx.store.get(TABLE, sid)
    ctx.acl.require(request, "session", sess["Node"] if sess else ctx.spec.node, "write")
    with ctx.store.write() as txn:
        sessions_of(request).destroy(txn, sid)
    return reply(True)


async def renew(request: web.Request) -> web.Response:
    ctx = context(request)
    sid = request.match_info["id"]
    sess = ctx.store.get(TABLE, sid)
    ctx.acl.require(request, "session", sess["Node"] if sess else ctx.spec.node, "write")
    renewed = sessions_of(request).renew(sid)
    if renewed is None:
        raise NotFoundError(f"Session id '{sid}' not found")
    return reply([view(renewed)], ctx.store.index)


async def info(request: web.Request) -> web.Response:
    ctx = context(request)
    sid = request.match_info["id"]
    store = ctx.store
    index = await block(request, [resource(sid)])
    sess = store.get(TABLE, sid)
    grant = ctx.acl.grant(request)
    out = [view(sess)] if sess is not None and grant.allows("session", sess["Node"], "read") else []
    return reply(out, index)


async def node(request: web.Request) -> web.Response:
    ctx = context(request)
    name = request.match_info["node"]
    index = await block(request, ["sessions"])
    grant = ctx.acl.grant(request)
    out = [
        view(s)
        for s in sorted(ctx.store.table(TABLE).values(), key=lambda s: s["CreateIndex"])
        if s["Node"] == name and grant.allows("session", s["Node"], "read")
    ]
    return reply(out, index)


async def list_all(request: web.Request) -> web.Response:
    ctx = context(request)
    index = await block(request, ["sessions"])
    grant = ctx.acl.grant(request)
    out = [
        view(s)
        for s in sorted(ctx.store.table(TABLE).values(), key=lambda s: s["CreateIndex"])
        if grant.allows("session", s["Node"], "read")
    ]
    return reply(out, index)
