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
    help="Token every write must carry (X-Consul-Token); open when unset.",
)
@click.option("--node", default=None, help="Node name (default: the host name).")
@click.option("--datacenter", default="dc1", show_default=True)
@click.option("--fsync/--no-fsync", default=False, help="fsync every write (power-loss safe).")
def registry(
    host: str,
    port: int,
    data_dir: Path | None,
    management_token: str | None,
    node: str | None,
    datacenter: str,
    fsync: bool,
) -> None:
    """Run the embedded registry (a Consul-compatible HTTP API)."""
    from registry.http import RegistrySpec
    from registry.server import serve

    spec = RegistrySpec(
        host=host,
        port=port,
        data_dir=data_dir,
        management_token=management_token,
        node=node or socket.gethostname(),
        datacenter=datacenter,
        fsync=fsync,
    )
    run_async(serve(spec))


def consul_address() -> tuple[str, int]:
    """CONSUL_HTTP_ADDR as every Consul tool reads it (default 127.0.0.1:8500)."""
    addr = os.environ.get("CONSUL_HTTP_ADDR", "127.0.0.1:8500")
    addr = addr.removeprefix("http://")
    host, _, port = addr.rpartition(":")
    return (host or "127.0.0.1", int(port or 8500))


if __name__ == "__main__":
    main()
