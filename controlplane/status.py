"""What `tether status` shows: every sidecar's config version and push state, as a table.

Pure formatting of `GET /api/v1/sidecars` (controlplane/push.py); kept apart from the
push server so the command does not import aiohttp.

CONFIG VERSION is the version of the snapshot the sidecar acked: the config version
`tether apply` prints. A sidecar is only sent a new snapshot when a change concerns it,
so one that acked an older version can be current; SYNCED says which (as
`istioctl proxy-status`): `in sync` (it acked what it should run), `stale` (not acked
yet, or no longer connected) or `nacked` (it refused the last push, and runs the one
before). Disconnected sidecars are shown for `retention` seconds after they were last
seen, then left out (the output says how many).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

HEADERS = (
    "NAMESPACE",
    "SERVICE",
    "INSTANCE",
    "CONFIG VERSION",
    "SYNCED",
    "STATE",
    "LAST SEEN",
    "REPLICA",
    "ERROR",
)
SYNCED = {"acked": "in sync", "nacked": "nacked"}  # any other state: stale
DEFAULT_RETENTION = 120.0  # seconds a disconnected sidecar stays in the listing


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
        synced(rec),
        state,
        ago(now - last) if last else "-",
        str(rec.get("replica", "")),
        error,
    )


def synced(rec: Mapping[str, Any]) -> str:
    return SYNCED.get(str(rec.get("state", "")), "stale")


def retained(
    records: Sequence[Mapping[str, Any]], now: float, retention: float
) -> tuple[list[Mapping[str, Any]], int]:
    """The records to show, and how many disconnected ones were left out (older)."""
    keep = [
        r
        for r in records
        if r.get("state") != "disconnected" or now - float(r.get("last_seen") or 0) <= retention
    ]
    return keep, len(records) - len(keep)


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


def analyses(splits: Sequence[Mapping[str, Any]], now: float) -> list[str]:
    """A line per TrafficSplit under a canary analysis: phase, step, live weights, and
    the last decision with its numbers (controlplane/canary.py)."""
    out = []
    for doc in splits:
        an = (doc.get("status") or {}).get("analysis")
        if not isinstance(an, Mapping):
            continue
        meta = doc.get("metadata") or {}
        weights = " ".join(f"{k}={v}" for k, v in (an.get("weights") or {}).items())
        steps = ((doc.get("spec") or {}).get("analysis") or {}).get("steps") or []
        line = (
            f"canary {meta.get('namespace', '')}/{meta.get('name', '')}: {an.get('phase')}, "
            f"step {int(an.get('step', 0)) + 1}/{len(steps)}, weights {weights}"
        )
        history = an.get("history") or []
        if history:
            last = history[-1]
            rate = last.get("successRate")
            numbers = f"{last.get('requests', 0)} requests"
            if rate is not None:
                numbers += f", {rate * 100:.1f}% ok"
            why = f": {last['reason']}" if last.get("reason") else ""
            line += f"; {last.get('event')} {ago(now - float(last.get('time', now)))}"
            line += f" ({numbers}){why}"
        out.append(line)
    return out
