"""The built-in CA: an EC P-256 root made on first start, its key kept by a `KeyVault`
(sealed into the registry KV with the operator's encryption key, or in a 0600 file)."""

from __future__ import annotations

import datetime as dt
from dataclasses import replace

from controlplane.ca import certs
from controlplane.ca.errors import CAConfigError
from controlplane.ca.keys import EncryptedKeyVault, FileKeyVault, KeyVault, parse_encryption_key
from controlplane.ca.provider import StoredCA, random_serial, root_record
from controlplane.ca.spec import CASpec
from controlplane.ca.spiffe import new_key
from controlplane.ca.state import RootRecord


def vault_for(spec: CASpec) -> KeyVault | None:
    """The vault the spec names (encryption key or key directory), if any."""
    if spec.encryption_key:
        return EncryptedKeyVault(parse_encryption_key(spec.encryption_key))
    if spec.key_dir is not None:
        return FileKeyVault(spec.key_dir)
    return None


class BuiltinCA(StoredCA):
    provider_name = "consul"  # Consul calls its built-in provider "consul"

    def _configure(self) -> None:
        vault = self.vault or vault_for(self.spec)
        if vault is None:
            raise CAConfigError(
                "the built-in CA needs TETHER_CA_ENCRYPTION_KEY or TETHER_CA_KEY_DIR "
                "to keep its root key"
            )
        self.keys: KeyVault = vault

    def _new_root(
        self, trust_domain: str, previous: RootRecord | None, now: dt.datetime
    ) -> tuple[RootRecord, certs.SigningKey | None]:
        key = new_key()
        serial = random_serial()
        root = certs.make_root(
            key,
            trust_domain=trust_domain,
            # A name of its own per root: path building tells roots apart by subject.
            name=f"Tether CA {serial:x}",
            serial=serial,
            now=now,
            ttl=dt.timedelta(seconds=self.spec.root_ttl),
        )
        record = root_record(
            root=root, signing=root, intermediates=(), key_ref={}, provider="builtin"
        )
        sealed = self.keys.seal(record.id, key)
        return replace(record, key=sealed), key

    def _open_key(self, root: RootRecord) -> certs.SigningKey:
        if root.provider != "builtin":
            raise CAConfigError(f"root {root.id} is an operator-supplied CA's")
        return self._cached_key(root, lambda: self.keys.open(root.id, root.key))

    def _discard(self, root: RootRecord) -> None:
        self.keys.discard(root.id, root.key)
