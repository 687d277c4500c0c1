"""An operator-supplied CA: a root, or an intermediate with its chain up to a root, and
its key, from files. The key stays in the operator's file (the KV holds no copy); every
replica is given the same files."""

from __future__ import annotations

import datetime as dt
import itertools
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from controlplane.ca import certs
from controlplane.ca.errors import CAConfigError
from controlplane.ca.provider import StoredCA, root_record
from controlplane.ca.state import RootRecord

OPERATOR_KEY_REF = {"kind": "operator"}


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        return False


def _self_signed(cert: x509.Certificate) -> bool:
    if cert.subject != cert.issuer:
        return False
    try:
        cert.verify_directly_issued_by(cert)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def load_operator_ca(
    cert_file: Path, key_file: Path
) -> tuple[list[x509.Certificate], certs.SigningKey]:
    """The chain (signing CA first, root last) and key, checked: every certificate a CA,
    each issued by the next, the last self-signed, the key the first one's."""
    try:
        chain = certs.load_certs(cert_file.read_bytes())
        raw_key = serialization.load_pem_private_key(key_file.read_bytes(), None)
    except (OSError, ValueError) as exc:
        raise CAConfigError(f"operator CA files: {exc}") from None
    if not isinstance(raw_key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise CAConfigError(f"{key_file}: the CA key must be EC or RSA")
    if not chain:
        raise CAConfigError(f"{cert_file}: no certificate")
    for i, cert in enumerate(chain):
        if not _is_ca(cert):
            raise CAConfigError(f"{cert_file}: certificate {i + 1} is not a CA (BasicConstraints)")
    for child, parent in itertools.pairwise(chain):
        try:
            child.verify_directly_issued_by(parent)
        except (ValueError, TypeError, InvalidSignature):
            raise CAConfigError(
                f"{cert_file}: {child.subject.rfc4514_string()} is not issued by the "
                "certificate after it (give the CA first, then its chain to the root)"
            ) from None
    if not _self_signed(chain[-1]):
        raise CAConfigError(f"{cert_file}: the chain must end with its self-signed root")
    pub = (
        chain[0]
        .public_key()
        .public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    mine = raw_key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    if pub != mine:
        raise CAConfigError(f"{key_file} is not the key of the first certificate in {cert_file}")
    return chain, raw_key


class OperatorCA(StoredCA):
    """Signs with the operator's CA. `vault` (optional) opens the key of a previous
    built-in root, so the switch to the operator's CA is cross-signed."""

    provider_name = "operator"

    def _configure(self) -> None:
        spec = self.spec
        if spec.cert_file is None or spec.key_file is None:
            raise CAConfigError("an operator CA needs TETHER_CA_CERT_FILE and TETHER_CA_KEY_FILE")
        self.chain, self.key = load_operator_ca(spec.cert_file, spec.key_file)
        self._signing_pem = certs.cert_pem(self.chain[0])

    def _new_root(
        self, trust_domain: str, previous: RootRecord | None, now: dt.datetime
    ) -> tuple[RootRecord, certs.SigningKey | None]:
        root = self.chain[-1]
        if now > root.not_valid_after_utc or now > self.chain[0].not_valid_after_utc:
            raise CAConfigError("the operator CA has expired")
        record = root_record(
            root=root,
            signing=self.chain[0],
            intermediates=self.chain[:-1],
            key_ref=dict(OPERATOR_KEY_REF),
            provider="operator",
        )
        return record, None

    def _wants_new_root(self, active: RootRecord) -> bool:
        return active.signing_pem != self._signing_pem

    def _open_key(self, root: RootRecord) -> certs.SigningKey:
        if root.provider == "operator":
            if root.signing_pem != self._signing_pem:
                raise CAConfigError(
                    f"root {root.id} is another operator CA than the one configured here"
                )
            return self.key
        if root.provider == "builtin" and self.vault is not None:
            vault = self.vault
            return self._cached_key(root, lambda: vault.open(root.id, root.key))
        raise CAConfigError(f"root {root.id}: its key is not available to this replica")
