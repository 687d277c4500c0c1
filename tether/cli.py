"""The `tether` command: one entry point, a subcommand per part of the mesh.

Each subcommand imports its part lazily, so `tether sidecar` never pays for the
control plane's imports and `tether --help` starts fast.
"""

from __future__ import annotations

import asyncio
import errno
import os
import signal
import socket
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import click

# Every port flag: 0 asks the kernel for any free port (the command prints the real one).
PORT = click.IntRange(0, 65535)
T = TypeVar("T")


def run_async_result(main: Coroutine[Any, Any, T]) -> T:
    """Run a short start-up step on uvloop and return its result."""
    import uvloop

    return uvloop.run(main)


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


def startup_error(exc: OSError, port: int, port_flag: str) -> str:
    """One line for a server that could not start: the cause and the fix."""
    if exc.errno == errno.EADDRINUSE:
        return f"port {port} is in use; pass {port_flag} 0 (any free port) or stop what holds it"
    if exc.errno == errno.EADDRNOTAVAIL:
        return f"cannot listen: the address is not on this host ({exc.strerror})"
    if exc.filename:
        return f"cannot use {exc.filename}: {exc.strerror or exc}"
    return str(exc)


def serve_or_exit(main: Coroutine[Any, Any, None], port: int, port_flag: str) -> None:
    """Run a server command; a start-up failure is one line and exit status 1."""
    try:
        run_async(main)
    except OSError as exc:
        raise click.ClickException(startup_error(exc, port, port_flag)) from None


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="tether")
def main() -> None:
    """Tether: a service mesh that is simple to run."""


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8500, show_default=True, type=PORT, help="HTTP API port.")
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
        serve_or_exit(serve(spec, limits=limits), port, "--port")
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
@click.option("--app-port", required=True, type=PORT, help="Port the app listens on (127.0.0.1).")
@click.option("--app-health-path", default=None, help="App health path (default: TCP check).")
@click.option("--outbound-port", default=15001, show_default=True, type=PORT)
@click.option("--inbound-port", default=15006, show_default=True, type=PORT)
@click.option("--admin-port", default=15000, show_default=True, type=PORT)
@click.option("--inbound-host", default="127.0.0.1", show_default=True, help="Inbound bind.")
@click.option(
    "--ingress-port",
    default=None,
    type=PORT,
    help="A plaintext listener (bound on --inbound-host) for callers outside the mesh, "
    "routed to this service like the app's own calls (default: none).",
)
@click.option("--advertise-host", default=None, help="Address callers dial (default: bind).")
@click.option("--namespace", default="default", show_default=True)
@click.option("--zone", default="", help="Locality zone of this instance.")
@click.option("--version", "version_", default="", help="Version tag (e.g. v2).")
@click.option("--meta", multiple=True, callback=_meta_pairs, help="Extra Meta KEY=VALUE.")
@click.option("--controlplane", default=None, help="Control plane URL (policy push).")
@click.option(
    "--ca-file",
    default=None,
    type=click.Path(exists=True, dir_okay=False),
    help="PEM roots to trust the control plane's TLS port with (default: the bundle its "
    "plain port serves, trusted on first use).",
)
@click.option("--egress", type=click.Choice(["allow", "deny"]), default="allow", show_default=True)
@click.option(
    "--egress-to-control",
    type=click.Choice(["allow", "deny"]),
    default="deny",
    show_default=True,
    help="Egress to the mesh's own control surfaces (this sidecar's ports, the control "
    "plane, the registry): refused with 403 egress_denied unless allowed.",
)
@click.option("--opaque-port", multiple=True, type=PORT, help="Port proxied as raw TCP.")
@click.option(
    "--app-protocol",
    type=click.Choice(["http", "http2", "grpc"]),
    default="http",
    show_default=True,
    help="What the app speaks: HTTP/2 callers reach an http2 or grpc app over h2c "
    "(registered as Meta protocol).",
)
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
@click.option(
    "--access-log",
    default=None,
    metavar="PATH|-",
    help="Write one JSON line per request to PATH (appended), or to standard output with -.",
)
@click.option(
    "--access-log-sample",
    default=1.0,
    show_default=True,
    type=float,
    help="Share of requests logged, 0-1.",
)
@click.option(
    "--access-log-status",
    default="",
    metavar="CLASSES",
    help="Log only these status classes, e.g. 4xx,5xx (none: ended without a status).",
)
def sidecar(
    service: str,
    app_port: int,
    app_health_path: str | None,
    outbound_port: int,
    inbound_port: int,
    admin_port: int,
    inbound_host: str,
    ingress_port: int | None,
    advertise_host: str | None,
    namespace: str,
    zone: str,
    version_: str,
    meta: dict[str, str],
    controlplane: str | None,
    ca_file: str | None,
    egress: str,
    egress_to_control: str,
    opaque_port: tuple[int, ...],
    app_protocol: str,
    drain_seconds: float,
    check_interval: float,
    app_check_via: str,
    sched: str,
    access_log: str | None,
    access_log_sample: float,
    access_log_status: str,
) -> None:
    """Run the sidecar proxy beside one app instance (registry: CONSUL_HTTP_ADDR).

    Tracing is on when OTEL_TRACES_EXPORTER=otlp (docs/observability.md)."""
    import logging

    from proxy.sidecar import Sidecar, SidecarSpec

    # TETHER_LOG_LEVEL: set by injected sidecars (the tether.dev/log-level annotation).
    level = os.environ.get("TETHER_LOG_LEVEL", "info").upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise click.UsageError(
            f"TETHER_LOG_LEVEL: {level.lower()!r} is not debug|info|warning|error"
        )
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
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
            ingress_port=ingress_port,
            advertise_host=advertise_host,
            namespace=namespace,
            zone=zone,
            version=version_,
            meta=meta,
            controlplane=controlplane,
            ca_file=ca_file,
            identity_token_file=os.environ.get("TETHER_IDENTITY_TOKEN") or None,
            egress="deny" if egress == "deny" else "allow",
            egress_to_control="allow" if egress_to_control == "allow" else "deny",
            opaque_ports=opaque_port,
            app_protocol=app_protocol,
            drain_seconds=drain_seconds,
            check_interval=check_interval,
            app_check_via="inbound" if app_check_via == "inbound" else "app",
            sched_batch=sched == "batch",
            registry_host=host,
            registry_port=port,
            registry_scheme="https" if raw.startswith("https://") or ssl else "http",
            registry_token=os.environ.get("CONSUL_HTTP_TOKEN") or None,
            access_log=access_log,
            access_log_sample=access_log_sample,
            access_log_status=access_log_status,
        )
        from proxy.trace_context import check_env

        check_env(os.environ)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    from proxy.errors import SidecarStartError

    try:
        run_async(Sidecar(spec).run())
    except OSError as exc:  # a port in use, an address not on this host
        raise click.ClickException(f"cannot listen: {exc}") from exc
    except SidecarStartError as exc:
        raise click.ClickException(str(exc)) from exc


@main.command()
@click.option("--registry-port", type=PORT, default=None, help="Default: 8500 if free, else any.")
@click.option("--rate", default=2.0, show_default=True, help="Requests/s frontend drives.")
@click.option("--drain-seconds", default=5.0, show_default=True, type=float)
@click.option("--view/--no-view", default=None, help="Live view (default: on a terminal).")
@click.option("--controlplane/--no-controlplane", default=True, show_default=True)
@click.option("--controlplane-port", type=PORT, default=None, help="Default: 15010 if free.")
@click.option(
    "--policies",
    type=click.Path(exists=True, path_type=Path),
    default=None,
    help="Policy file or directory applied at start.  [default: the demo's, tether/demo/policies]",
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

    if not controlplane and (policies is not None or controlplane_port is not None):
        flag = "--policies" if policies is not None else "--controlplane-port"
        raise click.UsageError(f"{flag} needs the control plane; drop --no-controlplane")
    if no_policies and policies is not None:
        raise click.UsageError("--policies and --no-policies contradict each other")
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
@click.option("--port", default=15010, show_default=True, type=PORT, help="API port.")
@click.option(
    "--tls-port",
    default=15012,
    show_default=True,
    type=PORT,
    help="TLS port of the push and CSR signing, opened when the mesh CA is on "
    "(certificate from the mesh CA).",
)
@click.option(
    "--registry-wait",
    default=10.0,
    show_default=True,
    type=click.FloatRange(0, 3600),
    help="Seconds to wait for the registry at start before giving up.",
)
@click.option(
    "--max-connections",
    default=4096,
    show_default=True,
    type=click.IntRange(min=1),
    help="Open connections in all, sidecars' push connections included; more get 503.",
)
def controlplane(
    host: str, port: int, tls_port: int, registry_wait: float, max_connections: int
) -> None:
    """Run the control plane (registry: CONSUL_HTTP_ADDR, CONSUL_HTTP_TOKEN)."""
    from dataclasses import replace

    from controlplane.server import ControlPlaneSpec, RegistryAddress, serve
    from tether.http_limits import CONTROLPLANE_LIMITS

    consul_address()  # a malformed CONSUL_HTTP_ADDR is a usage error, not a traceback
    registry = RegistryAddress.from_env()
    reached = run_async_result(_registry_reachable(registry, registry_wait))
    if reached is not None:
        raise click.ClickException(
            f"registry at {registry.scheme}://{registry.host}:{registry.port} is unreachable "
            f"({reached}); start it, or point CONSUL_HTTP_ADDR at it"
        )
    limits = replace(CONTROLPLANE_LIMITS, max_connections=max_connections)
    spec = ControlPlaneSpec(
        host=host, port=port, registry=registry, limits=limits, tls_port=tls_port
    )
    serve_or_exit(serve(spec), port, "--port")


async def _registry_reachable(registry: Any, wait: float) -> str | None:
    """None once the registry answers (within `wait` s), else why it did not."""
    import consul.aio

    client = consul.aio.Consul(
        host=registry.host, port=registry.port, scheme=registry.scheme, token=registry.token
    )
    deadline = time.monotonic() + wait
    try:
        while True:
            try:
                remaining = max(0.5, deadline - time.monotonic())
                await asyncio.wait_for(client.status.leader(), min(2.0, remaining))
                return None
            except Exception as exc:  # refused, reset, timed out, an HTTP error: all "not yet"
                if time.monotonic() >= deadline:
                    return str(exc) or type(exc).__name__
            await asyncio.sleep(0.2)
    finally:
        await client.close()


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
        click.echo(f"Error: {exc}", err=True)
        code = 1
    raise SystemExit(code)


@main.command()
@_files_option
@click.option("--dry-run", is_flag=True, help="Validate and show the diff; change nothing.")
@click.option("-n", "--namespace", default=None, help="Namespace of documents that name none.")
@_cp_option
@_token_option
def apply(
    files: tuple[str, ...], dry_run: bool, namespace: str | None, cp_url: str, token: str | None
) -> None:
    """Validate policy documents, show the diff, apply them, and print the config version."""
    import sys

    from controlplane import operator
    from controlplane.client import ControlPlaneClient

    if not files:
        raise click.UsageError("give -f FILE|DIR|-")
    client = ControlPlaneClient(cp_url, token)
    _operator(
        lambda: operator.apply(
            client, operator.read_inputs(files), dry_run, sys.stdout, sys.stderr, namespace
        )
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
@click.argument("kind", required=False)
@click.argument("name", required=False)
@click.option("-n", "--namespace", default=None, help="Namespace (default: default).")
@click.option("-A", "--all-namespaces", is_flag=True)
@click.option("-o", "--output", type=click.Choice(["table", "yaml", "json"]), default="table")
@click.option(
    "--show-defaults", is_flag=True, help="Every field, defaults filled in (what is in force)."
)
@_cp_option
@_token_option
def get(
    kind: str | None,
    name: str | None,
    namespace: str | None,
    all_namespaces: bool,
    output: str,
    show_defaults: bool,
    cp_url: str,
    token: str | None,
) -> None:
    """Show resources of KIND (ServiceDefaults, Route, TrafficSplit, MeshConfig,
    Intention), or of every kind (`get all`, or no KIND)."""
    import sys

    from controlplane import operator
    from controlplane.client import ControlPlaneClient

    client = ControlPlaneClient(cp_url, token)
    _operator(
        lambda: operator.get(
            client,
            kind,
            name,
            namespace,
            all_namespaces,
            output,
            sys.stdout,
            sys.stderr,
            show_defaults,
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

    if not files and not (kind and name):
        raise click.UsageError("give KIND NAME or -f FILE|DIR|-")
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
@click.option(
    "--retention",
    default=120.0,
    show_default=True,
    type=click.FloatRange(0),
    help="Seconds a disconnected sidecar stays listed after it was last seen.",
)
@_cp_option
def status(
    service: str | None, namespace: str | None, output: str, retention: float, cp_url: str
) -> None:
    """Every sidecar: its config version, whether it is in sync, nacked (why), last seen."""
    import json
    import time

    from controlplane import status as view
    from controlplane.client import ApiError, ControlPlaneClient

    query = {k: v for k, v in (("service", service), ("namespace", namespace)) if v}
    try:
        body = ControlPlaneClient(cp_url).request("GET", "/sidecars", query=query)
    except ApiError as exc:
        raise click.ClickException(str(exc)) from None
    now = time.time()
    records, hidden = view.retained(body.get("sidecars", []), now, retention)
    body["sidecars"] = records
    if output == "json":
        click.echo(json.dumps(body, indent=2))
        return
    click.echo(view.table(records, now))
    click.echo(f"\n{view.summary(records)}; config version {body.get('version')}")
    try:
        splits = ControlPlaneClient(cp_url).list("TrafficSplit", namespace)["items"]
    except ApiError:
        splits = []
    for line in view.analyses(splits, now):
        click.echo(line)
    if hidden:
        click.echo(
            f"{hidden} disconnected sidecar(s) last seen over {retention:g}s ago not shown "
            "(--retention SECONDS)"
        )


@main.command()
@click.argument("url")
@click.option("-X", "--method", default="GET", show_default=True, help="The request's method.")
@click.option(
    "-H", "--header", "headers", multiple=True, help="A request header 'Name: value' (repeatable)."
)
@click.option(
    "--from", "caller", default=None, help="The calling service, SERVICE or SERVICE.NAMESPACE."
)
@_cp_option
@_token_option
def explain(
    url: str,
    method: str,
    headers: tuple[str, ...],
    caller: str | None,
    cp_url: str,
    token: str | None,
) -> None:
    """What the mesh would do with a request to URL, and why: the matching route rule (and
    why earlier ones do not match), filters, split, endpoints, balancer, timeouts."""
    from controlplane.client import ApiError, ControlPlaneClient
    from tether.explain import ExplainError, ExplainRequest
    from tether.explain import explain as run_explain

    fields: dict[str, str] = {}
    for h in headers:
        name, colon, value = h.partition(":")
        if not colon or not name.strip():
            raise click.UsageError(f"-H {h!r}: expected 'Name: value'")
        fields[name.strip().lower()] = value.strip()
    service, _, namespace = (caller or "").partition(".")
    req = ExplainRequest(url, method, fields, service, namespace or "default")
    client = ControlPlaneClient(cp_url, token)
    try:
        listing = client.list()
    except ApiError as exc:
        raise click.ClickException(str(exc)) from None
    services: list[dict[str, str]] = []
    sidecars: list[dict[str, str]] = []
    notes = []
    try:
        services = client.request("GET", "/services").get("services", [])
    except ApiError as exc:
        notes.append(f"(endpoints not shown: {exc})")
    try:
        sidecars = client.request("GET", "/sidecars").get("sidecars", [])
    except ApiError as exc:
        notes.append(f"(sidecars not shown: {exc})")
    try:
        lines = run_explain(req, listing["items"], services, sidecars, int(listing["version"]))
    except ExplainError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo("\n".join([*lines, *notes]))


@main.group()
def token() -> None:
    """Registry ACL tokens for the mesh (CONSUL_HTTP_ADDR; your token: CONSUL_HTTP_TOKEN)."""


@token.command("create")
@click.option("--service", required=True, help="The service whose sidecars use the token.")
@click.option("--namespace", default="default", show_default=True)
def token_create(service: str, namespace: str) -> None:
    """Make a token a sidecar of SERVICE bootstraps its identity with (the mesh CA signs
    its CSR for that service only); prints its SecretID. Needs a token that may write
    ACLs (acl:write) and the key `tether/ca/tokens/`."""
    host, port = consul_address()
    raw = os.environ.get("CONSUL_HTTP_ADDR", "")
    scheme = "https" if raw.startswith("https://") else "http"

    async def create() -> str:
        import consul.aio

        from controlplane.ca.tokens import create_service_token

        client = consul.aio.Consul(
            host=host, port=port, scheme=scheme, token=os.environ.get("CONSUL_HTTP_TOKEN")
        )
        try:
            return await create_service_token(client, service, namespace)
        finally:
            await client.close()

    from controlplane.errors import ControlPlaneError

    try:
        secret = run_async_result(create())
    except ControlPlaneError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(secret)


def consul_address() -> tuple[str, int]:
    """CONSUL_HTTP_ADDR as every Consul tool reads it (default 127.0.0.1:8500); a
    malformed one is a usage error naming the variable."""
    raw = os.environ.get("CONSUL_HTTP_ADDR", "127.0.0.1:8500")
    addr = raw.removeprefix("http://").removeprefix("https://")
    host, sep, port = addr.rpartition(":")
    if not sep:
        host, port = addr, "8500"
    if not host or "/" in addr or not port.isdigit() or not 0 < int(port) <= 65535:
        raise click.UsageError(
            f"CONSUL_HTTP_ADDR={raw!r} is not [http://|https://]HOST:PORT (e.g. 127.0.0.1:8500)"
        )
    return (host, int(port))


# -- injection and running beside workloads (issue 14): inject, webhook, prestop,
# pod-sidecar, run, rollout, check. Each imports its module lazily.


def _port_pairs(
    ctx: click.Context, param: click.Parameter, value: tuple[str, ...]
) -> dict[str, int]:
    try:
        pairs = _meta_pairs(ctx, param, value)
    except click.BadParameter:
        pairs = {}
    if len(pairs) != len(set(value)) or not all(
        p.isdigit() and 0 < int(p) < 65536 for p in pairs.values()
    ):
        raise click.BadParameter(f"{' '.join(value)!r}: give SERVICE=PORT")
    return {name: int(port) for name, port in pairs.items()}


_image_option = click.option(
    "--image", default="tether:0.1.0", show_default=True, help="The tether image sidecars run."
)


def _pod_options(command: Any) -> Any:
    """What a Kubernetes pod's sidecar is made of: the webhook's and `tether inject`'s flags
    (InjectSpec.from_flags)."""
    for option in reversed(
        [
            click.option(
                "--native-sidecar/--no-native-sidecar",
                default=True,
                show_default=True,
                help="Kubernetes: a native sidecar (1.29+) or an ordinary container.",
            ),
            click.option(
                "--capture",
                type=click.Choice(["proxy", "iptables"]),
                default="proxy",
                show_default=True,
                help="Kubernetes: HTTP_PROXY only, or iptables redirection.",
            ),
            click.option(
                "--registry", default=None, help="Kubernetes: CONSUL_HTTP_ADDR of the sidecars."
            ),
            click.option(
                "--controlplane", "cp", default=None, help="Control plane URL of the sidecars."
            ),
        ]
    ):
        command = option(command)
    return command


@main.command()
@click.option("-f", "--filename", "file", required=True, help="A manifest or compose file, or -.")
@_image_option
@_pod_options
@click.option("--port", "ports", multiple=True, callback=_port_pairs,
              help="Compose: the app port of SERVICE (SERVICE=PORT).")  # fmt: skip
def inject(
    file: str,
    image: str,
    native_sidecar: bool,
    capture: str,
    registry: str | None,
    cp: str | None,
    ports: dict[str, int],
) -> None:
    """Add sidecars to Kubernetes manifests or a compose file (format from content)."""
    import sys

    from controlplane.inject.compose import ComposeSpec
    from controlplane.inject.errors import InjectError
    from controlplane.inject.files import MAX_INPUT, inject_text
    from controlplane.inject.manifests import InjectSpec

    k8s = InjectSpec.from_flags(image, native_sidecar, capture, registry, cp)
    try:
        if file == "-":
            text = sys.stdin.read(MAX_INPUT + 1)
        else:
            with open(file, encoding="utf-8") as fh:
                text = fh.read(MAX_INPUT + 1)
        result = inject_text(text, k8s, ComposeSpec(image=image, ports=ports), lambda: file)
    except (OSError, UnicodeDecodeError) as exc:
        raise click.ClickException(f"{file}: {exc}") from None
    except InjectError as exc:
        raise click.ClickException(str(exc)) from None
    for line in result.warnings:
        click.echo(f"warning: {line}", err=True)
    click.echo(result.text, nl=False)


@main.command()
@click.option("--host", default="0.0.0.0", show_default=True)
@click.option("--port", default=8443, show_default=True, type=int)
@click.option("--tls-cert", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="PEM certificate chain the webhook serves.")  # fmt: skip
@click.option("--tls-key", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="PEM private key of --tls-cert.")  # fmt: skip
@_image_option
@_pod_options
def webhook(
    host: str,
    port: int,
    tls_cert: Path,
    tls_key: Path,
    image: str,
    native_sidecar: bool,
    capture: str,
    registry: str | None,
    cp: str | None,
) -> None:
    """Run the Kubernetes mutating admission webhook (HTTPS) that injects sidecars."""
    import logging
    import ssl

    from controlplane.inject.errors import InjectError
    from controlplane.inject.manifests import InjectSpec
    from controlplane.inject.webhook import WebhookSpec, serve

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    k8s = InjectSpec.from_flags(image, native_sidecar, capture, registry, cp)
    spec = WebhookSpec(tls_cert=tls_cert, tls_key=tls_key, host=host, port=port, inject=k8s)
    try:
        run_async(serve(spec))
    except (OSError, ssl.SSLError, InjectError) as exc:
        raise click.ClickException(f"webhook: {exc}") from None


@main.command()
@click.option("--service", required=True)
@click.option("--address", required=True, help="The sidecar's advertised address (pod IP).")
@click.option("--port", default=15006, show_default=True, type=int, help="Its inbound port.")
@click.option("--app-port", default=None, type=int, help="Wait until the app closes this port.")
@click.option("--timeout", default=10.0, show_default=True, type=float)
def prestop(service: str, address: str, port: int, app_port: int | None, timeout: float) -> None:
    """A pod's preStop for its sidecar: out of rotation, then wait for the app to stop."""
    from tether.podlife import prestop as run_prestop

    host, rport = consul_address()
    raise SystemExit(
        asyncio.run(
            run_prestop(
                service,
                address,
                port,
                app_port,
                timeout,
                host,
                rport,
                os.environ.get("CONSUL_HTTP_TOKEN") or None,
            )
        )
    )


@main.command(name="pod-sidecar", context_settings={"ignore_unknown_options": True})
@click.option("--restart-delay", default=0.5, show_default=True, type=float)
@click.option(
    "--exit-with-app",
    is_flag=True,
    help="Stop once the other containers' processes are gone (shared process namespace).",
)
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def pod_sidecar(restart_delay: float, exit_with_app: bool, command: tuple[str, ...]) -> None:
    """Run COMMAND (the sidecar), restarting it if it dies, until SIGTERM."""
    from tether.podlife import PodSidecar

    sidecar = PodSidecar(list(command), restart_delay, exit_with_app=exit_with_app)
    raise SystemExit(asyncio.run(sidecar.run()))


@main.command(context_settings={"ignore_unknown_options": True})
@click.option("--service", required=True, help="Service name the replicas register as.")
@click.option("--port", required=True, type=int, help="PORT of the first replica's command.")
@click.option("--replicas", default=1, show_default=True, type=int)
@click.option(
    "--restart",
    type=click.Choice(["no", "on-failure", "always"]),
    default="no",
    show_default=True,
    help="Restart a replica whose command exits (on-failure: non-zero or unhealthy).",
)
@click.option("--health-path", default=None, help="HTTP health path (default: TCP connect).")
@click.option("--check-interval", default=1.0, show_default=True, type=float)
@click.option("--failures", default=3, show_default=True, type=int,
              help="Failed checks in a row that make a replica unhealthy.")  # fmt: skip
@click.option("--drain-seconds", default=5.0, show_default=True, type=float)
@click.option("--namespace", default="default", show_default=True)
@click.option("--controlplane", "cp", default=None, help="Control plane URL (policy push).")
@click.option("--control-socket", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Unix socket of `tether rollout` (default: per user and service).")  # fmt: skip
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def run(
    service: str,
    port: int,
    replicas: int,
    restart: str,
    health_path: str | None,
    check_interval: float,
    failures: int,
    drain_seconds: float,
    namespace: str,
    cp: str | None,
    control_socket: Path | None,
    command: tuple[str, ...],
) -> None:
    """Run COMMAND in the mesh (a sidecar per replica): tether run --service S --port P -- CMD"""
    import uvloop

    from tether.run import RunSpec, Supervisor

    host, rport = consul_address()
    try:
        spec = RunSpec(
            service=service,
            port=port,
            command=list(command),
            replicas=replicas,
            restart="always" if restart == "always" else "on-failure" if restart == "on-failure"
            else "no",
            health_path=health_path,
            check_interval=check_interval,
            failures=failures,
            drain_seconds=drain_seconds,
            namespace=namespace,
            controlplane=cp,
            control_socket=control_socket,
            registry_host=host,
            registry_port=rport,
            registry_token=os.environ.get("CONSUL_HTTP_TOKEN") or None,
        )  # fmt: skip
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    raise SystemExit(uvloop.run(Supervisor(spec).run()))


@main.group()
def rollout() -> None:
    """Rolling operations on the replicas of a `tether run`."""


@rollout.command(name="restart")
@click.argument("service")
@click.option("--control-socket", type=click.Path(dir_okay=False, path_type=Path), default=None)
@click.option("--timeout", default=300.0, show_default=True, type=float)
def rollout_restart(service: str, control_socket: Path | None, timeout: float) -> None:
    """Replace SERVICE's replicas one at a time, each new one ready before an old drains."""
    from tether.run import RunError, control, default_socket

    path = control_socket or default_socket(service)
    try:
        status, body = asyncio.run(control(path, "POST", "/rollout/restart", timeout))
    except (RunError, OSError) as exc:
        raise click.ClickException(str(exc)) from None
    if status != 200:
        raise click.ClickException(str(body.get("error", body)))
    for line in body.get("replaced", ()):
        click.echo(line)
    click.echo(f"{service}: restarted")


@main.command()
@_cp_option
@click.option("--port", "ports", multiple=True, type=int, default=(15000, 15001, 15006),
              show_default=True, help="Local ports a sidecar here will need.")  # fmt: skip
def check(cp_url: str, ports: tuple[int, ...]) -> None:
    """Check what the mesh needs: registry, control plane, sidecars, clocks, ports."""
    from tether.check import run_checks

    host, port = consul_address()
    raw = os.environ.get("CONSUL_HTTP_ADDR", "")
    ssl = raw.startswith("https://") or os.environ.get("CONSUL_HTTP_SSL", "").lower() == "true"
    registry = f"{'https' if ssl else 'http'}://{host}:{port}"
    results = run_checks(registry, cp_url, os.environ.get("CONSUL_HTTP_TOKEN") or None, ports)
    for result in results:
        for line in result.lines():
            click.echo(line)
    failed = sum(1 for r in results if r.ok is False)
    click.echo(f"\n{len(results) - failed} of {len(results)} checks passed or skipped")
    raise SystemExit(1 if failed else 0)


# -- tether top: the mesh's live traffic from the control plane (tether/top.py) -------


@main.command()
@_cp_option
@_token_option
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


if __name__ == "__main__":  # `python -m tether.cli` (how `tether up` starts its parts)
    main(prog_name="tether")
