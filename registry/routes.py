"""Every HTTP endpoint of the registry, in one table (as Consul's http_register.go)."""

from __future__ import annotations

from aiohttp import web

from registry import status


def register(app: web.Application) -> None:
    r = app.router
    # Status
    r.add_get("/v1/status/leader", status.leader)
    r.add_get("/v1/status/peers", status.peers)
