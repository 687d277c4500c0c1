"""The control plane's TLS port (15012 by default): the push WebSocket and CSR signing.

Once the mesh CA has started, `TLSPort.start` has the CA sign the control plane's own
certificate (`ServingIdentity`) and opens a second site of the same app on the TLS
port; `ServingIdentity.run` renews it at half its lifetime. From then on the plain port
(REST API, `/ui/`, health) refuses the push and `/api/v1/ca/sign` with `403
use_tls_port`, naming the port. On the TLS port a sidecar presents its mesh certificate
(asked for, optional: a bootstrapping sidecar has none yet for its CSR), and its
identity on the push is that certificate: `peer_identity` reads and checks it.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
from collections.abc import Awaitable, Callable

from aiohttp import web
from cryptography import x509

from controlplane.ca.provider import StoredCA
from controlplane.ca.serving import ServingIdentity
from controlplane.errors import ControlPlaneError
from tether.http_limits import LimitedSite, ListenerLimits
from wire.spiffe import PeerVerificationError, SpiffeId, verify_peer

log = logging.getLogger("tether.controlplane.ca")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Middleware = Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]

# What moves to the TLS port once it is open.
TLS_ONLY_PATHS = frozenset({"/api/v1/push", "/api/v1/ca/sign"})


class UseTLSPortError(ControlPlaneError):
    status = 403
    code = "use_tls_port"


class TLSPort:
    """The TLS site and the certificate it serves with."""

    def __init__(self, provider: StoredCA, *, datacenter: str, host: str, port: int) -> None:
        self.provider = provider
        self.host = host
        self.wanted_port = port
        self.port = 0  # bound port, once open
        names = ["localhost"]
        if host not in ("", "0.0.0.0", "::", "127.0.0.1", "localhost"):
            names.append(host)
        self.identity = ServingIdentity(provider, datacenter=datacenter, dns_names=names)
        self.site: LimitedSite | None = None
        self._renewer: asyncio.Task[None] | None = None

    @property
    def open(self) -> bool:
        return self.site is not None

    async def start(self, runner: web.BaseRunner, limits: ListenerLimits) -> None:
        await self.identity.renew()
        site = LimitedSite(
            runner, self.host, self.wanted_port, limits, ssl_context=self.identity.context
        )
        await site.start()
        self.site = site
        self.port = site.port
        self._renewer = asyncio.get_running_loop().create_task(self.identity.run())
        log.info("control plane TLS port %s:%d (push, CA signing)", self.host, self.port)

    async def aclose(self) -> None:
        if self._renewer is not None:
            self._renewer.cancel()
            try:
                await self._renewer
            except asyncio.CancelledError:
                pass
        site, self.site = self.site, None
        if site is not None:
            # The runner may have stopped it already (on_cleanup runs after the sites).
            with contextlib.suppress(RuntimeError):
                await site.stop()

    def __repr__(self) -> str:
        return f"<TLSPort {self.host}:{self.port} {'open' if self.open else 'closed'}>"


def is_tls(request: web.Request) -> bool:
    return request.transport is not None and (
        request.transport.get_extra_info("ssl_object") is not None
    )


def plain_port_guard(tls_port: Callable[[], TLSPort | None]) -> Middleware:
    """A middleware: the push and CSR signing only over TLS once the TLS port is open."""

    @web.middleware
    async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
        port = tls_port()
        moved = request.path in TLS_ONLY_PATHS
        if moved and port is not None and port.open and not is_tls(request):
            raise UseTLSPortError(
                f"{request.path} is served on the control plane's TLS port {port.port} only"
            )
        return await handler(request)

    return guard


async def peer_identity(request: web.Request, provider: StoredCA) -> SpiffeId | None:
    """The SPIFFE ID in the client certificate of a TLS request (None without one);
    PeerVerificationError if it is not a mesh identity."""
    transport = request.transport
    sslobj = transport.get_extra_info("ssl_object") if transport is not None else None
    der = sslobj.getpeercert(binary_form=True) if sslobj is not None else None
    if not der:
        return None
    leaf = x509.load_der_x509_certificate(der)
    state = await provider.roots()
    roots = [x509.load_pem_x509_certificate(r.root_pem.encode()) for r in state.roots]
    known = [
        x509.load_pem_x509_certificate(p.encode()) for r in state.roots for p in r.intermediate_pems
    ]
    now = provider.clock()
    known = [c for c in known if c.not_valid_after_utc > now]
    return verify_peer(
        [leaf, *known],
        roots,
        trust_domain=state.trust_domain,
        now=now if now.tzinfo else now.replace(tzinfo=dt.UTC),
        role="client",
    )


__all__ = [
    "TLS_ONLY_PATHS",
    "PeerVerificationError",
    "TLSPort",
    "UseTLSPortError",
    "is_tls",
    "peer_identity",
    "plain_port_guard",
]
