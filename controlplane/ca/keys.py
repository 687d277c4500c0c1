"""Where a CA's private key is kept: sealed for the registry KV, or in a 0600 file.

The KV holds only a key *reference*: either the key encrypted (AES-256-GCM) with a key
the operator supplies, which never itself reaches the registry, or the name of a file in
a directory the operator chose, written with mode 0600 and refused on open if anyone
else may read it. Every replica of the control plane is given the same encryption key
(or the same directory), so each can open what another sealed.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from controlplane.ca.certs import SigningKey
from controlplane.ca.errors import CAConfigError, KeyProtectionError

_FILE_NAME = re.compile(r"^[0-9a-f]{8,64}\.pem$")


class KeyVault(Protocol):
    def seal(self, root_id: str, key: SigningKey) -> dict[str, str]:
        """A reference to store in the KV, from which `open` gets the key back."""
        ...

    def open(self, root_id: str, ref: Mapping[str, Any]) -> SigningKey: ...

    def discard(self, root_id: str, ref: Mapping[str, Any]) -> None:
        """Forget a sealed key whose root was never stored (it lost a race)."""
        ...


def _der(key: SigningKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _signing_key(raw: bytes, pem: bool) -> SigningKey:
    key = (
        serialization.load_pem_private_key(raw, None)
        if pem
        else serialization.load_der_private_key(raw, None)
    )
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise KeyProtectionError("a CA key must be EC or RSA")
    return key


def parse_encryption_key(text: str) -> bytes:
    """The operator's key: 32 bytes, base64 (`openssl rand -base64 32`)."""
    try:
        kek = base64.b64decode(text.strip(), validate=True)
    except ValueError:
        raise CAConfigError("the CA encryption key is not base64") from None
    if len(kek) != 32:
        raise CAConfigError(f"the CA encryption key must be 32 bytes, it is {len(kek)}")
    return kek


class EncryptedKeyVault:
    """AES-256-GCM under the operator's key; the root's id is the associated data, so a
    sealed key cannot be passed off as another root's."""

    def __init__(self, kek: bytes) -> None:
        if len(kek) != 32:
            raise CAConfigError("the CA encryption key must be 32 bytes")
        self._aead = AESGCM(kek)
        # Names the key without revealing it: tells "another key" from "corrupt".
        self.kek_id = hashlib.sha256(b"tether-ca-kek:" + kek).hexdigest()[:16]

    def seal(self, root_id: str, key: SigningKey) -> dict[str, str]:
        nonce = os.urandom(12)
        sealed = self._aead.encrypt(nonce, _der(key), root_id.encode())
        return {
            "kind": "aes-256-gcm",
            "kek_id": self.kek_id,
            "nonce": base64.b64encode(nonce).decode(),
            "ciphertext": base64.b64encode(sealed).decode(),
        }

    def open(self, root_id: str, ref: Mapping[str, Any]) -> SigningKey:
        if ref.get("kind") != "aes-256-gcm":
            raise KeyProtectionError(
                f"root {root_id}: its key is kept as {ref.get('kind')!r}, "
                "and this control plane has an encryption key"
            )
        if ref.get("kek_id") != self.kek_id:
            raise KeyProtectionError(
                f"root {root_id}: its key was sealed with another encryption key"
            )
        try:
            nonce = base64.b64decode(str(ref["nonce"]))
            sealed = base64.b64decode(str(ref["ciphertext"]))
            return _signing_key(self._aead.decrypt(nonce, sealed, root_id.encode()), pem=False)
        except (KeyError, ValueError, InvalidTag):
            raise KeyProtectionError(f"root {root_id}: its sealed key does not open") from None

    def discard(self, root_id: str, ref: Mapping[str, Any]) -> None:
        return None  # nothing outside the reference itself

    def __repr__(self) -> str:
        return f"<EncryptedKeyVault kek_id={self.kek_id}>"


class FileKeyVault:
    """One PEM file per root in `directory` (mode 0700), each written with mode 0600."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    @staticmethod
    def _name(root_id: str) -> str:
        return hashlib.sha256(root_id.encode()).hexdigest()[:32] + ".pem"

    def seal(self, root_id: str, key: SigningKey) -> dict[str, str]:
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        name = self._name(root_id)
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        # O_EXCL: never replace a key another replica wrote under the same name.
        fd = os.open(self.directory / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
        return {"kind": "file", "file": name}

    def open(self, root_id: str, ref: Mapping[str, Any]) -> SigningKey:
        name = str(ref.get("file", ""))
        if ref.get("kind") != "file" or not _FILE_NAME.match(name):
            raise KeyProtectionError(
                f"root {root_id}: its key is kept as {ref.get('kind')!r}, "
                "and this control plane has a key directory"
            )
        path = self.directory / name
        try:
            st = path.stat()
        except OSError as exc:
            raise KeyProtectionError(f"root {root_id}: key file {path}: {exc}") from None
        if stat.S_IMODE(st.st_mode) & 0o077:
            raise KeyProtectionError(
                f"key file {path} may be read by others (mode "
                f"{stat.S_IMODE(st.st_mode):04o}); it must be 0600"
            )
        try:
            return _signing_key(path.read_bytes(), pem=True)
        except ValueError as exc:
            raise KeyProtectionError(f"key file {path}: {exc}") from None

    def discard(self, root_id: str, ref: Mapping[str, Any]) -> None:
        name = str(ref.get("file", ""))
        if _FILE_NAME.match(name):
            (self.directory / name).unlink(missing_ok=True)

    def __repr__(self) -> str:
        return f"<FileKeyVault {self.directory}>"
