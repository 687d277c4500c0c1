"""Reference floor for the data-plane benchmark: a byte-for-byte TCP relay on uvloop.

    python -m bench.passthrough --port P --upstream-port U

Each accepted connection gets its own upstream connection and bytes are copied both
ways with no parsing at all, so its CPU per request is what uvloop and the kernel cost
a Python proxy before it does any HTTP work: the floor under any asyncio design.
Prints `ready <port>` once listening.
"""

from __future__ import annotations

import argparse
import asyncio
from typing import Any


class _Up(asyncio.Protocol):
    def __init__(self, down: _Down) -> None:
        self.down = down

    def data_received(self, data: bytes) -> None:
        self.down.transport.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.down.transport.close()


class _Down(asyncio.Protocol):
    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.transport: Any = None
        self.up: Any = None
        self.pending: list[bytes] = []

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        self.up, _ = await loop.create_connection(
            lambda: _Up(self), "127.0.0.1", self.upstream_port
        )
        for data in self.pending:
            self.up.write(data)
        self.pending = []

    def data_received(self, data: bytes) -> None:
        if self.up is None:
            self.pending.append(data)
        else:
            self.up.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.up is not None:
            self.up.close()


async def _serve(port: int, upstream_port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _Down(upstream_port), "127.0.0.1", port)
    print(f"ready {server.sockets[0].getsockname()[1]}", flush=True)
    await asyncio.Event().wait()


def main() -> None:
    import uvloop

    p = argparse.ArgumentParser(prog="bench.passthrough")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--upstream-port", type=int, required=True)
    args = p.parse_args()
    uvloop.run(_serve(args.port, args.upstream_port))


if __name__ == "__main__":
    main()
