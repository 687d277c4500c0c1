"""`tether top`: a live terminal view of the mesh's services and the edges between them.

It reads `GET /api/v1/stats` of the control plane (what every sidecar reported over its
push connection in the last window, merged over the replicas) every `interval` seconds
and draws it with rich: per service the requests its sidecars handed to the app, per
edge (caller -> callee, per subset when a TrafficSplit names one) requests/s, success
rate, p50/p99, retries and ejections. `--once` prints one frame and exits.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

from rich import box
from rich.console import Console, Group, RenderableType
from rich.table import Table
from rich.text import Text


def _rate(row: Mapping[str, Any]) -> str:
    return f"{row.get('rps') or 0:.1f}"


def _success(row: Mapping[str, Any]) -> Text:
    value = row.get("success_rate")
    if value is None:
        return Text("-", "dim")
    style = "green" if value >= 0.99 else "yellow" if value >= 0.95 else "red"
    return Text(f"{value:.1%}", style)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}ms"


def render(stats: Mapping[str, Any], source: str = "") -> RenderableType:
    """One frame from the answer of `GET /api/v1/stats`."""
    services = Table(
        title="services (requests in, as their sidecars handed them to the app)",
        box=box.SIMPLE_HEAD,
        title_justify="left",
    )
    for col in ("service", "rps", "success", "p50", "p99", "sidecars"):
        services.add_column(col, justify="left" if col == "service" else "right", no_wrap=True)
    for row in stats.get("services", ()):
        services.add_row(
            row["service"],
            _rate(row),
            _success(row),
            _ms(row.get("p50_ms")),
            _ms(row.get("p99_ms")),
            str(row.get("sidecars", 0)),
        )
    edges = Table(
        title="edges (caller -> callee, as the caller's sidecar saw them)",
        box=box.SIMPLE_HEAD,
        title_justify="left",
    )
    cols = ("source", "destination", "rps", "success", "p50", "p99", "retries", "ejections")
    for col in cols:
        edges.add_column(col, justify="left" if col in cols[:2] else "right", no_wrap=True)
    for row in stats.get("edges", ()):
        dest = row["destination"] + (f" ({row['subset']})" if row.get("subset") else "")
        edges.add_row(
            row["source"],
            dest,
            _rate(row),
            _success(row),
            _ms(row.get("p50_ms")),
            _ms(row.get("p99_ms")),
            str(row.get("retries", 0)),
            str(row.get("ejections", 0)),
        )
    replicas = ", ".join(stats.get("replicas", ()))
    head = Text(
        f"tether top  {source}  window {stats.get('window', 0):.0f}s  replicas: {replicas}",
        style="bold",
    )
    if not stats.get("services") and not stats.get("edges"):
        return Group(head, Text("no traffic reported in the window yet", style="dim"))
    return Group(head, services, edges)


def frame_text(stats: Mapping[str, Any], width: int = 100, source: str = "") -> str:
    """One frame as plain text (what `--once` prints when not on a terminal)."""
    console = Console(record=True, width=width, force_terminal=False, color_system=None)
    with console.capture():
        console.print(render(stats, source))
    return console.export_text()


def run(
    fetch: Callable[[], Mapping[str, Any]], source: str, interval: float = 2.0, once: bool = False
) -> None:
    """Draw `fetch()` every `interval` seconds until Ctrl-C (once with `once`)."""
    console = Console()
    if once:
        console.print(render(fetch(), source))
        return
    from rich.live import Live

    with Live(render(fetch(), source), console=console, screen=False) as live:
        try:
            while True:
                time.sleep(interval)
                live.update(render(fetch(), source))
        except KeyboardInterrupt:
            pass
