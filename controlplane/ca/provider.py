"""The CA provider contract (`CAProvider`) and what every provider shares (`StoredCA`).

A provider answers three questions, whoever keeps its key (Consul's `Provider`, cut down
to what the mesh uses): which roots are trusted (`roots`), a leaf for this CSR and this
identity (`sign`), and the PEM bundle a peer verifies against (`trust_bundle`). Both
providers, the built-in CA (`controlplane.ca.builtin`) and an operator-supplied one
(`controlplane.ca.supplied`), keep their roots and serials in the registry KV through
`CAStateStore` and differ only in where a root and its key come from; one conformance
suite (tests/test_ca_conformance.py) runs against each.

Who may have which identity is not decided here (`controlplane.ca.authority` does);
a provider signs what it is told, and checks only that the CSR asks for that identity
(or for none) and has a sound key.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import logging
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from controlplane.ca import certs
from controlplane.ca.errors import CAError, CSRError
from controlplane.ca.keys import KeyVault
from controlplane.ca.spec import CASpec
from controlplane.ca.spiffe import SpiffeId, trust_domain_of
from controlplane.ca.state import (
    CAStateStore,
    RootRecord,
    RootsChangedError,
    RootsState,
    iso,
    parse_iso,
)

log = logging.getLogger("tether.controlplane.ca")

Clock = Callable[[], dt.datetime]


def utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@dataclass(frozen=True)
class IssuedLeaf:
    """A signed leaf and the intermediates to present with it (leaf side first)."""

    cert: x509.Certificate
    identity: SpiffeId
    serial: int
    root_id: str
    intermediate_pems: tuple[str, ...]

    @property
    def cert_pem(self) -> str:
        return certs.cert_pem(self.cert)

    @property
    def chain_pem(self) -> str:
        """The leaf and its intermediates, as a TLS server presents them."""
        return self.cert_pem + "".join(self.intermediate_pems)


@dataclass(frozen=True)
class TrustBundle:
    """The roots a peer accepts, and the roots key's index they were read at."""

    trust_domain: str
    root_pems: tuple[str, ...]
    index: int

    @property
    def pem(self) -> str:
        return "".join(self.root_pems)

    def certificates(self) -> list[x509.Certificate]:
        return [certs.load_cert(p) for p in self.root_pems]


class CAProvider(Protocol):
    async def roots(self) -> RootsState:
        """The roots still trusted (a rotated-out root until its last leaf expired)."""
        ...

    async def sign(
        self,
        csr: x509.CertificateSigningRequest,
        identity: SpiffeId,
        *,
        ttl: dt.timedelta | None = None,
        dns_names: Sequence[str] = (),
    ) -> IssuedLeaf: ...

    async def trust_bundle(self) -> TrustBundle: ...


def fingerprint(cert: x509.Certificate) -> str:
    """Consul's root ID: the SHA-1 of the certificate's DER, colon-hex."""
    der = cert.public_bytes(serialization.Encoding.DER)
    return certs.colon_hex(hashlib.sha1(der, usedforsecurity=False).digest())


def random_serial() -> int:
    """A root's serial: 63 random bits (roots are few; leaves take the KV counter)."""
    return uuid.uuid4().int >> 65 or 1


def live(state: RootsState, last_leaf: dict[str, str], now: dt.datetime) -> RootsState:
    """`state` without the rotated-out roots whose last leaf has expired (or that never
    signed one): they are no longer needed to verify anything."""
    keep = tuple(
        r
        for r in state.roots
        if r.active or (r.id in last_leaf and parse_iso(last_leaf[r.id]) >= now)
    )
    return replace(state, roots=keep)


class StoredCA:
    """Roots and serials in the registry KV; subclasses say where a root comes from
    (`_new_root`) and how its key is opened (`_open_key`)."""

    provider_name = "base"

    def __init__(
        self,
        client: Any,
        spec: CASpec,
        *,
        vault: KeyVault | None = None,
        writer: Any | None = None,
        clock: Clock = utc_now,
    ) -> None:
        """`vault` keeps built-in roots' keys; `writer`, a registry client without a
        token of its own, makes the writes callers ask for (rotation)."""
        self.spec = spec
        self.vault = vault
        self.state = CAStateStore(client, writer)
        self.clock = clock
        self._keys: dict[str, certs.SigningKey] = {}
        self._ready = asyncio.Lock()
        self._started = False
        self._configure()

    # -- what subclasses provide -------------------------------------------------------

    def _configure(self) -> None:
        """Load and check the provider's own configuration (end of `__init__`)."""

    def _new_root(
        self, trust_domain: str, previous: RootRecord | None, now: dt.datetime
    ) -> tuple[RootRecord, certs.SigningKey | None]:
        raise NotImplementedError

    def _open_key(self, root: RootRecord) -> certs.SigningKey:
        raise NotImplementedError

    def _wants_new_root(self, active: RootRecord) -> bool:
        """Whether the configured CA is not the active root (an operator changed it)."""
        return False

    def _discard(self, root: RootRecord) -> None:
        """Undo what `_new_root` left behind when its root lost the race to be stored."""

    # -- start: agree on one root ------------------------------------------------------

    async def start(self) -> RootsState:
        """Make sure one active root exists (creating it, or adopting another replica's),
        and that it is the configured one."""
        async with self._ready:
            for _ in range(16):
                current = await self.state.roots()
                active = current.active
                if active is None:
                    td = self.spec.trust_domain or trust_domain_of(str(uuid.uuid4()))
                    base = RootsState(
                        cluster_id=td.removesuffix(".consul"),
                        trust_domain=td,
                        roots=current.roots,
                        index=current.index,
                    )
                    record, _ = self._new_root(td, None, self.clock())
                    state = base.with_roots((*base.roots, record))
                    if await self.state.write_roots(state):
                        log.info("mesh CA: created root %s (%s)", record.id, record.name)
                        self._started = True
                        return await self.state.roots()
                    self._discard(record)
                    continue  # another replica created one first: adopt it
                if self._wants_new_root(active):
                    await self.rotate()
                self._open_key(active)  # fail at start, not at the first CSR
                self._started = True
                return current
        raise CAError("could not agree on a CA root with the other replicas")

    # -- the contract ------------------------------------------------------------------

    async def roots(self) -> RootsState:
        state = await self.state.roots()
        serial = await self.state.serial()
        return live(state, dict(serial.last_leaf_not_after), self.clock())

    async def trust_bundle(self) -> TrustBundle:
        state = await self.roots()
        return TrustBundle(state.trust_domain, tuple(r.root_pem for r in state.roots), state.index)

    async def sign(
        self,
        csr: x509.CertificateSigningRequest,
        identity: SpiffeId,
        *,
        ttl: dt.timedelta | None = None,
        dns_names: Sequence[str] = (),
    ) -> IssuedLeaf:
        uris = certs.csr_uris(csr)
        if uris and uris != [identity.uri]:
            raise CSRError(f"the CSR asks for {', '.join(uris)}, not {identity}")
        if not csr.is_signature_valid:
            raise CSRError("the CSR's signature does not verify with its own key")
        lifetime = ttl or dt.timedelta(seconds=self.spec.leaf_ttl)
        for _ in range(16):
            state = await self.state.roots()
            root = state.active
            if root is None:
                raise CAError("the mesh CA has no active root (not started)")
            if identity.trust_domain != state.trust_domain:
                raise CSRError(
                    f"{identity} is not in this mesh's trust domain {state.trust_domain}"
                )
            key = self._open_key(root)
            issuer = certs.load_cert(root.signing_pem)
            now = self.clock()
            not_after = min(now + lifetime, issuer.not_valid_after_utc)
            try:
                serial = await self.state.claim_serial(state, root.id, not_after)
            except RootsChangedError:
                continue  # rotated meanwhile: sign with the new active root
            leaf = certs.sign_leaf(
                csr,
                uri=identity.uri,
                issuer_cert=issuer,
                issuer_key=key,
                serial=serial,
                now=now,
                ttl=not_after - now,
                dns_names=dns_names,
            )
            return IssuedLeaf(leaf, identity, serial, root.id, root.intermediate_pems)
        raise CAError("the CA roots kept changing while signing")

    # -- rotation and retirement -------------------------------------------------------

    async def rotate(self, token: str | None = None, *, as_caller: bool = False) -> RootRecord:
        """A new active root, cross-signed by the old one when its key can be opened;
        the old root stays trusted until its last leaf expires. With `as_caller` the
        write carries the caller's `token` alone: the registry's ACLs decide."""
        for _ in range(16):
            current = await self.state.roots()
            old = current.active
            now = self.clock()
            record, new_key = self._new_root(current.trust_domain, old, now)
            if old is not None:
                record = self._cross_signed(current.trust_domain, record, old, now)
            rotated = tuple(
                replace(r, active=False, rotated_out_at=iso(now)) if r.active else r
                for r in current.roots
            )
            state = current.with_roots((*rotated, record))
            if await self.state.write_roots(state, token, as_caller=as_caller):
                if new_key is not None:
                    self._keys[record.id] = new_key
                log.info(
                    "mesh CA: rotated to root %s; %s stays trusted until its last leaf expires",
                    record.id,
                    old.id if old else "-",
                )
                return record
            self._discard(record)
        raise CAError("could not rotate: the roots kept changing")

    def _cross_signed(
        self, trust_domain: str, record: RootRecord, old: RootRecord, now: dt.datetime
    ) -> RootRecord:
        try:
            old_key = self._open_key(old)
        except CAError as exc:
            log.warning(
                "mesh CA: rotating without cross-signing (the old root's key: %s); "
                "peers trust the new root once its bundle reaches them",
                exc,
            )
            return record
        cross = certs.cross_sign(
            certs.load_cert(record.root_pem),
            trust_domain=trust_domain,
            signer_cert=certs.load_cert(old.root_pem),
            signer_key=old_key,
            serial=random_serial(),
            now=now,
        )
        return replace(record, intermediate_pems=(*record.intermediate_pems, certs.cert_pem(cross)))

    async def maintain(self) -> list[str]:
        """Remove rotated-out roots whose last leaf has expired; the ids removed."""
        for _ in range(16):
            current = await self.state.roots()
            serial = await self.state.serial()
            kept = live(current, dict(serial.last_leaf_not_after), self.clock())
            gone = {r.id for r in current.roots} - {r.id for r in kept.roots}
            if not gone:
                return []
            subjects = {certs.load_cert(r.root_pem).subject for r in current.roots if r.id in gone}
            roots = tuple(
                replace(
                    r,
                    intermediate_pems=tuple(
                        p for p in r.intermediate_pems if certs.load_cert(p).issuer not in subjects
                    ),
                )
                for r in kept.roots
            )
            if await self.state.write_roots(current.with_roots(roots)):
                await self.state.forget_roots(gone)
                for rid in gone:
                    self._keys.pop(rid, None)
                log.info("mesh CA: roots %s left the trust bundle", ", ".join(sorted(gone)))
                return sorted(gone)
        return []

    def _cached_key(
        self, root: RootRecord, opener: Callable[[], certs.SigningKey]
    ) -> certs.SigningKey:
        key = self._keys.get(root.id)
        if key is None:
            key = self._keys[root.id] = opener()
        return key

    def __repr__(self) -> str:
        return f"<{type(self).__name__} started={self._started} keys={len(self._keys)}>"


def root_record(
    *,
    root: x509.Certificate,
    signing: x509.Certificate,
    intermediates: Sequence[x509.Certificate],
    key_ref: dict[str, str],
    provider: str,
) -> RootRecord:
    cn = root.subject.get_attributes_for_oid(x509.oid.NameOID.COMMON_NAME)
    return RootRecord(
        id=fingerprint(root),
        name=str(cn[0].value) if cn else root.subject.rfc4514_string(),
        root_pem=certs.cert_pem(root),
        signing_pem=certs.cert_pem(signing),
        key=key_ref,
        provider=provider,
        serial=root.serial_number,
        intermediate_pems=tuple(certs.cert_pem(c) for c in intermediates),
    )
