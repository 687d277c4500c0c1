"""Certificates for the mTLS rows of `make bench`: one CA, one leaf per hop, in files.

Made with `cryptography` as the mesh CA makes them (EC P-256, the SPIFFE ID as URI SAN,
digitalSignature, serverAuth + clientAuth, no CA bit), plus a DNS SAN naming the
service, which nginx's `proxy_ssl_verify` checks (it knows no SPIFFE IDs). Both the
Tether and the nginx two-hop paths use the same files.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from wire.spiffe import SpiffeId, new_key

TRUST_DOMAIN = "bench.consul"


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def write(directory: Path, services: tuple[str, ...] = ("caller", "svc")) -> Path:
    """`ca.pem`, and `<service>.key` / `<service>.crt` for each service, in `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
    ca_key = new_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Bench CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(True, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )
    (directory / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    for service in services:
        key = new_key()
        ident = SpiffeId(TRUST_DOMAIN, "default", "dc1", service)
        leaf = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, service)]))
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now)
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(True, False, False, False, False, False, False, False, False),
                critical=True,
            )
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .add_extension(
                x509.SubjectAlternativeName(
                    [x509.UniformResourceIdentifier(ident.uri), x509.DNSName(service)]
                ),
                critical=False,
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
            )
            .sign(ca_key, hashes.SHA256())
        )
        (directory / f"{service}.key").write_bytes(_key_pem(key))
        (directory / f"{service}.key").chmod(0o600)
        (directory / f"{service}.crt").write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    return directory


def mesh_tls(directory: Path, service: str) -> object:
    """A `proxy.tls.MeshTLS` for `service` from the files `write` made."""
    from proxy.tls import MeshTLS

    key = serialization.load_pem_private_key((directory / f"{service}.key").read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    tls = MeshTLS(SpiffeId(TRUST_DOMAIN, "default", "dc1", service))
    tls.trust(TRUST_DOMAIN, [(directory / "ca.pem").read_text()])
    tls.load(key, (directory / f"{service}.crt").read_text())
    return tls
