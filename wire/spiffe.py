"""SPIFFE IDs in Consul's form, and the check of a peer's certificate chain against them.

Pure functions over `cryptography` objects: no I/O, no clock of its own, and nothing of
`controlplane/` or `proxy/` (nor aiohttp or py-consul): the control plane's CA signs with
them and the sidecar checks its peers with them (`controlplane.ca.spiffe` re-exports
this module for the CA's code).

An identity is `spiffe://<trust-domain>/ns/<namespace>/dc/<datacenter>/svc/<service>`,
the URI Consul puts in its leaf certificates; the trust domain is `<cluster-id>.consul`.
`verify_peer` is what a sidecar runs on the chain a peer presented in the TLS handshake.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import verification
from cryptography.x509.oid import ExtendedKeyUsageOID

# SPIFFE (SPIFFE-ID.md): a trust domain is lowercase letters, digits, '.', '-', '_';
# a path segment is letters, digits, '.', '-', '_', and neither '.' nor '..'.
_TRUST_DOMAIN = re.compile(r"^[a-z0-9._-]{1,255}$")
_SEGMENT = re.compile(r"^[A-Za-z0-9._-]{1,253}$")
MAX_ID_LENGTH = 2048
# How far a chain may go from the leaf to a root: leaf, cross-signed or operator
# intermediates, root.
MAX_CHAIN_DEPTH = 4

Role = Literal["client", "server"]


class SpiffeIdError(ValueError):
    """A URI that is not a service identity in Consul's SPIFFE form."""


class PeerVerificationError(Exception):
    """A peer's certificate chain was refused; the message says why."""


@dataclass(frozen=True, order=True)
class SpiffeId:
    trust_domain: str
    namespace: str
    datacenter: str
    service: str

    def __post_init__(self) -> None:
        if not _TRUST_DOMAIN.match(self.trust_domain):
            raise SpiffeIdError(f"invalid trust domain {self.trust_domain!r}")
        for what, seg in (
            ("namespace", self.namespace),
            ("datacenter", self.datacenter),
            ("service", self.service),
        ):
            if not _SEGMENT.match(seg) or seg in (".", ".."):
                raise SpiffeIdError(f"invalid {what} {seg!r}")

    @property
    def uri(self) -> str:
        return (
            f"spiffe://{self.trust_domain}/ns/{self.namespace}"
            f"/dc/{self.datacenter}/svc/{self.service}"
        )

    def __str__(self) -> str:
        return self.uri

    def same_service(self, other: SpiffeId) -> bool:
        """The same service in the same namespace and trust domain (any datacenter)."""
        return (self.trust_domain, self.namespace, self.service) == (
            other.trust_domain,
            other.namespace,
            other.service,
        )


def trust_domain_of(cluster_id: str) -> str:
    """Consul's trust domain for a cluster: `<cluster-id>.consul`."""
    return f"{cluster_id}.consul"


def parse_spiffe_id(uri: str) -> SpiffeId:
    """`spiffe://<td>/ns/<ns>/dc/<dc>/svc/<svc>`, strictly: no port, user, query,
    fragment, empty or dot segments, and nothing but that path."""
    if len(uri) > MAX_ID_LENGTH:
        raise SpiffeIdError(f"SPIFFE ID longer than {MAX_ID_LENGTH} bytes")
    scheme, sep, rest = uri.partition("://")
    if not sep or scheme.lower() != "spiffe":
        raise SpiffeIdError(f"not a spiffe:// URI: {uri!r}")
    if scheme != "spiffe":
        raise SpiffeIdError(f"the scheme must be lowercase 'spiffe': {uri!r}")
    if "?" in rest or "#" in rest:
        raise SpiffeIdError(f"a SPIFFE ID has no query or fragment: {uri!r}")
    domain, slash, path = rest.partition("/")
    if not _TRUST_DOMAIN.match(domain):
        raise SpiffeIdError(f"invalid trust domain {domain!r} in {uri!r}")
    parts = path.split("/") if slash else []
    if len(parts) != 6 or (parts[0], parts[2], parts[4]) != ("ns", "dc", "svc"):
        raise SpiffeIdError(f"not a service identity (…/ns/N/dc/D/svc/S): {uri!r}")
    return SpiffeId(domain, parts[1], parts[3], parts[5])


def identity_of(cert: x509.Certificate) -> SpiffeId:
    """The one SPIFFE ID in a leaf's URI SANs (SPIFFE X509-SVID: exactly one)."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise PeerVerificationError("the certificate has no SPIFFE ID (no SAN)") from None
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    if len(uris) != 1:
        raise PeerVerificationError(
            f"the certificate must carry exactly one URI SAN, it has {len(uris)}"
        )
    try:
        return parse_spiffe_id(uris[0])
    except SpiffeIdError as exc:
        raise PeerVerificationError(f"malformed SPIFFE ID: {exc}") from None


def _check_leaf(leaf: x509.Certificate, role: Role) -> None:
    """What makes a certificate an X509-SVID leaf usable for `role`."""
    ext = leaf.extensions
    try:
        if ext.get_extension_for_class(x509.BasicConstraints).value.ca:
            raise PeerVerificationError("the peer's certificate has the CA bit: not a leaf")
    except x509.ExtensionNotFound:
        pass
    try:
        ku = ext.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        raise PeerVerificationError("the peer's certificate has no key usage") from None
    if not ku.digital_signature:
        raise PeerVerificationError("the peer's key usage lacks digitalSignature")
    if ku.key_cert_sign or ku.crl_sign:
        raise PeerVerificationError("the peer's key usage allows signing certificates")
    want = ExtendedKeyUsageOID.CLIENT_AUTH if role == "client" else ExtendedKeyUsageOID.SERVER_AUTH
    try:
        eku = ext.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        raise PeerVerificationError("the peer's certificate has no extended key usage") from None
    if want not in eku:
        raise PeerVerificationError(f"the peer's extended key usage lacks {role}Auth")


def verify_peer(
    chain: Sequence[x509.Certificate],
    roots: Sequence[x509.Certificate],
    *,
    trust_domain: str,
    now: dt.datetime,
    role: Role,
    expected: SpiffeId | None = None,
) -> SpiffeId:
    """The peer's identity if its chain (leaf first, then any intermediates it sent)
    leads to one of `roots` (the trust bundle) at `now`; else `PeerVerificationError`.

    `role` is what the peer is to us: "client" when it dialled us, "server" when we
    dialled it; its leaf must allow that use. With `expected`, the leaf must name that
    service (namespace and service; any datacenter), e.g. the destination we dialled.
    Refused: an empty chain or bundle, a leaf with the CA bit, a missing, malformed or
    duplicated SPIFFE ID, another trust domain, missing digitalSignature or the role's
    extended key usage, a certificate outside its validity at `now`, and any chain that
    does not verify up to a root of the bundle (another CA, a forged signature, an
    intermediate that is not a CA).
    """
    if not chain:
        raise PeerVerificationError("the peer sent no certificate")
    if not roots:
        raise PeerVerificationError("no trust bundle to verify against")
    leaf = chain[0]
    _check_leaf(leaf, role)
    ident = identity_of(leaf)
    if ident.trust_domain != trust_domain:
        raise PeerVerificationError(
            f"the peer is in trust domain {ident.trust_domain!r}, not {trust_domain!r}"
        )
    if expected is not None and not ident.same_service(expected):
        raise PeerVerificationError(f"the peer is {ident}, expected {expected}")
    when = now if now.tzinfo is not None else now.replace(tzinfo=dt.UTC)
    for cert in chain:
        if when < cert.not_valid_before_utc:
            raise PeerVerificationError(
                f"a certificate of the peer is not valid before {cert.not_valid_before_utc}"
            )
        if when > cert.not_valid_after_utc:
            raise PeerVerificationError(
                f"a certificate of the peer expired at {cert.not_valid_after_utc}"
            )
    # Path building and signatures (RFC 5280) by cryptography's verifier: it finds the
    # path through a cross-signed root as well as the direct one. The leaf's own rules
    # were checked above, so its extensions are not judged again as a web PKI leaf's.
    ca_policy = verification.ExtensionPolicy.webpki_defaults_ca()
    ee_policy = verification.ExtensionPolicy.permit_all()
    verifier = (
        verification.PolicyBuilder()
        .store(verification.Store(list(roots)))
        .time(when)
        .max_chain_depth(MAX_CHAIN_DEPTH)
        .extension_policies(ca_policy=ca_policy, ee_policy=ee_policy)
        .build_client_verifier()
    )
    try:
        verifier.verify(leaf, list(chain[1:]))
    except verification.VerificationError as exc:
        raise PeerVerificationError(f"the chain does not lead to a trusted root: {exc}") from None
    return ident


# -- the sidecar's side of issuance ------------------------------------------------------


def new_key() -> ec.EllipticCurvePrivateKey:
    """An EC P-256 key: made where it is used, it never leaves the process."""
    return ec.generate_private_key(ec.SECP256R1())


def make_csr(
    key: ec.EllipticCurvePrivateKey, identity: SpiffeId, dns_names: Sequence[str] = ()
) -> x509.CertificateSigningRequest:
    """The request a sidecar sends: its public key and the identity it asks for, signed
    by its key. The CA copies nothing else from it."""
    names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(identity.uri)]
    names += [x509.DNSName(d) for d in dns_names]
    return (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .sign(key, hashes.SHA256())
    )


def renew_at(cert: x509.Certificate, jitter: float) -> dt.datetime:
    """When to ask for the next leaf: at half its lifetime, plus `jitter` (a fraction in
    [0, 0.1) the caller draws) so a fleet issued at once does not renew at once."""
    start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    return start + (end - start) * (0.5 + jitter)
