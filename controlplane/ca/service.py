"""`CAService`: the mesh CA inside a control plane: its provider, its registry clients,
the watch that publishes trust-bundle changes, and the retirement of old roots.

`install(cp)` plugs it into a `ControlPlane` (routes from `controlplane.ca.routes`,
start and stop hooks). Configuration comes from the environment (`CASpec.from_env`);
without key protection configured the CA stays off and its endpoints answer 503. The
provider starts in the background and retries while the registry is away, so a control
plane without its registry still comes up (answering 503 `ca_starting` meanwhile).

`subscribe_bundle(callback)` is how the push server sends the trust bundle to sidecars:
`async callback(bundle)` runs whenever the set of trusted roots changes (a rotation,
a retired root), on every replica, because each watches the roots key in the KV.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import consul.aio
from aiohttp import web

from controlplane.ca.authority import IdentityAuthority, KubernetesReviewer, RegistryTokens
from controlplane.ca.builtin import BuiltinCA, vault_for
from controlplane.ca.errors import (
    CAConfigError,
    CAError,
    CANotConfiguredError,
    KeyProtectionError,
)
from controlplane.ca.provider import IssuedLeaf, StoredCA, TrustBundle, live
from controlplane.ca.spec import CASpec
from controlplane.ca.supplied import OperatorCA
from controlplane.ca.tls_port import TLSPort, plain_port_guard
from controlplane.errors import ControlPlaneError
from tether.http_limits import ListenerLimits

if TYPE_CHECKING:
    from controlplane.server import ControlPlane

log = logging.getLogger("tether.controlplane.ca")

BundleSubscriber = Callable[[TrustBundle], Awaitable[None]]


class CAStartingError(CAError):
    status = 503
    code = "ca_starting"


class CAService:
    # Leaves made for Consul clients' `/v1/agent/connect/ca/leaf`, by (namespace, service).
    LEAF_CACHE_SIZE = 1024

    def __init__(self, cp: ControlPlane, spec: CASpec) -> None:
        self.cp = cp
        self.spec = spec
        self.provider: StoredCA | None = None
        self.authority: IdentityAuthority | None = None
        self.tokens: RegistryTokens | None = None
        self.bundle: TrustBundle | None = None
        self.ready = asyncio.Event()
        self.failure: CAError | None = None
        self._subscribers: list[BundleSubscriber] = []
        self._clients: list[Any] = []
        self._task: asyncio.Task[None] | None = None
        self.watch_wait = "30s"
        self.leaf_cache: dict[tuple[str, str], tuple[IssuedLeaf, str]] = {}
        # The push and CSR signing port (controlplane/ca/tls_port.py), once open; and
        # whether one is wanted (`--tls-port`), so `GET /api/v1` can say "starting".
        self.tls: TLSPort | None = None
        self.tls_wanted = False
        self._tls_task: asyncio.Task[None] | None = None

    def serve_tls(
        self, runner: web.BaseRunner, host: str, port: int, limits: ListenerLimits
    ) -> None:
        """Open the TLS port once the CA has started (its certificate is the CA's)."""
        if not self.spec.configured:
            return
        self.tls_wanted = True
        self._tls_task = asyncio.get_running_loop().create_task(
            self._open_tls(runner, host, port, limits), name="controlplane-tls-port"
        )

    async def _open_tls(
        self, runner: web.BaseRunner, host: str, port: int, limits: ListenerLimits
    ) -> None:
        delay = 0.1
        while True:
            await self.ready.wait()
            assert self.provider is not None
            tls = TLSPort(self.provider, datacenter=self.spec.datacenter, host=host, port=port)
            try:
                await tls.start(runner, limits)
            except OSError as exc:
                log.error("control plane TLS port %s:%d cannot open: %s", host, port, exc)
                self.tls_wanted = False
                return
            except (ControlPlaneError, CAError) as exc:
                log.warning("control plane TLS port: %s (again in %.1fs)", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            self.tls = tls
            return

    # -- what the routes use ---------------------------------------------------------

    def require(self) -> StoredCA:
        """The started provider, or the 503 that says why there is none."""
        if not self.spec.configured:
            raise CANotConfiguredError(
                "the mesh CA is off: set TETHER_CA_ENCRYPTION_KEY (or _FILE), "
                "TETHER_CA_KEY_DIR, or TETHER_CA_CERT_FILE and TETHER_CA_KEY_FILE"
            )
        if self.failure is not None:
            raise self.failure
        if self.provider is None or not self.ready.is_set():
            raise CAStartingError("the mesh CA is starting (waiting for the registry)")
        return self.provider

    def subscribe_bundle(self, callback: BundleSubscriber) -> Callable[[], None]:
        self._subscribers.append(callback)

        def unsubscribe() -> None:
            with contextlib.suppress(ValueError):
                self._subscribers.remove(callback)

        return unsubscribe

    # -- lifecycle -------------------------------------------------------------------

    async def on_startup(self, app: web.Application) -> None:
        if not self.spec.configured:
            log.info("mesh CA off (no key protection configured)")
            return
        reg = self.cp.spec.registry
        client = consul.aio.Consul(host=reg.host, port=reg.port, scheme=reg.scheme, token=reg.token)
        # Writes made for a caller (a rotation) carry the caller's token alone.
        writer = consul.aio.Consul(host=reg.host, port=reg.port, scheme=reg.scheme)
        self._clients += [client, writer]
        if self.spec.cert_file is not None:
            self.provider = OperatorCA(client, self.spec, vault=vault_for(self.spec), writer=writer)
        else:
            self.provider = BuiltinCA(client, self.spec, writer=writer)
        self.tokens = RegistryTokens(client)
        k8s = KubernetesReviewer(self.spec.kubernetes) if self.spec.kubernetes else None
        self.authority = IdentityAuthority(self.tokens, k8s)
        self._task = asyncio.create_task(self._run(self.provider), name="mesh-ca")

    async def on_cleanup(self, app: web.Application) -> None:
        if self._tls_task is not None:
            self._tls_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._tls_task
        if self.tls is not None:
            await self.tls.aclose()
            self.tls = None
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        for client in self._clients:
            await client.close()
        self._clients.clear()

    async def _run(self, provider: StoredCA) -> None:
        delay = 0.1
        while True:
            try:
                await provider.start()
                break
            except (CAConfigError, KeyProtectionError) as exc:
                # Retrying cannot help: the endpoints say why until an operator acts.
                log.error("mesh CA cannot start: %s", exc)
                self.failure = exc
                return
            except ControlPlaneError as exc:
                log.warning("mesh CA not started: %s (retrying in %.1fs)", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
        self.ready.set()
        await asyncio.gather(self._watch(provider), self._maintain(provider))

    async def _watch(self, provider: StoredCA) -> None:
        """Publish the trust bundle whenever the trusted roots change."""
        index: int | None = None
        delay = 0.1
        while True:
            try:
                index, state = await provider.state.watch_roots(index, self.watch_wait)
                serial = await provider.state.serial()
                kept = live(state, dict(serial.last_leaf_not_after), provider.clock())
                bundle = TrustBundle(
                    kept.trust_domain, tuple(r.root_pem for r in kept.roots), kept.index
                )
                delay = 0.1
            except ControlPlaneError as exc:
                log.warning("watching the CA roots: %s (retrying in %.1fs)", exc, delay)
                index = None
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            if self.bundle is None or bundle.root_pems != self.bundle.root_pems:
                self.bundle = bundle
                for callback in list(self._subscribers):
                    try:
                        await callback(bundle)
                    except Exception:
                        log.exception("trust bundle subscriber %r failed", callback)

    async def _maintain(self, provider: StoredCA) -> None:
        while True:
            await asyncio.sleep(self.spec.maintain_interval)
            try:
                await provider.maintain()
            except ControlPlaneError as exc:
                log.warning("retiring old CA roots: %s", exc)

    def __repr__(self) -> str:
        state = (
            "off" if not self.spec.configured else ("ready" if self.ready.is_set() else "starting")
        )
        return f"<CAService {self.spec.provider_name} {state} subscribers={len(self._subscribers)}>"


CA_SERVICE: web.AppKey[CAService] = web.AppKey("mesh_ca", CAService)


def install(cp: ControlPlane, spec: CASpec | None = None) -> CAService:
    """Plug the CA into a control plane: its routes, its start and stop."""
    from controlplane.ca import routes

    service = CAService(cp, spec or CASpec.from_env())
    cp.app[CA_SERVICE] = service
    routes.register(cp.app)
    # Once the TLS port is open, the push and signing are refused on the plain one.
    cp.app.middlewares.append(plain_port_guard(lambda: service.tls))  # type: ignore[arg-type]
    cp.app.on_startup.append(service.on_startup)
    cp.app.on_cleanup.append(service.on_cleanup)
    return service
