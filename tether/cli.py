"""The `tether` command: one entry point, a subcommand per part of the mesh.

Each subcommand imports its part lazily, so `tether sidecar` never pays for the
control plane's imports and `tether --help` starts fast.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import click


def run_async(main: Coroutine[Any, Any, None]) -> None:
    """Run `main` on uvloop until it returns or SIGINT/SIGTERM cancels it."""
    import uvloop

    async def runner() -> None:
        task = asyncio.ensure_future(main)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, task.cancel)
        try:
            await task
        except asyncio.CancelledError:
            pass

    uvloop.run(runner())


@click.group()
@click.version_option(package_name="tether")
def main() -> None:
    """Tether: a service mesh that is simple to run."""


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8500, show_default=True, type=int, help="HTTP API port.")
@click.option(
    "--data-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Where state is kept durably (default: in memory only).",
)
@click.option(
    "--management-token",
    envvar="TETHER_MANAGEMENT_TOKEN",
    default=None,
    help="Turns ACLs on (default deny); this token may do everything. Open when unset.",
)
@click.option("--node", default=None, help="Node name (default: the host name).")
@click.option("--datacenter", default="dc1", show_default=True)
@click.option("--fsync/--no-fsync", default=False, help="fsync every write (power-loss safe).")
@click.option(
    "--session-ttl-min",
    default="10s",
    show_default=True,
    help="Shortest session TTL accepted (Consul's session_ttl_min).",
)
@click.option(
    "--max-connections-per-client",
    default=200,
    show_default=True,
    type=click.IntRange(min=0),
    help="Open connections one client IP may hold (Consul's http_max_conns_per_client; 0: "
    "no cap); more get 429.",
)
@click.option(
    "--max-connections",
    default=8192,
    show_default=True,
    type=click.IntRange(min=1),
    help="Open connections in all; more get 503.",
)
def registry(
    host: str,
    port: int,
    data_dir: Path | None,
    management_token: str | None,
    node: str | None,
    datacenter: str,
    fsync: bool,
    session_ttl_min: str,
    max_connections_per_client: int,
    max_connections: int,
) -> None:
    """Run the embedded registry (a Consul-compatible HTTP API)."""
    from dataclasses import replace

    from registry.http import RegistrySpec, parse_duration
    from registry.server import serve
    from tether.http_limits import REGISTRY_LIMITS

    try:
        ttl_min = parse_duration(session_ttl_min)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--session-ttl-min") from exc

    spec = RegistrySpec(
        host=host,
        port=port,
        data_dir=data_dir,
        management_token=management_token,
        node=node or socket.gethostname(),
        datacenter=datacenter,
        fsync=fsync,
        session_ttl_min=ttl_min,
    )
    limits = replace(
        REGISTRY_LIMITS,
        max_connections=max_connections,
        max_connections_per_client=max_connections_per_client,
    )
    from registry.errors import DataDirError

    try:
        run_async(serve(spec, limits=limits))
    except DataDirError as exc:
        raise click.ClickException(str(exc)) from None


def _meta_pairs(
    ctx: click.Context, param: click.Parameter, value: tuple[str, ...]
) -> dict[str, str]:
    meta = {}
    for item in value:
        key, sep, val = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{item!r} is not KEY=VALUE")
        meta[key] = val
    return meta


@main.command()
@click.option("--service", required=True, help="Service name this instance registers as.")
@click.option("--app-port", required=True, type=int, help="Port the app listens on (127.0.0.1).")
@click.option("--app-health-path", default=None, help="App health path (default: TCP check).")
@click.option("--outbound-port", default=15001, show_default=True, type=int)
@click.option("--inbound-port", default=15006, show_default=True, type=int)
@click.option("--admin-port", default=15000, show_default=True, type=int)
@click.option("--inbound-host", default="127.0.0.1", show_default=True, help="Inbound bind.")
@click.option("--advertise-host", default=None, help="Address callers dial (default: bind).")
@click.option("--namespace", default="default", show_default=True)
@click.option("--zone", default="", help="Locality zone of this instance.")
@click.option("--version", "version_", default="", help="Version tag (e.g. v2).")
@click.option("--meta", multiple=True, callback=_meta_pairs, help="Extra Meta KEY=VALUE.")
@click.option("--controlplane", default=None, help="Control plane URL (policy push).")
@click.option("--egress", type=click.Choice(["allow", "deny"]), default="allow", show_default=True)
@click.option("--opaque-port", multiple=True, type=int, help="Port proxied as raw TCP.")
@click.option("--drain-seconds", default=15.0, show_default=True, type=float)
@click.option("--check-interval", default=5.0, show_default=True, type=float)
@click.option(
    "--app-check-via",
    type=click.Choice(["app", "inbound"]),
    default="app",
    show_default=True,
    help="Where the registry checks the app: directly, or through the inbound listener "
    "(a registry in another network namespace).",
)
@click.option(
    "--sched",
    type=click.Choice(["batch", "normal"]),
    default="batch",
    show_default=True,
    help="Linux scheduling policy: batch (no wake-up preemption; fewer context switches "
    "per request, see docs/benchmarks.md) or the kernel's normal one.",
)
def sidecar(
    service: str,
    app_port: int,
    app_health_path: str | None,
    outbound_port: int,
    inbound_port: int,
    admin_port: int,
    inbound_host: str,
    advertise_host: str | None,
    namespace: str,
    zone: str,
    version_: str,
    meta: dict[str, str],
    controlplane: str | None,
    egress: str,
    opaque_port: tuple[int, ...],
    drain_seconds: float,
    check_interval: float,
    app_check_via: str,
    sched: str,
) -> None:
    """Run the sidecar proxy beside one app instance (registry: CONSUL_HTTP_ADDR)."""
    import logging

    from proxy.sidecar import Sidecar, SidecarSpec

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    host, port = consul_address()
    raw = os.environ.get("CONSUL_HTTP_ADDR", "")
    ssl = os.environ.get("CONSUL_HTTP_SSL", "").lower() == "true"
    try:
        spec = SidecarSpec(
            service=service,
            app_port=app_port,
            app_health_path=app_health_path,
            outbound_port=outbound_port,
            inbound_port=inbound_port,
            admin_port=admin_port,
            inbound_host=inbound_host,
            advertise_host=advertise_host,
            namespace=namespace,
            zone=zone,
            version=version_,
            meta=meta,
            controlplane=controlplane,
            egress="deny" if egress == "deny" else "allow",
            opaque_ports=opaque_port,
            drain_seconds=drain_seconds,
            check_interval=check_interval,
            app_check_via="inbound" if app_check_via == "inbound" else "app",
            sched_batch=sched == "batch",
            registry_host=host,
            registry_port=port,
            registry_scheme="https" if raw.startswith("https://") or ssl else "http",
            registry_token=os.environ.get("CONSUL_HTTP_TOKEN") or None,
        )
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    try:
        run_async(Sidecar(spec).run())
    except OSError as exc:  # a port in use, an address not on this host
        raise click.ClickException(f"cannot listen: {exc}") from exc


@main.command()
@click.option("--registry-port", type=int, default=None, help="Default: 8500 if free, else any.")
@click.option("--rate", default=2.0, show_default=True, help="Requests/s frontend drives.")
@click.option("--drain-seconds", default=5.0, show_default=True, type=float)
@click.option("--view/--no-view", default=None, help="Live view (default: on a terminal).")
@click.option("--controlplane/--no-controlplane", default=True, show_default=True)
@click.option("--controlplane-port", type=int, default=None, help="Default: 15010 if free.")
@click.option(
    "--policies",
    type=click.Path(exists=True, path_type=Path),
    default=None,
    help="Policy file or directory applied at start.  [default: examples/policies]",
)
@click.option("--no-policies", is_flag=True, help="Apply no policies at start.")
def up(
    registry_port: int | None,
    rate: float,
    drain_seconds: float,
    view: bool | None,
    controlplane: bool,
    controlplane_port: int | None,
    policies: Path | None,
    no_policies: bool,
) -> None:
    """Run a live local mesh: registry, control plane, demo apps and a sidecar each."""
    from tether.up import UpSpec
    from tether.up import main as run_up

    spec = UpSpec(
        registry_port=registry_port,
        rate=rate,
        drain_seconds=drain_seconds,
        view=view,
        controlplane=controlplane,
        controlplane_port=controlplane_port,
    )
    if no_policies:
        spec.policies = None
    elif policies is not None:
        spec.policies = policies
    run_up(spec)


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=15010, show_default=True, type=int, help="API port.")
@click.option(
    "--max-connections",
    default=4096,
    show_default=True,
    type=click.IntRange(min=1),
    help="Open connections in all, sidecars' push connections included; more get 503.",
)
def controlplane(host: str, port: int, max_connections: int) -> None:
    """Run the control plane (registry: CONSUL_HTTP_ADDR, CONSUL_HTTP_TOKEN)."""
    from dataclasses import replace

    from controlplane.server import ControlPlaneSpec, serve
    from tether.http_limits import CONTROLPLANE_LIMITS

    limits = replace(CONTROLPLANE_LIMITS, max_connections=max_connections)
    run_async(serve(ControlPlaneSpec(host=host, port=port, limits=limits)))


# -- operator commands: policy through the control plane's API (controlplane/operator.py)

_cp_option = click.option(
    "--controlplane",
    "cp_url",
    envvar="TETHER_CONTROLPLANE",
    default="http://127.0.0.1:15010",
    show_default=True,
    help="Control plane URL (env TETHER_CONTROLPLANE).",
)
_token_option = click.option(
    "--token",
    envvar=["TETHER_TOKEN", "CONSUL_HTTP_TOKEN"],
    default=None,
    help="Registry ACL token for writes (env TETHER_TOKEN, CONSUL_HTTP_TOKEN).",
)
_files_option = click.option(
    "-f", "--filename", "files", multiple=True, help="A file, a directory, or - for stdin."
)


def _operator(run: Any) -> None:
    from controlplane.operator import InputError

    try:
        code = run()
    except InputError as exc:
        click.echo(f"error: {exc}", err=True)
        code = 1
    raise SystemExit(code)


@main.command()
@_files_option
@click.option("--dry-run", is_flag=True, help="Validate and show the diff; change nothing.")
@_cp_option
@_token_option
def apply(files: tuple[str, ...], dry_run: bool, cp_url: str, token: str | None) -> None:
    """Validate policy documents, show the diff, and apply them."""
    import sys

    from controlplane import operator
    from controlplane.client import ControlPlaneClient

    if not files:
        raise click.UsageError("give -f FILE|DIR|-")
    client = ControlPlaneClient(cp_url, token)
    _operator(
        lambda: operator.apply(client, operator.read_inputs(files), dry_run, sys.stdout, sys.stderr)
    )


@main.command()
@_files_option
@_cp_option
@_token_option
def diff(files: tuple[str, ...], cp_url: str, token: str | None) -> None:
    """Show what applying the documents would change (exit 1 when something would)."""
    import sys

    from controlplane import operator
    from controlplane.client import ControlPlaneClient

    if not files:
        raise click.UsageError("give -f FILE|DIR|-")
    client = ControlPlaneClient(cp_url, token)
    _operator(lambda: operator.diff(client, operator.read_inputs(files), sys.stdout, sys.stderr))


@main.command()
@click.argument("kind")
@click.argument("name", required=False)
@click.option("-n", "--namespace", default=None, help="Namespace (default: default).")
@click.option("-A", "--all-namespaces", is_flag=True)
@click.option("-o", "--output", type=click.Choice(["table", "yaml", "json"]), default="table")
@_cp_option
@_token_option
def get(
    kind: str,
    name: str | None,
    namespace: str | None,
    all_namespaces: bool,
    output: str,
    cp_url: str,
    token: str | None,
) -> None:
    """Show resources of KIND (ServiceDefaults, Route, TrafficSplit, MeshConfig)."""
    import sys

    from controlplane import operator
    from controlplane.client import ControlPlaneClient

    client = ControlPlaneClient(cp_url, token)
    _operator(
        lambda: operator.get(
            client, kind, name, namespace, all_namespaces, output, sys.stdout, sys.stderr
        )
    )


@main.command()
@click.argument("kind", required=False)
@click.argument("name", required=False)
@click.option("-n", "--namespace", default=None, help="Namespace (default: default).")
@_files_option
@click.option("--dry-run", is_flag=True)
@_cp_option
@_token_option
def delete(
    kind: str | None,
    name: str | None,
    namespace: str | None,
    files: tuple[str, ...],
    dry_run: bool,
    cp_url: str,
    token: str | None,
) -> None:
    """Delete KIND NAME, or the resources the documents of -f FILE name."""
    import sys

    from controlplane import operator
    from controlplane.client import ControlPlaneClient

    client = ControlPlaneClient(cp_url, token)
    _operator(
        lambda: operator.delete(
            client,
            kind,
            name,
            namespace,
            operator.read_inputs(files) if files else [],
            dry_run,
            sys.stdout,
            sys.stderr,
        )
    )


@main.command()
@click.option("-s", "--service", default=None, help="Only this service's sidecars.")
@click.option("-n", "--namespace", default=None, help="Only this namespace.")
@click.option("-o", "--output", type=click.Choice(["table", "json"]), default="table")
@_cp_option
def status(service: str | None, namespace: str | None, output: str, cp_url: str) -> None:
    """Every sidecar: service, instance, config version, acked or nacked (why), last seen."""
    import json
    import time

    from controlplane import status as view
    from controlplane.client import ApiError, ControlPlaneClient

    query = {k: v for k, v in (("service", service), ("namespace", namespace)) if v}
    try:
        body = ControlPlaneClient(cp_url).request("GET", "/sidecars", query=query)
    except ApiError as exc:
        raise click.ClickException(str(exc)) from None
    records = body.get("sidecars", [])
    if output == "json":
        click.echo(json.dumps(body, indent=2))
        return
    click.echo(view.table(records, time.time()))
    click.echo(f"\n{view.summary(records)}; config version {body.get('version')}")


def consul_address() -> tuple[str, int]:
    """CONSUL_HTTP_ADDR as every Consul tool reads it (default 127.0.0.1:8500)."""
    addr = os.environ.get("CONSUL_HTTP_ADDR", "127.0.0.1:8500")
    addr = addr.removeprefix("http://").removeprefix("https://")
    host, _, port = addr.rpartition(":")
    return (host or "127.0.0.1", int(port or 8500))


# -- tether top: the mesh's live traffic from the control plane (tether/top.py) -------


@main.command()
@_cp_option
@click.option(
    "--token",
    envvar=["TETHER_TOKEN", "CONSUL_HTTP_TOKEN"],
    default=None,
    help="Registry ACL token (env TETHER_TOKEN, CONSUL_HTTP_TOKEN).",
)
@click.option("--interval", default=2.0, show_default=True, type=float, help="Seconds per frame.")
@click.option("--once", is_flag=True, help="Print one frame and exit.")
def top(cp_url: str, token: str | None, interval: float, once: bool) -> None:
    """Services and the edges between them: requests/s, success rate, p50/p99, retries,
    ejections, from the stats every sidecar reports to the control plane."""
    from controlplane.client import ApiError, ControlPlaneClient
    from tether import top as view

    client = ControlPlaneClient(cp_url, token=token)

    def fetch() -> Any:
        try:
            return client.request("GET", "/stats")
        except ApiError as exc:
            raise click.ClickException(str(exc)) from None

    view.run(fetch, cp_url, interval=max(interval, 0.2), once=once)


if __name__ == "__main__":
    main()
