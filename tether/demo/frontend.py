"""Demo `frontend`: shows orders, asking `orders` by name, and drives steady traffic.

The traffic loop sends one request at a time at `--rate` per second (bounded: it
never queues more), so the live view of `tether up` always has something to show. With
`--wait-for URL` (its sidecar's admin `/ready`) it starts only once that answers.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
from typing import Any

from aiohttp import ClientError, web

from tether.demo.server import CLIENT, IDENTITY, run, wait_for


async def fetch_order(app: web.Application, oid: int) -> tuple[int, Any]:
    try:
        async with app[CLIENT].get(f"http://orders/orders/{oid}") as resp:
            try:
                body = await resp.json(content_type=None)
            except ValueError:
                body = {"error": (await resp.text())[:200]}
            return resp.status, body
    except (ClientError, TimeoutError) as exc:
        return 502, {"error": type(exc).__name__}


async def index(request: web.Request) -> web.Response:
    oid = int(request.query.get("order", "1"))
    status, order = await fetch_order(request.app, oid)
    body = {"frontend": request.app[IDENTITY].instance, "order": order}
    return web.json_response(body, status=status)


async def traffic(app: web.Application, args: argparse.Namespace) -> None:
    if args.rate <= 0:
        return
    if args.wait_for:
        await wait_for(app[CLIENT], args.wait_for)  # no traffic before the sidecar
    for oid in itertools.count(1):
        await fetch_order(app, oid % 1000)
        await asyncio.sleep(1.0 / args.rate)


def setup(app: web.Application, args: argparse.Namespace) -> None:
    app.router.add_get("/", index)


if __name__ == "__main__":
    run("frontend", setup, traffic)
