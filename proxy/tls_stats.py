"""Mesh TLS metrics: handshakes by side and result, the leaf's expiry, the trust bundle.

`HandshakeCounts` lives on the sidecar's `MeshTLS` (proxy/tls.py) and is told of every
mesh handshake by small hooks: the accepting side (`MeshServer` for a failed handshake,
`InboundIdentity` once the caller's certificate was checked) and the dialling side (the
pools, for a handshake OpenSSL refused, and `UpstreamTLS.check` for the SPIFFE check
after it). A handshake counts as `ok` once the peer's identity is verified; a failure
counts under one of a fixed set of reasons (`failure_reason`), never an error's text,
so the label set stays bounded. `render` writes the Prometheus lines (docs/metrics.md).
"""

from __future__ import annotations

import ssl
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from proxy.tls import MeshTLS

SIDES: Final = ("client", "server")
# Why a handshake failed: the peer's chain did not verify against the bundle
# (`certificate`), it verified but is no mesh identity or not the one dialled
# (`identity`), another TLS error (`protocol`: version, ALPN, a bad record), the
# handshake timed out (`timeout`), or the connection broke during it (`connection`).
REASONS: Final = ("certificate", "identity", "protocol", "timeout", "connection")


def failure_reason(exc: BaseException) -> str:
    """The reason class of an exception raised by a TLS handshake."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return "certificate"
    if isinstance(exc, ssl.SSLError):
        return "protocol"
    if isinstance(exc, TimeoutError):
        return "timeout"
    return "connection"


class HandshakeCounts:
    """Mesh TLS handshakes, by side (`client`: this sidecar dialled; `server`: it
    accepted) and result (`ok`, or a reason of REASONS)."""

    __slots__ = ("counts",)

    def __init__(self) -> None:
        self.counts: dict[tuple[str, str], int] = {}

    def ok(self, side: str) -> None:
        key = (side, "ok")
        self.counts[key] = self.counts.get(key, 0) + 1

    def failed(self, side: str, reason: str) -> None:
        key = (side, reason if reason in REASONS else "protocol")
        self.counts[key] = self.counts.get(key, 0) + 1

    def get(self, side: str, result: str) -> int:
        return self.counts.get((side, result), 0)

    def __repr__(self) -> str:
        return f"<HandshakeCounts {dict(sorted(self.counts.items()))}>"


def render(
    mesh: MeshTLS,
    plaintext: tuple[int, int] | None = None,
    prefix: str = "tether",
) -> str:
    """The TLS families of `/stats/prometheus`; `plaintext` is the inbound port's
    (served, refused) plaintext connections when it sorts them (`MeshServer`)."""
    p = prefix
    counts = mesh.handshakes.counts
    out = [
        f"# HELP {p}_tls_handshakes_total Mesh TLS handshakes by side and result.",
        f"# TYPE {p}_tls_handshakes_total counter",
    ]
    for side in SIDES:
        ok = counts.get((side, "ok"), 0)
        out.append(f'{p}_tls_handshakes_total{{side="{side}",result="ok"}} {ok}')
        for reason in REASONS:
            n = counts.get((side, reason), 0)
            out.append(
                f'{p}_tls_handshakes_total{{side="{side}",result="failed",reason="{reason}"}} {n}'
            )
    leaf = mesh.leaf
    if leaf is not None:
        out += [
            f"# HELP {p}_certificate_expiry_timestamp_seconds When the sidecar's leaf"
            " certificate expires (Unix time).",
            f"# TYPE {p}_certificate_expiry_timestamp_seconds gauge",
            f"{p}_certificate_expiry_timestamp_seconds {leaf.not_valid_after_utc.timestamp():.0f}",
        ]
    out += [
        f"# HELP {p}_tls_trust_bundle_roots Root certificates in the trust bundle.",
        f"# TYPE {p}_tls_trust_bundle_roots gauge",
        f"{p}_tls_trust_bundle_roots {len(mesh.roots)}",
    ]
    if plaintext is not None:
        served, refused = plaintext
        out += [
            f"# HELP {p}_inbound_plaintext_connections_total Plaintext connections at the"
            " inbound port: served (permissive mode) or refused (strict).",
            f"# TYPE {p}_inbound_plaintext_connections_total counter",
            f'{p}_inbound_plaintext_connections_total{{result="served"}} {served}',
            f'{p}_inbound_plaintext_connections_total{{result="refused"}} {refused}',
        ]
    return "\n".join(out) + "\n"


def expiry(mesh: MeshTLS | None) -> float | None:
    """The leaf's expiry as Unix time (what the stats reports carry), None without one."""
    leaf = mesh.leaf if mesh is not None else None
    return leaf.not_valid_after_utc.timestamp() if leaf is not None else None
