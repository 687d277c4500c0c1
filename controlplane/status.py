"""What `tether status` shows: every sidecar's config version and push state, as a table.

Pure formatting of `GET /api/v1/sidecars` (controlplane/push.py); kept apart from the
push server so the command does not import aiohttp.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

HEADERS = ("NAMESPACE", "SERVICE", "INSTANCE", "VERSION", "STATE", "LAST SEEN", "REPLICA", "ERROR")


def ago(seconds: float) -> str:
    if seconds < 2:
        return "now"
    if seconds < 120:
        return f"{seconds:.0f}s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m ago"
    return f"{seconds / 3600:.0f}h ago"


def row(rec: Mapping[str, Any], now: float) -> tuple[str, ...]:
    state = str(rec.get("state", ""))
    version = str(rec.get("acked_version") or "-")
    if state == "nacked":
        version += f" (refused {rec.get('nacked_version')})"
    elif state == "pending":
        version += f" (sent {rec.get('sent_version')})"
    last = float(rec.get("last_seen") or 0)
    error = " ".join(str(rec.get("error") or "").split())
    if len(error) > 120:
        error = error[:117] + "..."
    return (
        str(rec.get("namespace", "")),
        str(rec.get("service", "")),
        str(rec.get("instance", "")),
        version,
        state,
        ago(now - last) if last else "-",
        str(rec.get("replica", "")),
        error,
    )


def table(records: Sequence[Mapping[str, Any]], now: float) -> str:
    """Aligned columns, one sidecar per line (the error column last, unpadded)."""
    rows = [HEADERS, *(row(r, now) for r in records)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(HEADERS) - 1)]
    lines = []
    for r in rows:
        cells = [c.ljust(w) for c, w in zip(r[:-1], widths, strict=True)]
        lines.append("  ".join([*cells, r[-1]]).rstrip())
    return "\n".join(lines)


def summary(records: Sequence[Mapping[str, Any]]) -> str:
    counts: dict[str, int] = {}
    for r in records:
        counts[str(r.get("state"))] = counts.get(str(r.get("state")), 0) + 1
    parts = [f"{n} {state}" for state, n in sorted(counts.items())]
    return f"{len(records)} sidecars: " + (", ".join(parts) if parts else "none")
