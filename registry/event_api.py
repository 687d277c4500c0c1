"""`/v1/event/fire/<name>` and `/v1/event/list`, with Consul's event index for blocking."""

from __future__ import annotations

import random
import time

from aiohttp import web

from registry import events, kv
from registry.errors import BadRequestError
from registry.http import context, query_int, query_wait, reply
from registry.store import Obj


def _local_services(request: web.Request) -> list[Obj]:
    ctx = context(request)
    store = ctx.store
    table = store.table("services")
    return [table[k] for k in store.keys("services", ctx.spec.node + "/")]


async def fire(request: web.Request) -> web.Response:
    ctx = context(request)
    name = request.match_info["name"]
    if not name:
        raise BadRequestError("Missing name")
    ctx.acl.require(request, "event", name, "write")
    body = await request.read()
    q = request.query
    event = events.make(
        name,
        kv.encode(body),
        q.get("node", ""),
        q.get("service", ""),
        q.get("tag", ""),
        len(body),
    )
    if events.selects_local(event, ctx.spec.node, _local_services(request)):
        with ctx.store.write() as txn:
            event = events.record(txn, ctx.store, event)
    return reply(event)


async def list_events(request: web.Request) -> web.Response:
    ctx = context(request)
    store = ctx.store
    name = request.query.get("name", "")
    grant = ctx.acl.grant(request)

    def current() -> list[Obj]:
        return [
            e
            for e in events.ordered(store)
            if (not name or e["Name"] == name) and grant.allows("event", e["Name"], "read")
        ]

    min_index = query_int(request, "index", 0) or 0
    found = current()
    index = events.list_index(found)
    if min_index > 0 and index == min_index:
        # The index is a hash, not a counter: wait until it is different.
        wait = query_wait(request)
        deadline = time.monotonic() + wait + random.uniform(0, wait / 16)
        ctx.blocking_in_flight += 1
        try:
            while index == min_index and not store.hub.closed:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                await store.hub.wait([events.RESOURCE], remaining)
                found = current()
                index = events.list_index(found)
        finally:
            ctx.blocking_in_flight -= 1
    return reply(found, index)
