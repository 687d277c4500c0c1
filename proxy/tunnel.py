"""Raw byte tunnels: two transports spliced together (after a 101, after CONNECT, opaque TCP).

`splice` hands both transports to a pair of `TunnelEnd` protocols that copy bytes
across with back-pressure (a full write buffer on one side pauses reading on the other)
and propagate half-closes, so protocols like WebSocket, TLS-over-CONNECT or a database
wire protocol pass unchanged. `dial` opens an outbound connection held paused until it
is spliced; `TcpProxyServer` accepts connections on a port and splices each to a
target chosen per connection (ports declared opaque).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

WRITE_HIGH = 256 * 1024
WRITE_LOW = 64 * 1024


class TunnelEnd(asyncio.Protocol):
    __slots__ = ("eof", "on_close", "peer", "transport")

    def __init__(self, transport: Any) -> None:
        self.transport = transport
        self.peer: TunnelEnd | None = None
        self.eof = False
        self.on_close: Callable[[], None] | None = None

    def data_received(self, data: bytes) -> None:
        peer = self.peer
        if peer is not None:
            peer.transport.write(data)

    def eof_received(self) -> bool:
        self.eof = True
        peer = self.peer
        if peer is None or peer.transport.is_closing():
            return False
        if peer.eof:
            # Both directions ended: close both.
            peer.transport.close()
            return False
        if peer.transport.can_write_eof():
            peer.transport.write_eof()
            return True  # keep our write side open for the peer's remaining bytes
        peer.transport.close()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        peer = self.peer
        self.peer = None
        if peer is not None:
            peer.peer = None
            # close() sends what is still buffered first; abort when we were reset.
            if exc is None:
                peer.transport.close()
            else:
                peer.transport.abort()
        if self.on_close is not None:
            callback, self.on_close = self.on_close, None
            callback()

    def pause_writing(self) -> None:
        if self.peer is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None:
            self.peer.transport.resume_reading()

    def __repr__(self) -> str:
        peer = self.transport.get_extra_info("peername")
        return f"<TunnelEnd peer={peer} eof={self.eof} linked={self.peer is not None}>"


def splice(
    a: Any,
    b: Any,
    *,
    to_a: bytes = b"",
    to_b: bytes = b"",
    on_close: Callable[[], None] | None = None,
) -> tuple[TunnelEnd, TunnelEnd]:
    """Join transports `a` and `b`; `to_a`/`to_b` are bytes already read for the other.

    `on_close` runs once, when the tunnel's first side closes.
    """
    end_a, end_b = TunnelEnd(a), TunnelEnd(b)
    end_a.peer, end_b.peer = end_b, end_a
    end_a.on_close = on_close
    for transport, end in ((a, end_a), (b, end_b)):
        transport.set_protocol(end)
        transport.set_write_buffer_limits(WRITE_HIGH, WRITE_LOW)
    if to_a:
        a.write(to_a)
    if to_b:
        b.write(to_b)
    for transport in (a, b):
        if transport.is_closing():
            continue
        transport.resume_reading()
    return end_a, end_b


class Parked(asyncio.Protocol):
    """Holds a fresh connection until it is spliced, keeping what the server says first.

    (uvloop starts reading right after `connection_made`, so a pause there is not
    enough: a server that speaks first, like SSH or SMTP, would be cut short.)
    """

    def __init__(self) -> None:
        self.transport: Any = None
        self.received = b""

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        transport.pause_reading()

    def data_received(self, data: bytes) -> None:
        self.received += data
        self.transport.pause_reading()

    def eof_received(self) -> bool:
        return True  # splice() delivers the buffered bytes, then the peer sees EOF


async def dial(host: str, port: int, timeout: float, ssl: Any = None) -> tuple[Any, Parked]:
    """Connect to host:port within `timeout` seconds: (transport, its Parked protocol)."""
    loop = asyncio.get_running_loop()
    transport, parked = await asyncio.wait_for(
        loop.create_connection(Parked, host, port, ssl=ssl), timeout
    )
    return transport, parked


class _Inbound(asyncio.Protocol):
    """An accepted opaque connection waiting for its upstream to be dialled."""

    def __init__(self, server: TcpProxyServer) -> None:
        self.server = server
        self.transport: Any = None
        self.early = b""
        self.task: asyncio.Task[None] | None = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.server.accepted += 1
        self.task = asyncio.get_running_loop().create_task(self._link())

    def data_received(self, data: bytes) -> None:
        self.early += data
        if len(self.early) > WRITE_HIGH:
            self.transport.pause_reading()

    def eof_received(self) -> bool:
        return True  # keep the write side: the upstream may still answer

    def connection_lost(self, exc: Exception | None) -> None:
        if self.task is not None and not self.task.done():
            self.task.cancel()

    async def _link(self) -> None:
        server = self.server
        target = server.pick()
        if target is None:
            self.transport.abort()
            return
        try:
            upstream, parked = await dial(target[0], target[1], server.connect_timeout)
        except (OSError, TimeoutError):
            server.failures += 1
            self.transport.abort()
            return
        if self.transport.is_closing():
            upstream.close()
            return
        server.active += 1
        splice(
            self.transport,
            upstream,
            to_a=parked.received,
            to_b=self.early,
            on_close=server._closed,
        )


class TcpProxyServer:
    """Accepts TCP on a port and splices each connection to `pick()`'s (host, port)."""

    def __init__(
        self, pick: Callable[[], tuple[str, int] | None], connect_timeout: float = 2.0
    ) -> None:
        self.pick = pick
        self.connect_timeout = connect_timeout
        self.server: asyncio.Server | None = None
        self.port = 0
        self.accepted = 0
        self.active = 0
        self.failures = 0

    def _closed(self) -> None:
        self.active -= 1

    async def start(self, host: str, port: int) -> None:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(lambda: _Inbound(self), host, port)
        self.port = self.server.sockets[0].getsockname()[1]

    async def aclose(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    def __repr__(self) -> str:
        return f"<TcpProxyServer :{self.port} active={self.active} accepted={self.accepted}>"
