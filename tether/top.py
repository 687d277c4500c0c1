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
    return "-" if value is None else f"{value:.1f}"


def _table(title: str, columns: tuple[str, ...], names: int) -> Table:
    # Fits 80 columns: the box's blank separators are the only space between columns.
    table = Table(
        title=title, box=box.SIMPLE_HEAD, title_justify="left", padding=0,
        pad_edge=False, show_edge=False,
    )  # fmt: skip
    for i, col in enumerate(columns):
        table.add_column(col, justify="left" if i < names else "right", no_wrap=True)
    return table


def render(stats: Mapping[str, Any], source: str = "") -> RenderableType:
    """One frame from the answer of `GET /api/v1/stats`."""
    services = _table(
        "services: requests handed to the app",
        ("service", "rps", "success", "p50 ms", "p99 ms", "sidecars"),
        1,
    )
    for row in stats.get("services", ()):
        services.add_row(
            row["service"],
            _rate(row),
            _success(row),
            _ms(row.get("p50_ms")),
            _ms(row.get("p99_ms")),
            str(row.get("sidecars", 0)),
        )
    edges = _table(
        "edges: caller -> callee, as the caller's sidecar saw them (p50/p99 in ms)",
        ("source", "destination", "subset", "rps", "success", "p50", "p99", "retry", "eject"),
        3,
    )
    for row in stats.get("edges", ()):
        edges.add_row(
            row["source"],
            row["destination"],
            row.get("subset") or "-",
            _rate(row),
            _success(row),
            _ms(row.get("p50_ms")),
            _ms(row.get("p99_ms")),
            str(row.get("retries", 0)),
            str(row.get("ejections", 0)),
        )
    replicas = ", ".join(stats.get("replicas", ()))
    head = Text(
        f"tether top  {source}  last {stats.get('window', 0):.0f}s  replicas: {replicas}",
        style="bold",
    )
    if not stats.get("services") and not stats.get("edges"):
        return Group(head, Text("no traffic reported in the window yet", style="dim"))
    return Group(head, Text(""), services, Text(""), edges)


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
