"""The control-plane process: the `ControlPlane` object that owns the app, store and watch.

`tether controlplane [--port 15010]` runs one. It keeps no state of its own: every
resource and the config version live in the registry KV (see `controlplane.store`), so
any number of replicas can run against one registry and agree.

How the parts plug in (the push server uses exactly this):

- `cp.app` is the aiohttp application. `ControlPlane._install_parts` is the one place
  parts are plugged in: `controlplane.api.register` adds the REST API under
  `/api/v1/`, and `controlplane.push.install(cp)` (when that module exists) adds the
  push server's WebSocket route and its start/stop hooks (`cp.app.on_startup`,
  `cp.app.on_cleanup`, run by `cp.start()` / `cp.aclose()`).
- `cp.store` is the `PolicyStore` (CAS reads and writes of the KV).
- `cp.snapshot` is the latest `ConfigSnapshot` (version, KV index, every resource),
  kept current by a blocking-query watch of the KV prefix, so a change made through any
  replica (or written straight into the registry) shows up on every replica.
- `cp.subscribe(callback)` registers `async callback(change: ConfigChange)`, awaited in
  order for every change of the snapshot (`change.previous`, `change.current`,
  `change.changed`: the keys added, modified or removed). Keep callbacks quick: they run
  one after another inside the publisher. It returns a function that unsubscribes.
- `await cp.refresh()` re-reads now; the API calls it after each write so the writing
  replica publishes before it answers.
- `cp.consul` is the registry client (`consul.aio.Consul`, the control plane's token)
  for reading the catalog.
- `cp.authorizer` asks the registry what a caller's token may do
  (`controlplane.auth`); callers' writes go through a client with no token of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import consul.aio
from aiohttp import web

from controlplane.auth import RegistryAuthorizer, caller_client
from controlplane.errors import ControlPlaneError
from controlplane.schema import ResourceKey
from controlplane.store import ConfigSnapshot, PolicyStore
from tether.http_limits import CONTROLPLANE_LIMITS, ListenerLimits
from tether.http_limits import serve as serve_http

log = logging.getLogger("tether.controlplane")

DEFAULT_PORT = 15010


@dataclass
class RegistryAddress:
    """Where the registry is: CONSUL_HTTP_ADDR and CONSUL_HTTP_TOKEN, as Consul tools read."""

    host: str = "127.0.0.1"
    port: int = 8500
    scheme: str = "http"
    token: str | None = None

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> RegistryAddress:
        e = os.environ if env is None else env
        addr = e.get("CONSUL_HTTP_ADDR", "127.0.0.1:8500")
        scheme = "http"
        if "://" in addr:
            scheme, _, addr = addr.partition("://")
        if e.get("CONSUL_HTTP_SSL", "").lower() in ("1", "true"):
            scheme = "https"
        host, _, port = addr.rpartition(":")
        if not host:
            host, port = port, ""
        default_port = 443 if scheme == "https" else 8500
        return cls(
            host or "127.0.0.1",
            int(port) if port else default_port,
            scheme,
            e.get("CONSUL_HTTP_TOKEN") or None,
        )


@dataclass
class ControlPlaneSpec:
    """How a control plane is run (the `tether controlplane` flags)."""

    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    registry: RegistryAddress = field(default_factory=RegistryAddress.from_env)
    # How long one blocking query of the KV prefix waits (Consul's `wait`).
    watch_wait: str = "30s"
    max_body: int = 4 * 1024 * 1024
    # Connection caps and timeouts of the listener (tether/http_limits.py).
    limits: ListenerLimits = CONTROLPLANE_LIMITS
    # The TLS port of the push and CSR signing, opened once the mesh CA has started
    # (`tether controlplane --tls-port`, 15012 by default; 0: any free port); None: none,
    # the push and signing stay on `port`.
    tls_port: int | None = None


@dataclass(frozen=True)
class ConfigChange:
    """One step of the published snapshot."""

    previous: ConfigSnapshot
    current: ConfigSnapshot
    changed: frozenset[ResourceKey]


Subscriber = Callable[[ConfigChange], Awaitable[None]]

CONTROL_PLANE: web.AppKey[ControlPlane] = web.AppKey("control_plane")


class ControlPlane:
    def __init__(self, spec: ControlPlaneSpec) -> None:
        self.spec = spec
        self.app = web.Application(client_max_size=spec.max_body)
        self.app[CONTROL_PLANE] = self
        self.snapshot = ConfigSnapshot()
        # Set once the first KV read succeeded (readiness).
        self.synced = asyncio.Event()
        self._subscribers: list[Subscriber] = []
        self._publish_lock = asyncio.Lock()
        self._reads = 0
        self._published_read = 0
        self._watch_task: asyncio.Task[None] | None = None
        self._runner: web.AppRunner | None = None
        self.consul: Any = None
        self._writer: Any = None
        self.store: PolicyStore = PolicyStore(None)
        # Its client is set at start; the push server holds this same object.
        self.authorizer = RegistryAuthorizer(None)
        self.port = spec.port
        # Set when the control plane runs under Kubernetes (controlplane/inject/podwatch.py).
        self.pod_watcher: Any = None
        self._install_parts()

    def _install_parts(self) -> None:
        """Where the parts of the control plane plug into the app, in one place."""
        from controlplane.api import register
        from controlplane.ca.service import install as install_ca
        from controlplane.dashboard import install as install_dashboard
        from controlplane.inject.podwatch import install as install_podwatch

        register(self.app)
        # The mesh CA (controlplane/ca/): its routes and its start/stop hooks.
        install_ca(self)
        # The dashboard at /ui/ (controlplane/dashboard/), over the same REST API.
        install_dashboard(self)
        # Under Kubernetes: terminating injected pods leave rotation at once.
        install_podwatch(self)
        # Consul's intentions API (/v1/connect/intentions) over the Intention resources.
        from controlplane.intentions import register as register_intentions

        register_intentions(self.app)
        # The push server (WebSocket at /api/v1/push) installs itself with
        # `controlplane.push.install(cp)`: routes, on_startup/on_cleanup, subscribe().
        try:
            push = importlib.import_module("controlplane.push")
        except ModuleNotFoundError as exc:
            if exc.name != "controlplane.push":
                raise
            return
        install = getattr(push, "install", None)
        if install is not None:
            install(self)

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        reg = self.spec.registry
        self.consul = consul.aio.Consul(
            host=reg.host, port=reg.port, scheme=reg.scheme, token=reg.token
        )
        # Writes and authorization carry the caller's token only (never this process's
        # CONSUL_HTTP_TOKEN), so the registry's ACLs decide.
        self._writer = caller_client(reg.host, reg.port, reg.scheme)
        self.store = PolicyStore(self.consul, self._writer)
        self.authorizer.client = self._writer
        with contextlib.suppress(ControlPlaneError):
            await self.refresh()
        self._watch_task = asyncio.create_task(self._watch(), name="controlplane-watch")
        # Long-lived connections (sidecars' WebSockets) must not hold a stop for a minute.
        self._runner, site = await serve_http(
            self.app, self.spec.host, self.spec.port, self.spec.limits, shutdown_timeout=3.0
        )
        self.port = site.port
        log.info("control plane on %s:%d", self.spec.host, self.port)
        if self.spec.tls_port is not None:
            from controlplane.ca.service import CA_SERVICE

            ca = self.app.get(CA_SERVICE)
            if ca is not None:
                ca.serve_tls(self._runner, self.spec.host, self.spec.tls_port, self.spec.limits)

    async def aclose(self) -> None:
        if self._watch_task is not None:
            self._watch_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch_task
            self._watch_task = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        for client in (self.consul, self._writer):
            if client is not None:
                await client.close()
        self.consul = self._writer = None

    @property
    def url(self) -> str:
        return f"http://{self.spec.host}:{self.port}"

    # -- the published snapshot ----------------------------------------------------------

    def subscribe(self, callback: Subscriber) -> Callable[[], None]:
        self._subscribers.append(callback)

        def unsubscribe() -> None:
            with contextlib.suppress(ValueError):
                self._subscribers.remove(callback)

        return unsubscribe

    async def refresh(self) -> ConfigSnapshot:
        """Read the KV now and publish what changed; return the current snapshot."""
        await self._read_and_publish(None, None)
        return self.snapshot

    async def wait_for_version(self, version: int, timeout: float = 10.0) -> ConfigSnapshot:
        """Until the published snapshot is at `version` or later (bounded)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.snapshot.version < version and loop.time() < deadline:
            await self.refresh()
            if self.snapshot.version < version:
                await asyncio.sleep(0.02)
        return self.snapshot

    async def _read_and_publish(self, index: int | None, wait: str | None) -> None:
        self._reads += 1
        seq = self._reads
        snap = await self.store.snapshot(index=index, wait=wait)
        async with self._publish_lock:
            if seq < self._published_read:
                return  # a newer read was published while this one waited
            self._published_read = seq
            previous = self.snapshot
            self.synced.set()
            if snap.same_content(previous):
                self.snapshot = snap  # same content, newer index
                return
            self.snapshot = snap
            changed = frozenset(
                k
                for k in set(previous.resources) | set(snap.resources)
                if previous.resources.get(k) != snap.resources.get(k)
            )
            change = ConfigChange(previous, snap, changed)
            for callback in list(self._subscribers):
                try:
                    await callback(change)
                except Exception:
                    log.exception("config subscriber %r failed", callback)

    async def _watch(self) -> None:
        delay = 0.1
        while True:
            try:
                await self._read_and_publish(self.snapshot.index or None, self.spec.watch_wait)
                delay = 0.1
            except ControlPlaneError as exc:
                log.warning("watching the registry KV: %s (retrying in %.1fs)", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)


async def serve(spec: ControlPlaneSpec) -> None:
    """Run a control plane until cancelled."""
    cp = ControlPlane(spec)
    try:
        await cp.start()
    except BaseException:
        await cp.aclose()  # the registry clients too: no "Unclosed client session"
        raise
    print(f"tether controlplane: listening on {cp.url}", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await cp.aclose()
