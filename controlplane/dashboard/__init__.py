"""The control plane's dashboard at `/ui/`: plain HTML and JavaScript served by aiohttp.

No build step and nothing loaded from elsewhere (the page's Content-Security-Policy
allows this origin only). The page shell and its script are open, like a login page;
every piece of data the page shows comes from the REST API, which checks the caller's
token as for any other client (`controlplane/api.py`): with the registry's ACLs on, the
page asks for a token, keeps it in the tab's sessionStorage and sends it as
`X-Tether-Token`. It reads `GET /api/v1/stats` (the live service graph, every 2 s),
`/api/v1/sidecars`, `/api/v1/resources` and `/api/v1/services`, the one route added
here: the registry's instances of every service (zone, version, health), read with the
control plane's registry client for a caller whose own token may read services.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web

from controlplane.api import PREFIX, reply, route
from controlplane.auth import READ_SERVICES
from controlplane.store import _registry_call as registry_call

if TYPE_CHECKING:
    from controlplane.server import ControlPlane

STATIC = Path(__file__).resolve().parent / "static"
# Only this origin: the dashboard loads nothing from the internet.
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
)
FILES = {
    "app.js": "text/javascript",
    "style.css": "text/css",
}
# Services listed by /api/v1/services at most (a registry can hold many more).
MAX_SERVICES = 500


def install(cp: ControlPlane) -> None:
    """The dashboard's routes on the control plane's app."""

    async def index(request: web.Request) -> web.StreamResponse:
        return _file("index.html", "text/html")

    async def asset(request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        if name not in FILES:
            raise web.HTTPNotFound()
        return _file(name, FILES[name])

    async def to_index(request: web.Request) -> web.StreamResponse:
        raise web.HTTPFound("/ui/")

    async def services(request: web.Request) -> web.Response:
        return reply({"services": await _services(cp)})

    # The page and its script say nothing about the mesh; the data routes do.
    route(cp.app, "GET", "/ui", to_index, None)
    route(cp.app, "GET", "/ui/", index, None)
    route(cp.app, "GET", "/ui/{name}", asset, None)
    route(cp.app, "GET", f"{PREFIX}/services", services, READ_SERVICES)


def _file(name: str, content_type: str) -> web.Response:
    body = (STATIC / name).read_bytes()
    return web.Response(
        body=body,
        content_type=content_type,
        charset="utf-8",
        headers={
            "Content-Security-Policy": CSP,
            "X-Content-Type-Options": "nosniff",
            "Cache-Control": "no-cache",
        },
    )


async def _services(cp: ControlPlane) -> list[dict[str, Any]]:
    """Every service's instances as the registry has them."""
    with registry_call():
        _, catalog = await cp.consul.catalog.services()
    out = []
    # "consul" is the registry's own servers (Consul registers itself), not the mesh's.
    names = sorted(n for n in catalog or {} if n != "consul")
    for name in names[:MAX_SERVICES]:
        with registry_call():
            _, entries = await cp.consul.health.service(name)
        instances = []
        for e in entries or ():
            svc, checks = e.get("Service") or {}, e.get("Checks") or []
            meta = svc.get("Meta") or {}
            statuses = {c.get("Status") for c in checks}
            health = next((s for s in ("critical", "warning") if s in statuses), "passing")
            instances.append(
                {
                    "id": svc.get("ID", ""),
                    "address": f"{svc.get('Address', '')}:{svc.get('Port', 0)}",
                    "namespace": meta.get("namespace", "default"),
                    "zone": meta.get("zone", ""),
                    "version": meta.get("version", ""),
                    "health": health,
                }
            )
        out.append({"service": name, "instances": instances})
    return out
