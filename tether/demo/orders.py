"""Demo `orders`: an order and its item's stock, asked of `inventory` by name.

Instances differ by zone and version; v2 adds an `eta` field, so a later canary or
traffic split between v1 and v2 is visible in the answers.
"""

from __future__ import annotations

import argparse

from aiohttp import ClientError, web

from tether.demo.server import CLIENT, IDENTITY, run

ITEMS = ("apple", "pear", "plum", "fig")


async def order(request: web.Request) -> web.Response:
    ident = request.app[IDENTITY]
    oid = request.match_info["id"]
    item = ITEMS[sum(oid.encode()) % len(ITEMS)]
    try:
        async with request.app[CLIENT].get(f"http://inventory/stock/{item}") as resp:
            stock = await resp.json() if resp.status == 200 else {"error": resp.status}
    except (ClientError, TimeoutError, ValueError) as exc:
        stock = {"error": type(exc).__name__}
    body = {"order": oid, "item": item, "stock": stock, **ident.as_dict()}
    if ident.version == "v2":
        body["eta"] = "2 days"
    return web.json_response(body, status=200 if "error" not in stock else 502)


def setup(app: web.Application, args: argparse.Namespace) -> None:
    app.router.add_get("/orders/{id}", order)


if __name__ == "__main__":
    run("orders", setup)
