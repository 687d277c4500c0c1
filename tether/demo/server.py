"""How a demo app runs: its command line, its identity, `/health`, and its HTTP client.

The apps are deliberately ordinary: an aiohttp server on 127.0.0.1 (the sidecar is
its only way in) and an aiohttp client with `trust_env=True`, so calls to
`http://orders/...` go through whatever `HTTP_PROXY` names, as any app's would.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from aiohttp import ClientError, ClientSession, ClientTimeout, web


@dataclass
class Identity:
    service: str
    instance: str
    zone: str
    version: str

    def as_dict(self) -> dict[str, str]:
        return {
            "service": self.service,
            "instance": self.instance,
            "zone": self.zone,
            "version": self.version,
        }


IDENTITY: web.AppKey[Identity] = web.AppKey("identity", Identity)
CLIENT: web.AppKey[ClientSession] = web.AppKey("client", ClientSession)


def parse_args(service: str) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=f"tether.demo.{service}")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--instance", default=f"{service}-1")
    p.add_argument("--zone", default=os.environ.get("TETHER_ZONE", ""))
    p.add_argument("--version", default="v1")
    p.add_argument("--rate", type=float, default=2.0, help="requests/s the app drives itself")
    p.add_argument(
        "--wait-for",
        default=None,
        metavar="URL",
        help="drive no traffic until this URL answers 200 (its sidecar's admin /ready)",
    )
    return p.parse_args()


async def wait_for(client: ClientSession, url: str) -> None:
    """Until `url` answers 200: an app started before its sidecar (compose starts the
    app's container first, the sidecar joins its network namespace) waits for it."""
    while True:
        try:
            async with client.get(url, proxy=None) as resp:
                if resp.status == 200:
                    return
        except (OSError, TimeoutError, ClientError):
            pass
        await asyncio.sleep(0.5)


async def health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok", **request.app[IDENTITY].as_dict()})


def run(
    service: str,
    setup: Callable[[web.Application, argparse.Namespace], None],
    background: Callable[[web.Application, argparse.Namespace], Awaitable[None]] | None = None,
) -> None:
    """Serve the app on 127.0.0.1:--port until SIGTERM or SIGINT."""
    args = parse_args(service)

    async def main() -> None:
        app = web.Application()
        app[IDENTITY] = Identity(service, args.instance, args.zone, args.version)
        app.router.add_get("/health", health)
        setup(app, args)
        # trust_env: HTTP_PROXY (set by `tether up` to the sidecar) carries every call.
        client = ClientSession(trust_env=True, timeout=ClientTimeout(total=10))
        app[CLIENT] = client
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", args.port).start()
        print(
            f"{args.instance} ({service} {args.version}, zone {args.zone or '-'}) "
            f"on http://127.0.0.1:{args.port}",
            flush=True,
        )
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        task = asyncio.ensure_future(background(app, args)) if background else None
        await stop.wait()
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        await client.close()
        await runner.cleanup()

    asyncio.run(main())
