"""The sidecar's admin listener: readiness, liveness, clusters, config and metrics.

An aiohttp app on 127.0.0.1 (admin is for the local machine only), apart from the hot
path: the proxy listeners never import this module, and the sidecar imports it only
when it starts the admin listener. Routes, after Envoy's admin interface:

- `/ready`: 200 `LIVE` once registered and discovery is up; 503 while starting
  (`PRE_INITIALIZING`) or draining (`DRAINING`).
- `/live`: 200 while the process runs its loop.
- `/clusters`: per service: endpoints, health, zone, active requests, data source.
- `/config_dump`: the effective configuration, listeners' actual ports included.
- `/stats/prometheus`: counters and histograms in Prometheus' text format.
- `/server_info`: which build of the per-request modules runs (compiled or pure Python,
  and why; proxy/build_info.py).
"""

from __future__ import annotations

import json
import os
from typing import Any, Protocol

from aiohttp import web

from proxy.build_info import BUILD
from tether.http_limits import ADMIN_LIMITS, ListenerLimits
from tether.http_limits import serve as serve_http


class AdminSource(Protocol):
    """What the admin listener shows; the sidecar implements it."""

    def readiness(self) -> tuple[bool, str]: ...

    def clusters(self) -> list[dict[str, Any]]: ...

    def config_dump(self) -> dict[str, Any]: ...

    def prometheus(self) -> str: ...


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(
        text=json.dumps(data, indent=2, sort_keys=False) + "\n",
        status=status,
        content_type="application/json",
    )


class AdminServer:
    """Serves an `AdminSource` over HTTP; `port` is the bound port after `start`."""

    def __init__(
        self,
        source: AdminSource,
        host: str = "127.0.0.1",
        port: int = 15000,
        limits: ListenerLimits = ADMIN_LIMITS,
    ) -> None:
        self.source = source
        self.host = host
        self.port = port
        # Connection caps and timeouts of the listener (tether/http_limits.py).
        self.limits = limits
        self._runner: web.AppRunner | None = None
        app = web.Application()
        r = app.router
        r.add_get("/", self._index)
        r.add_get("/ready", self._ready)
        r.add_get("/live", self._live)
        r.add_get("/clusters", self._clusters)
        r.add_get("/config_dump", self._config_dump)
        r.add_get("/stats/prometheus", self._prometheus)
        r.add_get("/server_info", self._server_info)
        self.app = app

    async def start(self) -> None:
        self._runner, site = await serve_http(
            self.app, self.host, self.port, self.limits, reuse_address=True
        )
        self.port = site.port

    async def aclose(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _index(self, request: web.Request) -> web.Response:
        # A set: add_get registers HEAD beside GET, one route each for the same path.
        paths = sorted(
            {r.resource.canonical for r in self.app.router.routes() if r.resource is not None}
        )
        return web.Response(text="\n".join(paths) + "\n")

    async def _ready(self, request: web.Request) -> web.Response:
        ready, state = self.source.readiness()
        return web.Response(text=state + "\n", status=200 if ready else 503)

    async def _live(self, request: web.Request) -> web.Response:
        return web.Response(text="LIVE\n")

    async def _clusters(self, request: web.Request) -> web.Response:
        return _json({"clusters": self.source.clusters()})

    async def _config_dump(self, request: web.Request) -> web.Response:
        return _json(self.source.config_dump())

    async def _prometheus(self, request: web.Request) -> web.Response:
        return web.Response(
            body=self.source.prometheus().encode("utf-8"),
            headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"},
        )

    async def _server_info(self, request: web.Request) -> web.Response:
        return _json({"pid": os.getpid(), **BUILD.as_dict()})

    def __repr__(self) -> str:
        return f"<AdminServer {self.host}:{self.port}>"
