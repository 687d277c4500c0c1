"""How the mesh CA is configured: `CASpec`, from the control plane's environment.

The CA is on when its key can be protected: an encryption key for sealing the built-in
root's key into the registry KV, a directory for keeping it in 0600 files, or an
operator-supplied CA (certificate chain and key files). Without any of them the CA
stays off and its endpoints answer 503 `ca_not_configured`: a root key is never kept in
the clear.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from controlplane.ca.errors import CAConfigError
from controlplane.schema import format_duration, parse_duration

DEFAULT_LEAF_TTL = 24 * 3600.0
# "Down to minutes": a shorter leaf would have the fleet renewing faster than a
# registry round trip and a signature can be relied on.
MIN_LEAF_TTL = 60.0
MAX_LEAF_TTL = 365 * 24 * 3600.0
DEFAULT_ROOT_TTL = 10 * 365 * 24 * 3600.0
DEFAULT_DATACENTER = "dc1"


@dataclass(frozen=True)
class KubernetesSpec:
    """Where the control plane asks the Kubernetes API to review service-account
    tokens (TokenReview), with its own credentials."""

    api_url: str
    token_file: Path | None = None
    ca_file: Path | None = None
    audiences: tuple[str, ...] = ()
    timeout: float = 5.0


@dataclass(frozen=True)
class CASpec:
    encryption_key: str | None = None  # base64 of 32 bytes
    key_dir: Path | None = None
    cert_file: Path | None = None  # operator CA: its certificate, then its chain to a root
    key_file: Path | None = None
    leaf_ttl: float = DEFAULT_LEAF_TTL
    root_ttl: float = DEFAULT_ROOT_TTL
    datacenter: str = DEFAULT_DATACENTER
    trust_domain: str | None = None  # default: <cluster-id>.consul, as Consul's
    kubernetes: KubernetesSpec | None = None
    # How often a replica checks for roots whose last leaf expired.
    maintain_interval: float = 60.0

    @property
    def configured(self) -> bool:
        return bool(self.encryption_key or self.key_dir or self.cert_file)

    @property
    def provider_name(self) -> str:
        return "operator" if self.cert_file else "builtin"

    def check(self) -> None:
        """Raise `CAConfigError` naming the setting that cannot be used."""
        if not MIN_LEAF_TTL <= self.leaf_ttl <= MAX_LEAF_TTL:
            raise CAConfigError(
                f"TETHER_CA_LEAF_TTL: {format_duration(self.leaf_ttl)} is outside "
                f"{format_duration(MIN_LEAF_TTL)}..{format_duration(MAX_LEAF_TTL)}"
            )
        if self.root_ttl < 2 * self.leaf_ttl:
            raise CAConfigError("the root must live at least twice as long as a leaf")
        if bool(self.cert_file) != bool(self.key_file):
            raise CAConfigError("TETHER_CA_CERT_FILE and TETHER_CA_KEY_FILE go together")
        if self.encryption_key and self.key_dir:
            raise CAConfigError(
                "TETHER_CA_ENCRYPTION_KEY and TETHER_CA_KEY_DIR: choose one place for keys"
            )

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> CASpec:
        e = os.environ if env is None else env
        kek = e.get("TETHER_CA_ENCRYPTION_KEY") or None
        kek_file = e.get("TETHER_CA_ENCRYPTION_KEY_FILE")
        if kek_file and not kek:
            try:
                kek = Path(kek_file).read_text().strip()
            except OSError as exc:
                raise CAConfigError(f"TETHER_CA_ENCRYPTION_KEY_FILE: {exc}") from None
        try:
            ttl = parse_duration(e.get("TETHER_CA_LEAF_TTL", "24h"))
        except ValueError as exc:
            raise CAConfigError(f"TETHER_CA_LEAF_TTL: {exc}") from None
        k8s_url = e.get("TETHER_K8S_API_URL")
        kubernetes = None
        if k8s_url:
            kubernetes = KubernetesSpec(
                api_url=k8s_url.rstrip("/"),
                token_file=_path(e.get("TETHER_K8S_TOKEN_FILE")),
                ca_file=_path(e.get("TETHER_K8S_CA_FILE")),
                audiences=tuple(
                    a for a in e.get("TETHER_K8S_AUDIENCES", "").split(",") if a.strip()
                ),
            )
        spec = cls(
            encryption_key=kek,
            key_dir=_path(e.get("TETHER_CA_KEY_DIR")),
            cert_file=_path(e.get("TETHER_CA_CERT_FILE")),
            key_file=_path(e.get("TETHER_CA_KEY_FILE")),
            leaf_ttl=ttl,
            datacenter=e.get("TETHER_DATACENTER") or DEFAULT_DATACENTER,
            trust_domain=e.get("TETHER_TRUST_DOMAIN") or None,
            kubernetes=kubernetes,
        )
        spec.check()
        return spec


def _path(text: str | None) -> Path | None:
    return Path(text) if text else None
