"""The sidecar's identity: its key, the CSR to the mesh CA, the leaf, renewal, the bundle.

`SidecarIdentity.bootstrap` asks the control plane for the trust bundle (trust domain,
datacenter, roots), makes an EC P-256 key in this process (it is never sent anywhere),
and posts a CSR for `spiffe://<td>/ns/<namespace>/dc/<dc>/svc/<service>` to
`/api/v1/ca/sign` with the sidecar's bootstrap credential (its registry ACL token). The
answer goes into a `MeshTLS` (proxy/tls.py). `run` renews at about half the leaf's
lifetime (`wire.spiffe.renew_at`, with jitter) with a new key; a failed renewal keeps
the current leaf and retries with backoff. `on_bundle` takes the trust bundle the push
brings (a root rotation) into the same `MeshTLS`.

A control plane whose CA is off answers `503 ca_not_configured`: `bootstrap` returns
None and the sidecar speaks plaintext, saying so once.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import random
import ssl
from collections.abc import Callable
from typing import Any

import aiohttp
from cryptography.hazmat.primitives import serialization

from proxy.backoff import BackoffPolicy
from proxy.tls import MeshTLS
from wire import push as protocol
from wire.spiffe import SpiffeId, make_csr, new_key, renew_at

log = logging.getLogger("tether.identity")

SIGN_PATH = "/api/v1/ca/sign"
BUNDLE_PATH = "/api/v1/ca/bundle"
MAX_ANSWER = 256 * 1024


class IdentityError(Exception):
    """The CA refused, or could not be reached; the message says which."""

    def __init__(self, message: str, *, status: int = 0, code: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.code = code


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def http_base(url: str) -> str:
    """The control plane's base URL as given to `--controlplane` (ws:// is http://)."""
    base = url.rstrip("/")
    if base.startswith("ws://"):
        base = "http://" + base.removeprefix("ws://")
    elif base.startswith("wss://"):
        base = "https://" + base.removeprefix("wss://")
    elif not base.startswith(("http://", "https://")):
        base = "http://" + base
    scheme, _, rest = base.partition("://")
    return f"{scheme}://{rest.split('/', 1)[0]}"


class SidecarIdentity:
    """Obtains and renews one sidecar's certificate; `tls` once `bootstrap` succeeded."""

    def __init__(
        self,
        controlplane: str,
        service: str,
        namespace: str,
        *,
        token: str | None = None,
        ca_context: ssl.SSLContext | None = None,
        rng: random.Random | None = None,
        clock: Callable[[], dt.datetime] = _utcnow,
        backoff: BackoffPolicy | None = None,
    ) -> None:
        self.base = http_base(controlplane)
        self.service = service
        self.namespace = namespace
        self._headers = {"X-Consul-Token": token} if token else {}
        self.ca_context = ca_context
        self.rng = rng or random.Random()
        self.clock = clock
        self.backoff = backoff or BackoffPolicy(base=0.5, factor=2.0, cap=30.0)
        self.tls: MeshTLS | None = None
        self.renewals = 0
        self.failures = 0
        self.last_error = ""
        self.bundle_index = 0

    async def _call(
        self, session: aiohttp.ClientSession, method: str, path: str, body: Any = None
    ) -> dict[str, Any]:
        async with session.request(
            method,
            self.base + path,
            json=body,
            headers=self._headers,
            ssl=self.ca_context if self.ca_context is not None else True,
            timeout=aiohttp.ClientTimeout(total=15),
        ) as resp:
            raw = await resp.content.read(MAX_ANSWER + 1)
            if len(raw) > MAX_ANSWER:
                raise IdentityError(f"{path}: answer larger than {MAX_ANSWER} bytes")
            try:
                data = json.loads(raw) if raw else {}
            except ValueError:
                data = {}
            if resp.status != 200:
                # The REST API's errors: {"error": code, "message": ...} (docs/api.md).
                if isinstance(data, dict) and isinstance(data.get("error"), str):
                    code, message = data["error"], str(data.get("message", ""))
                else:
                    code, message = "", raw[:200].decode("utf-8", "replace")
                raise IdentityError(
                    f"{path}: {resp.status} {code}: {message}", status=resp.status, code=code
                )
            if not isinstance(data, dict):
                raise IdentityError(f"{path}: the answer is not a JSON object")
            return data

    async def bootstrap(self) -> MeshTLS | None:
        """The first leaf (None when the control plane's CA is off). Raises
        IdentityError when the CA refused or could not be reached."""
        async with aiohttp.ClientSession() as session:
            try:
                bundle = await self._call(session, "GET", BUNDLE_PATH)
            except IdentityError as exc:
                if exc.code == "ca_not_configured":
                    return None
                raise
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                raise IdentityError(f"the control plane is not reachable: {exc}") from None
            try:
                identity = SpiffeId(
                    str(bundle["trustDomain"]),
                    self.namespace,
                    str(bundle.get("datacenter") or "dc1"),
                    self.service,
                )
            except (KeyError, ValueError) as exc:
                raise IdentityError(f"the CA's bundle: {exc}") from None
            tls = MeshTLS(identity, clock=self.clock)
            await self._sign(session, tls)
        self.tls = tls
        return tls

    async def _sign(self, session: aiohttp.ClientSession, tls: MeshTLS) -> None:
        key = new_key()
        csr = make_csr(key, tls.identity)
        pem = csr.public_bytes(serialization.Encoding.PEM).decode()
        try:
            issued = await self._call(session, "POST", SIGN_PATH, {"csr": pem})
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise IdentityError(f"the CA is not reachable: {exc}") from None
        try:
            roots = [str(r) for r in issued["trustBundle"]]
            trust_domain = str(issued["trustDomain"])
            leaf_pem = str(issued["certificatePem"])
            intermediates = [str(p) for p in issued.get("intermediatePems") or ()]
            index = int(issued.get("bundleIndex") or 0)
        except (KeyError, TypeError, ValueError) as exc:
            raise IdentityError(f"the CA's answer lacks {exc}") from None
        if index >= self.bundle_index:
            tls.trust(trust_domain, roots)
            self.bundle_index = index
        tls.load(key, leaf_pem, intermediates)
        if tls.leaf is None or tls.leaf.public_key() != key.public_key():
            raise IdentityError("the CA's certificate is not for this sidecar's key")

    async def renew(self) -> None:
        """A new key and leaf into the same MeshTLS (open connections keep theirs)."""
        assert self.tls is not None
        async with aiohttp.ClientSession() as session:
            await self._sign(session, self.tls)
        self.renewals += 1
        leaf = self.tls.leaf
        assert leaf is not None
        log.info(
            "identity %s renewed: serial %x until %s",
            self.tls.identity,
            leaf.serial_number,
            leaf.not_valid_after_utc.isoformat(),
        )

    def due_in(self) -> float:
        """Seconds until the next renewal is due (jitter drawn each time)."""
        assert self.tls is not None and self.tls.leaf is not None
        when = renew_at(self.tls.leaf, self.rng.uniform(0.0, 0.1))
        return max(0.0, (when - self.clock()).total_seconds())

    async def run(self) -> None:
        """Renew at about half of each leaf's lifetime, until cancelled."""
        attempt = 0
        while True:
            await asyncio.sleep(self.due_in() if attempt == 0 else 0.0)
            try:
                await self.renew()
                attempt = 0
            except (IdentityError, aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
                self.failures += 1
                self.last_error = str(exc)
                delay = self.backoff.delay(attempt, self.rng)
                attempt += 1
                log.warning("identity renewal failed: %s (again in %.1fs)", exc, delay)
                await asyncio.sleep(delay)

    def on_bundle(self, bundle: protocol.Bundle) -> None:
        """The trust bundle from the push (raises ValueError for a bundle refused)."""
        tls = self.tls
        if tls is None or bundle.index < self.bundle_index:
            return
        if tuple(r.strip() for r in bundle.roots) == tuple(p.strip() for p in _pems(tls)):
            self.bundle_index = bundle.index
            return
        tls.trust(bundle.trust_domain, bundle.roots)
        self.bundle_index = bundle.index
        log.info("trust bundle index %d: %d roots", bundle.index, len(bundle.roots))

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "renewals": self.renewals,
            "renewal_failures": self.failures,
            "last_error": self.last_error,
            "bundle_index": self.bundle_index,
        }
        if self.tls is not None:
            out.update(self.tls.describe())
        return out

    def __repr__(self) -> str:
        return f"<SidecarIdentity {self.service}.{self.namespace} {self.tls!r}>"


def _pems(tls: MeshTLS) -> list[str]:
    return [c.public_bytes(serialization.Encoding.PEM).decode() for c in tls.roots]
