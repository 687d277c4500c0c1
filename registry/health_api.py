"""`/v1/health/*`: service instances with their checks, and checks by service, node, state.

What sidecars watch (`/v1/health/service/<name>?passing`): each read blocks on the one
resource `service:<name>`, which every change to those instances, their checks and
their nodes' checks touches, and nothing else does.
"""

from __future__ import annotations

from aiohttp import web

from registry.agent_api import check_visible
from registry.catalog import STATUSES
from registry.catalog_api import node_matches, node_meta_query, read_service
from registry.errors import BadRequestError
from registry.http import (
    apply_filter,
    block,
    context,
    query_filter,
    query_flag,
    reply,
)


async def service(request: web.Request) -> web.Response:
    return await _service(request, connect=False)


async def connect(request: web.Request) -> web.Response:
    """`/v1/health/connect/<name>`: the Connect proxies of `name`, with their checks."""
    return await _service(request, connect=True)


async def _service(request: web.Request, *, connect: bool) -> web.Response:
    passing = query_flag(request, "passing")
    q = await read_service(request, connect=connect)
    items = [
        e
        for e in context(request).catalog.health(q.name, q.tags, passing, connect=connect)
        if q.shows(e["Node"]["Node"], e["Node"])
    ]
    return reply(apply_filter(q.flt, items), q.index)


async def checks(request: web.Request) -> web.Response:
    q = await read_service(request)
    cat = context(request).catalog
    items = [c for c in cat.service_checks(q.name) if q.shows(c["Node"], cat.get_node(c["Node"]))]
    return reply(apply_filter(q.flt, items), q.index)


async def state(request: web.Request) -> web.Response:
    ctx = context(request)
    want = request.match_info["state"]
    # "unknown" is a state py-consul may ask for (older Consul had it); no check is in it.
    if want not in (*STATUSES, "any", "unknown"):
        raise BadRequestError(f"Invalid state {want!r}: want any, passing, warning or critical")
    grant = ctx.acl.grant(request)
    flt = query_filter(request)
    meta = node_meta_query(request)
    index = await block(request, ["checks"])
    cat = ctx.catalog
    items = [
        c
        for c in cat.checks_in_state(want)
        if check_visible(grant, c) and node_matches(cat.get_node(c["Node"]), meta)
    ]
    return reply(apply_filter(flt, items), index)


async def node(request: web.Request) -> web.Response:
    ctx = context(request)
    name = request.match_info["node"]
    ctx.acl.require(request, "node", name, "read")
    flt = query_filter(request)
    grant = ctx.acl.grant(request)
    index = await block(request, [f"node:{name}"])
    items = [c for c in ctx.catalog.node_checks(name) if check_visible(grant, c)]
    return reply(apply_filter(flt, items), index)
