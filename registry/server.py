"""`RegistryServer`: the store, the HTTP API and the background parts, started together."""

from __future__ import annotations

import asyncio
import contextlib
import gc
from typing import Any, Protocol

from aiohttp import web

from registry import routes
from registry.checks import CheckRunner
from registry.http import CONTEXT, MAX_BODY, Context, RegistrySpec, consul_middleware
from registry.kv import Graveyard
from registry.metrics import GcPauses, WriteLatency
from registry.sessions import SessionPolicy, Sessions
from registry.store import Store
from tether.http_limits import REGISTRY_LIMITS, ListenerLimits
from tether.http_limits import serve as serve_http

# Tables that live in memory only, as in Consul (events are gossip, not Raft state).
VOLATILE_TABLES = ("events",)


class Part(Protocol):
    """A background part of the registry (check runner, session reaper)."""

    async def start(self) -> None: ...

    async def aclose(self) -> None: ...


class RegistryServer:
    def __init__(self, spec: RegistrySpec, limits: ListenerLimits = REGISTRY_LIMITS) -> None:
        self.spec = spec
        # Connection caps and timeouts of the HTTP listener (tether/http_limits.py).
        self.limits = limits
        path = spec.data_dir / "registry.db" if spec.data_dir is not None else None
        self.store = Store(path, volatile=VOLATILE_TABLES, fsync=spec.fsync)
        self.ctx = Context(spec, self.store)
        self.app = web.Application(middlewares=[consul_middleware], client_max_size=MAX_BODY)
        self.app[CONTEXT] = self.ctx
        routes.register(self.app)
        # The agent's own node and serfHealth exist from the start, as in Consul.
        with self.store.write() as txn:
            self.ctx.catalog.ensure_local_node(txn)
        self.add_part("checks", CheckRunner(self.store, self.ctx.catalog))
        self.add_part(
            "sessions",
            Sessions(self.store, spec.node, SessionPolicy(ttl_min=spec.session_ttl_min)),
        )
        self.add_part("kv_graveyard", Graveyard(self.store))
        self.add_part("write_latency", WriteLatency(self.store))
        self.add_part("gc_pauses", GcPauses())
        self._runner: web.AppRunner | None = None
        self.port = spec.port

    @property
    def address(self) -> str:
        return f"{self.spec.host}:{self.port}"

    def add_part(self, name: str, part: Any) -> None:
        self.ctx.parts[name] = part

    async def start(self) -> None:
        # Thousands of sidecars (re)connect at once after a restart: a deep accept queue
        # keeps their SYNs from being dropped into the kernel's 1 s, 3 s, 7 s... backoff.
        self._runner, site = await serve_http(
            self.app, self.spec.host, self.spec.port, self.limits, reuse_address=True, backlog=4096
        )
        self.port = site.port
        self.ctx.port = self.port
        for part in list(self.ctx.parts.values()):
            if hasattr(part, "start"):
                await part.start()

    async def aclose(self) -> None:
        for part in reversed(list(self.ctx.parts.values())):
            if hasattr(part, "aclose"):
                with contextlib.suppress(Exception):
                    await part.aclose()
        self.store.hub.close()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        self.store.close()


def tune_gc() -> None:
    """Keep full collections from stalling every blocking query at once.

    A registry holds ~10^5-10^6 long-lived objects (the state, thousands of parked
    queries); each full collection walks them all (~0.5 s measured at 10,000 instances
    and 5,000 watchers on a 2-core VM). The state loaded at start is frozen out of the
    collector's sight, and young collections run less often, so full ones are rarer.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)


async def serve(
    spec: RegistrySpec, ready: asyncio.Event | None = None, limits: ListenerLimits = REGISTRY_LIMITS
) -> None:
    """Run a registry until cancelled."""
    server = RegistryServer(spec, limits)
    await server.start()
    tune_gc()
    print(f"tether registry: node {spec.node!r} listening on http://{server.address}", flush=True)
    if ready is not None:
        ready.set()
    try:
        await asyncio.Event().wait()
    finally:
        await server.aclose()
