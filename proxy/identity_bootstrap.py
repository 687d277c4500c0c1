"""A sidecar's mesh identity at start: a certificate from the control plane's CA.

Before any listener opens, the sidecar asks the control plane's CA for a certificate
(proxy/identity.py does the CSR and the renewals; proxy/tls.py builds the contexts).
This module is the start-up policy around that request: it waits, with the identity's
backoff, while the control plane cannot be reached or is not ready; it stops the
sidecar (`SidecarStartError`) when the CA refuses the credential; and it says why a
sidecar runs plaintext when there is no CA to ask. It also holds the check a sidecar
applies to the push's server once it talks to the control plane's TLS port.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from proxy.errors import SidecarStartError

log = logging.getLogger("tether.sidecar")


@dataclass
class Bootstrapped:
    """What start-up got: the identity and its TLS, or why there is none (plaintext)."""

    identity: Any = None  # proxy.identity.SidecarIdentity
    tls: Any = None  # proxy.tls.MeshTLS
    plaintext_reason: str | None = None


def read_roots(path: str) -> list[str]:
    """The PEM certificates of `--ca-file`."""
    try:
        text = Path(path).read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError) as exc:
        raise SidecarStartError(f"--ca-file {path}: {exc}") from None
    end = "-----END CERTIFICATE-----"
    roots = [p.strip() + "\n" + end + "\n" for p in text.split(end) if "BEGIN CERTIFICATE" in p]
    if not roots:
        raise SidecarStartError(f"--ca-file {path}: no PEM certificate in it")
    return roots


def control_plane_check(sslobj: Any) -> None:
    """The push's server is the control plane (its SPIFFE ID), else no push."""
    from proxy.identity import IdentityError, check_control_plane
    from wire import push as protocol

    try:
        check_control_plane(sslobj)
    except IdentityError as exc:
        raise protocol.PushProtocolError(str(exc)) from None


async def bootstrap_identity(
    controlplane: str | None,
    service: str,
    namespace: str,
    *,
    token: str | None = None,
    ca_file: str | None = None,
    identity_token_file: str | None = None,
) -> Bootstrapped:
    """A certificate from the control plane's CA. Waits (with backoff) while the control
    plane cannot be reached; a refused credential raises `SidecarStartError`."""
    if not controlplane:
        return Bootstrapped(plaintext_reason="no control plane, so no mesh CA")
    from proxy.identity import IdentityError, SidecarIdentity

    identity = SidecarIdentity(controlplane, service, namespace, token=token)
    if ca_file:
        identity.ca_file_roots = read_roots(ca_file)
    identity.kubernetes_token_file = identity_token_file
    attempt = 0
    while True:
        try:
            tls = await identity.bootstrap()
            break
        except IdentityError as exc:
            if exc.status in (400, 401, 403) and exc.code != "use_tls_port":
                raise SidecarStartError(
                    f"the mesh CA refused this sidecar's identity: {exc}"
                ) from None
            delay = identity.backoff.delay(attempt, identity.rng)
            attempt += 1
            log.warning("no certificate yet: %s (again in %.1fs)", exc, delay)
            await asyncio.sleep(delay)
    if tls is None:
        return Bootstrapped(plaintext_reason="the control plane's CA is off")
    return Bootstrapped(identity, tls)
