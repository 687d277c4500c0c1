"""Making keys, CSRs and certificates for the mesh CA (pure: the clock is an argument).

Roots are EC P-256, self-signed, CA, keyCertSign + cRLSign, with the trust domain as a
URI SAN (as Consul's). Leaves are X509-SVIDs: the SPIFFE ID as the one URI SAN,
digitalSignature, serverAuth + clientAuth, no CA bit. A cross-signed root is the new
root's subject and key issued by the old root, so leaves of the new root also verify
for a peer that trusts only the old one.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from controlplane.ca.errors import CSRError

# Leaves start a minute in the past: a peer whose clock is a little behind still
# accepts a certificate issued a moment ago (Consul does the same).
BACKDATE = dt.timedelta(minutes=1)
MAX_CSR_BYTES = 16 * 1024

SigningKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


def colon_hex(data: bytes) -> str:
    """`1f:91:ca:...`, Consul's form for key ids and serials."""
    return ":".join(f"{b:02x}" for b in data)


def serial_hex(serial: int) -> str:
    return colon_hex(serial.to_bytes(max(1, (serial.bit_length() + 7) // 8), "big"))


def key_id(cert: x509.Certificate) -> bytes:
    """The certificate's subject key identifier (RFC 5280 method 1 when absent)."""
    try:
        return cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    except x509.ExtensionNotFound:
        return x509.SubjectKeyIdentifier.from_public_key(cert.public_key()).digest


def _ski(public_key: ec.EllipticCurvePublicKey | rsa.RSAPublicKey) -> x509.SubjectKeyIdentifier:
    return x509.SubjectKeyIdentifier.from_public_key(public_key)


def _aki(issuer: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    return x509.AuthorityKeyIdentifier(key_id(issuer), None, None)


def _key_usage(*, signs_certificates: bool) -> x509.KeyUsage:
    """digitalSignature always; keyCertSign and cRLSign for a CA only."""
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=signs_certificates,
        crl_sign=signs_certificates,
        encipher_only=False,
        decipher_only=False,
    )


def _ca_extensions(
    builder: x509.CertificateBuilder, trust_domain: str, public_key: ec.EllipticCurvePublicKey
) -> x509.CertificateBuilder:
    return (
        builder.add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            _key_usage(signs_certificates=True),
            critical=True,
        )
        .add_extension(_ski(public_key), critical=False)
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(f"spiffe://{trust_domain}")]
            ),
            critical=False,
        )
    )


def make_root(
    key: ec.EllipticCurvePrivateKey,
    *,
    trust_domain: str,
    name: str,
    serial: int,
    now: dt.datetime,
    ttl: dt.timedelta,
) -> x509.Certificate:
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(serial)
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + ttl)
    )
    builder = _ca_extensions(builder, trust_domain, key.public_key())
    pub = key.public_key()
    builder = builder.add_extension(
        x509.AuthorityKeyIdentifier.from_issuer_public_key(pub), critical=False
    )
    return builder.sign(key, hashes.SHA256())


def cross_sign(
    new_root: x509.Certificate,
    *,
    trust_domain: str,
    signer_cert: x509.Certificate,
    signer_key: SigningKey,
    serial: int,
    now: dt.datetime,
) -> x509.Certificate:
    """The new root's subject and key, issued by the old root: valid while both are."""
    pub = new_root.public_key()
    if not isinstance(pub, ec.EllipticCurvePublicKey):
        raise TypeError("the built-in CA's roots are EC keys")
    builder = (
        x509.CertificateBuilder()
        .subject_name(new_root.subject)
        .issuer_name(signer_cert.subject)
        .public_key(pub)
        .serial_number(serial)
        .not_valid_before(now - BACKDATE)
        .not_valid_after(min(new_root.not_valid_after_utc, signer_cert.not_valid_after_utc))
    )
    builder = _ca_extensions(builder, trust_domain, pub).add_extension(
        _aki(signer_cert), critical=False
    )
    return builder.sign(signer_key, hashes.SHA256())


def load_csr(pem: str | bytes) -> x509.CertificateSigningRequest:
    """A PEM CSR with a valid self-signature and an acceptable key, or `CSRError`."""
    data = pem.encode() if isinstance(pem, str) else pem
    if len(data) > MAX_CSR_BYTES:
        raise CSRError(f"the CSR is larger than {MAX_CSR_BYTES} bytes")
    try:
        csr = x509.load_pem_x509_csr(data)
    except ValueError as exc:
        raise CSRError(f"not a PEM certificate signing request: {exc}") from None
    if not csr.is_signature_valid:
        raise CSRError("the CSR's signature does not verify with its own key")
    key = csr.public_key()
    if isinstance(key, ec.EllipticCurvePublicKey):
        if key.curve.name not in ("secp256r1", "secp384r1"):
            raise CSRError(f"EC curve {key.curve.name} is not accepted (P-256 or P-384)")
    elif isinstance(key, rsa.RSAPublicKey):
        if key.key_size < 2048:
            raise CSRError("RSA keys must have at least 2048 bits")
    else:
        raise CSRError("only EC (P-256, P-384) and RSA keys are accepted")
    return csr


def csr_uris(csr: x509.CertificateSigningRequest) -> list[str]:
    try:
        san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return list(san.get_values_for_type(x509.UniformResourceIdentifier))


def sign_leaf(
    csr: x509.CertificateSigningRequest,
    *,
    uri: str,
    issuer_cert: x509.Certificate,
    issuer_key: SigningKey,
    serial: int,
    now: dt.datetime,
    ttl: dt.timedelta,
    dns_names: Sequence[str] = (),
) -> x509.Certificate:
    """An X509-SVID for `uri` over the CSR's key; nothing else of the CSR is copied."""
    pub = csr.public_key()
    if not isinstance(pub, ec.EllipticCurvePublicKey | rsa.RSAPublicKey):
        raise CSRError("only EC and RSA keys are accepted")
    names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(uri)]
    names += [x509.DNSName(d) for d in dns_names]
    service = uri.rsplit("/", 1)[-1][:64]
    not_after = min(now + ttl, issuer_cert.not_valid_after_utc)
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, service)]))
        .issuer_name(issuer_cert.subject)
        .public_key(pub)
        .serial_number(serial)
        .not_valid_before(now - BACKDATE)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            _key_usage(signs_certificates=False),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(_ski(pub), critical=False)
        .add_extension(_aki(issuer_cert), critical=False)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .sign(issuer_key, hashes.SHA256())
    )


def cert_pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode("ascii")


def load_cert(pem: str) -> x509.Certificate:
    return x509.load_pem_x509_certificate(pem.encode("ascii"))


def load_certs(pem: str | bytes) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(pem.encode() if isinstance(pem, str) else pem)


def key_pem(key: SigningKey) -> str:
    """The key in the traditional OpenSSL form (`BEGIN EC PRIVATE KEY`), as Consul's
    leaf endpoint answers it."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    ).decode("ascii")
