"""`/v1/status/*`: the leader and the peer set (a single-server cluster)."""

from __future__ import annotations

from aiohttp import web

from registry.http import context, reply


def server_address(request: web.Request) -> str:
    ctx = context(request)
    return f"{ctx.address}:{ctx.port}"


async def leader(request: web.Request) -> web.Response:
    return reply(server_address(request), context(request).store.index)


async def peers(request: web.Request) -> web.Response:
    return reply([server_address(request)], context(request).store.index)
