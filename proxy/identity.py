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
from pathlib import Path
from typing import Any

import aiohttp
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from proxy.backoff import BackoffPolicy
from proxy.tls import MeshTLS
from wire import push as protocol
from wire.spiffe import (
    PeerVerificationError,
    SpiffeId,
    identity_of,
    make_csr,
    new_key,
    renew_at,
)

log = logging.getLogger("tether.identity")

SIGN_PATH = "/api/v1/ca/sign"
BUNDLE_PATH = "/api/v1/ca/bundle"
INDEX_PATH = "/api/v1"
# The control plane's own identity on its TLS port (controlplane/ca/serving.py).
CONTROL_PLANE = ("tether-system", "tether-controlplane")
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
        # The TLS port's base URL (push and signing), once `GET /api/v1` announced it.
        self.tls_base: str | None = None
        # Roots to trust the TLS port with before the first bundle (`--ca-file`).
        self.ca_file_roots: list[str] | None = None
        # A Kubernetes service-account token file (the injected TETHER_IDENTITY_TOKEN),
        # re-read at every CSR as the kubelet rotates it; sent as `kubernetesToken`.
        self.kubernetes_token_file: str | None = None
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
        self,
        session: aiohttp.ClientSession,
        method: str,
        path: str,
        body: Any = None,
        *,
        base: str | None = None,
        ctx: ssl.SSLContext | None = None,
    ) -> dict[str, Any]:
        url = (base or self.base) + path
        async with session.request(
            method,
            url,
            json=body,
            headers=self._headers,
            ssl=ctx if ctx is not None else True,
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

    def _session(self) -> aiohttp.ClientSession:
        return aiohttp.ClientSession(connector=_CheckedConnector(check_control_plane))

    def _roots_context(self, roots: list[str]) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.check_hostname = False  # the server is checked by its SPIFFE ID (above)
        ctx.load_verify_locations(
            cadata="".join(r if r.endswith("\n") else r + "\n" for r in roots)
        )
        return ctx

    async def _discover(self, session: aiohttp.ClientSession) -> None:
        """Where the TLS port is (`GET /api/v1` on the plain port)."""
        index = await self._call(session, "GET", INDEX_PATH)
        if index.get("tlsStarting"):
            raise IdentityError("the control plane's TLS port is starting", code="tls_starting")
        port = index.get("tlsPort")
        if isinstance(port, int) and not isinstance(port, bool) and 0 < port < 65536:
            host = self.base.partition("://")[2].rpartition(":")[0] or "127.0.0.1"
            self.tls_base = f"https://{host}:{port}"

    @property
    def push_url(self) -> str | None:
        """The push WebSocket on the TLS port (None: the plain port's)."""
        if self.tls_base is None:
            return None
        return "wss://" + self.tls_base.removeprefix("https://") + protocol.PATH

    async def bootstrap(self) -> MeshTLS | None:
        """The first leaf (None when the control plane's CA is off). Raises
        IdentityError when the CA refused or could not be reached."""
        async with self._session() as session:
            try:
                await self._discover(session)
                if self.tls_base is not None and self.ca_file_roots is not None:
                    # Roots the operator gave: the bundle itself comes over verified TLS.
                    self.ca_context = self._roots_context(self.ca_file_roots)
                    bundle = await self._call(
                        session, "GET", BUNDLE_PATH, base=self.tls_base, ctx=self.ca_context
                    )
                else:
                    # Trust on first use: the bundle as the plain port serves it.
                    bundle = await self._call(session, "GET", BUNDLE_PATH)
                    if self.tls_base is not None:
                        self.ca_context = self._roots_context([str(r) for r in bundle["roots"]])
            except IdentityError as exc:
                if exc.code == "ca_not_configured":
                    return None
                raise
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                raise IdentityError(f"the control plane is not reachable: {exc}") from None
            except (KeyError, TypeError, ssl.SSLError, ValueError) as exc:
                raise IdentityError(f"the CA's bundle: {exc}") from None
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
        # Over the TLS port when there is one: the first time with the bootstrap roots,
        # then with the sidecar's own context (its certificate, the current bundle).
        ctx = tls.client if tls.client is not None else self.ca_context
        body: dict[str, Any] = {"csr": pem}
        if self.kubernetes_token_file:
            try:
                # A small file on a local volume (the kubelet's projection).
                token = Path(self.kubernetes_token_file).read_text(encoding="utf-8")  # noqa: ASYNC240
                body["kubernetesToken"] = token[: 64 * 1024].strip()
            except (OSError, UnicodeDecodeError) as exc:
                raise IdentityError(f"the service-account token: {exc}") from None
        try:
            if self.tls_base is not None:
                issued = await self._call(
                    session, "POST", SIGN_PATH, body, base=self.tls_base, ctx=ctx
                )
            else:
                issued = await self._call(session, "POST", SIGN_PATH, body)
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
        async with self._session() as session:
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


def check_control_plane(sslobj: Any) -> None:
    """A TLS connection to the control plane: its certificate (whose chain the handshake
    verified against the bundle) must name the control plane, not any mesh service."""
    der = sslobj.getpeercert(binary_form=True) if sslobj is not None else None
    if not der:
        raise IdentityError("the control plane's TLS port sent no certificate")
    try:
        ident = identity_of(x509.load_der_x509_certificate(der))
    except PeerVerificationError as exc:
        raise IdentityError(f"the control plane's certificate: {exc}") from None
    if (ident.namespace, ident.service) != CONTROL_PLANE:
        raise IdentityError(f"the TLS port is {ident}, not the control plane")


class _CheckedConnector(aiohttp.TCPConnector):
    """aiohttp's connector, checking each new TLS connection's peer before any request
    goes over it (aiohttp has no public hook between the handshake and the request)."""

    def __init__(self, check: Callable[[Any], None]) -> None:
        super().__init__()
        self._check = check

    async def _wrap_create_connection(self, *args: Any, **kwargs: Any) -> Any:
        transport, proto = await super()._wrap_create_connection(*args, **kwargs)
        sslobj = transport.get_extra_info("ssl_object")
        if sslobj is not None:
            try:
                self._check(sslobj)
            except BaseException:
                transport.abort()
                raise
        return transport, proto


def _pems(tls: MeshTLS) -> list[str]:
    return [c.public_bytes(serialization.Encoding.PEM).decode() for c in tls.roots]
