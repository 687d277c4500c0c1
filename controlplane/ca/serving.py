"""The control plane's own certificate, from the mesh CA, for its TLS port (15012).

`ServingIdentity` makes a key in this process, has the CA sign it for the control
plane's identity (`spiffe://<td>/ns/tether-system/dc/<dc>/svc/tether-controlplane`,
plus DNS names for ordinary TLS clients), and keeps it in one `ssl.SSLContext`.
`renew()` loads a new certificate into that same context: handshakes from then on
present the new one, connections already open keep theirs, nothing is dropped. `run()`
renews at about half of each certificate's lifetime.

Client certificates are asked for but optional: a sidecar bootstrapping its identity
has none yet; one that presents a certificate has it checked against the trust bundle.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import ssl
import tempfile
from collections.abc import Sequence
from pathlib import Path

from controlplane.ca import certs
from controlplane.ca.authority import RESERVED_NAMESPACE
from controlplane.ca.errors import CAError
from controlplane.ca.provider import IssuedLeaf, StoredCA
from controlplane.ca.spiffe import SpiffeId, make_csr, new_key, renew_at
from controlplane.errors import ControlPlaneError

log = logging.getLogger("tether.controlplane.ca")

CONTROL_PLANE_SERVICE = "tether-controlplane"
DEFAULT_TLS_PORT = 15012


def control_plane_identity(trust_domain: str, datacenter: str) -> SpiffeId:
    return SpiffeId(trust_domain, RESERVED_NAMESPACE, datacenter, CONTROL_PLANE_SERVICE)


def new_server_context() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.verify_mode = ssl.CERT_OPTIONAL
    return ctx


def load_identity(ctx: ssl.SSLContext, key: certs.SigningKey, issued: IssuedLeaf) -> None:
    """Put a key and its chain into `ctx`. `ssl` reads them only from files: they exist
    for the duration of the call, mode 0600, in a directory only we can enter."""
    with tempfile.TemporaryDirectory(prefix="tether-tls-") as tmp:
        path = Path(tmp) / "identity.pem"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(certs.key_pem(key) + issued.chain_pem)
        ctx.load_cert_chain(path)


class ServingIdentity:
    def __init__(
        self,
        provider: StoredCA,
        *,
        datacenter: str,
        dns_names: Sequence[str] = ("localhost",),
        rng: random.Random | None = None,
    ) -> None:
        self.provider = provider
        self.datacenter = datacenter
        self.dns_names = tuple(dns_names)
        self.context = new_server_context()
        self.leaf: IssuedLeaf | None = None
        self.rng = rng or random.Random()

    async def renew(self) -> IssuedLeaf:
        """A new key and certificate, loaded into the same context."""
        bundle = await self.provider.trust_bundle()
        ident = control_plane_identity(bundle.trust_domain, self.datacenter)
        key = new_key()
        issued = await self.provider.sign(
            make_csr(key, ident, self.dns_names), ident, dns_names=self.dns_names
        )
        load_identity(self.context, key, issued)
        self.context.load_verify_locations(cadata=bundle.pem)
        self.leaf = issued
        log.info("control plane TLS: serving certificate serial %d", issued.serial)
        return issued

    async def run(self) -> None:
        """Renew at about half of each certificate's lifetime, until cancelled."""
        delay = 1.0
        while True:
            if self.leaf is None:
                due = 0.0
            else:
                when = renew_at(self.leaf.cert, self.rng.uniform(0, 0.1))
                due = (when - self.provider.clock()).total_seconds()
            if due > 0:
                await asyncio.sleep(due)
            try:
                await self.renew()
                delay = 1.0
            except (ControlPlaneError, CAError) as exc:
                log.warning("control plane TLS: renewal failed: %s (again in %.0fs)", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 60.0)

    def __repr__(self) -> str:
        serial = self.leaf.serial if self.leaf else None
        return f"<ServingIdentity {CONTROL_PLANE_SERVICE} serial={serial}>"
