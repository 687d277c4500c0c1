"""Demo `inventory`: answers how many of an item are in stock (the leaf service)."""

from __future__ import annotations

import argparse
import zlib

from aiohttp import web

from tether.demo.server import IDENTITY, run


async def stock(request: web.Request) -> web.Response:
    item = request.match_info["item"]
    count = zlib.crc32(item.encode()) % 100  # stable per item, no state to keep
    return web.json_response({"item": item, "count": count, "by": request.app[IDENTITY].instance})


def setup(app: web.Application, args: argparse.Namespace) -> None:
    app.router.add_get("/stock/{item}", stock)


if __name__ == "__main__":
    run("inventory", setup)
