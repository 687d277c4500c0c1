"""Certificates and clocks for the CA tests, made with `cryptography` as a real PKI would:
an operator's root and intermediate, leaves with chosen flaws, a settable clock."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from controlplane.ca import certs
from controlplane.ca.spiffe import SpiffeId, new_key

T0 = dt.datetime(2026, 12, 2, 12, 0, tzinfo=dt.UTC)


@dataclass
class FakeClock:
    now: dt.datetime = T0

    def __call__(self) -> dt.datetime:
        return self.now

    def advance(self, **delta: float) -> None:
        self.now += dt.timedelta(**delta)


def ca_cert(
    key: ec.EllipticCurvePrivateKey,
    name: str,
    *,
    issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None = None,
    start: dt.datetime = T0 - dt.timedelta(days=1),
    days: int = 3650,
) -> x509.Certificate:
    """A CA certificate as an operator's own PKI would make one."""
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    issuer_cert, issuer_key = issuer if issuer else (None, key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_cert.subject if issuer_cert else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(True, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), False
        )
    )
    return builder.sign(issuer_key, hashes.SHA256())


def write_operator_ca(
    directory: Path, *, intermediate: bool, name: str = "Operator"
) -> tuple[Path, Path, x509.Certificate]:
    """Files an operator hands over: the CA (first) and its chain up to the root, and the
    CA's key. Returns (cert file, key file, root)."""
    root_key = new_key()
    root = ca_cert(root_key, f"{name} Root")
    chain, key = [root], root_key
    if intermediate:
        inter_key = new_key()
        chain = [ca_cert(inter_key, f"{name} Intermediate", issuer=(root, root_key)), root]
        key = inter_key
    directory.mkdir(parents=True, exist_ok=True)
    cert_file, key_file = directory / f"{name}.crt", directory / f"{name}.key"
    cert_file.write_text("".join(certs.cert_pem(c) for c in chain))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_file.chmod(0o600)
    return cert_file, key_file, root


@dataclass
class LeafFlaws:
    """What to get wrong in `leaf`, one field per refusal the verifier must make."""

    ca: bool = False
    digital_signature: bool = True
    key_cert_sign: bool = False
    eku: tuple[x509.ObjectIdentifier, ...] = (
        ExtendedKeyUsageOID.SERVER_AUTH,
        ExtendedKeyUsageOID.CLIENT_AUTH,
    )
    uris: tuple[str, ...] | None = None
    with_san: bool = True
    extra: list[x509.GeneralName] = field(default_factory=list)


def leaf(
    identity: SpiffeId,
    issuer: x509.Certificate,
    issuer_key: ec.EllipticCurvePrivateKey,
    *,
    start: dt.datetime = T0 - dt.timedelta(minutes=1),
    hours: float = 24,
    flaws: LeafFlaws | None = None,
) -> x509.Certificate:
    f = flaws or LeafFlaws()
    key = new_key()
    uris = f.uris if f.uris is not None else (identity.uri,)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, identity.service)]))
        .issuer_name(issuer.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + dt.timedelta(hours=hours))
        .add_extension(x509.BasicConstraints(ca=f.ca, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                f.digital_signature,
                False,
                False,
                False,
                False,
                f.key_cert_sign,
                False,
                False,
                False,
            ),
            critical=True,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), False
        )
    )
    if f.eku:
        builder = builder.add_extension(x509.ExtendedKeyUsage(list(f.eku)), critical=False)
    if f.with_san:
        names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(u) for u in uris]
        builder = builder.add_extension(
            x509.SubjectAlternativeName([*names, *f.extra]), critical=False
        )
    return builder.sign(issuer_key, hashes.SHA256())
