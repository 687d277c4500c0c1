"""Limits on every aiohttp listener (registry, control plane, sidecar admin, injection
webhook): caps and timeouts.

`serve(app, host, port, limits)` runs an aiohttp application behind these limits:

- **Connection caps.** At most `max_connections` open connections in all, and at most
  `max_connections_per_client` from one client IP (0: no per-client cap). A connection
  over a cap is answered at once, before it is read, with 503 (all slots taken) or 429
  (that address has its share), `Connection: close`, and closed; the ones already open
  are served as before. Consul's `http_max_conns_per_client` (default 200) is the model.
- **Head and idle timeout.** A connection has `idle_timeout` seconds, from its accept
  and again from the end of each response, to deliver a complete request head; else it
  is closed. This is aiohttp's keep-alive timer, which fires only while no request is
  being handled, so a slow-loris head and an idle keep-alive connection are both cut,
  and a request being answered (a blocking query parked for its `wait`, a WebSocket) is
  not: those are bounded by the caps.
- **Body timeout.** A request body must arrive within `body_timeout` seconds (408).
- **Head sizes.** A request line over `max_line_size` or a header field over
  `max_field_size` bytes is refused (400), and no error answer quotes the request back:
  aiohttp's own 400 text would reflect the offending bytes.

Importing this module costs what importing aiohttp does, which every user of it has
loaded already.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, cast

from aiohttp import web

log = logging.getLogger("tether.http")

# How long a connection that is being closed on a refusal (over a cap, a body too slow)
# may keep sending before it is cut: long enough for a client to read the answer.
LINGER = 1.0


@dataclass(frozen=True)
class ListenerLimits:
    """The limits of one listener (see the module's docstring for what each does)."""

    max_connections: int = 4096
    max_connections_per_client: int = 0
    idle_timeout: float = 20.0
    body_timeout: float = 30.0
    max_line_size: int = 8190
    max_field_size: int = 8190

    def __post_init__(self) -> None:
        if self.max_connections < 1:
            raise ValueError(f"max_connections must be at least 1, not {self.max_connections}")
        if self.max_connections_per_client < 0:
            raise ValueError("max_connections_per_client must be 0 (no cap) or more")
        for name in ("idle_timeout", "body_timeout"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be greater than zero")


# Consul's agent: http_max_conns_per_client = 200. Sidecars and tools on one host all
# come from one address, so the total stays well above it.
REGISTRY_LIMITS = ListenerLimits(max_connections=8192, max_connections_per_client=200)
# Every sidecar keeps one push WebSocket open, from wherever it runs.
CONTROLPLANE_LIMITS = ListenerLimits(max_connections=4096)
# The sidecar's admin listener: loopback only, a few probes and tools at a time.
ADMIN_LIMITS = ListenerLimits(max_connections=64)


class ConnectionGate:
    """Counts open connections, in all and per client address; decides admission."""

    def __init__(self, limits: ListenerLimits) -> None:
        self.limits = limits
        self.open = 0
        self.by_client: dict[str, int] = {}
        self.refused = 0
        self.lingering = 0

    def admit(self, client: str) -> HTTPStatus | None:
        """None: admitted (call `release` when it closes); else the status to refuse with."""
        if self.open >= self.limits.max_connections:
            self.refused += 1
            return HTTPStatus.SERVICE_UNAVAILABLE
        per_client = self.limits.max_connections_per_client
        held = self.by_client.get(client, 0)
        if per_client and held >= per_client:
            self.refused += 1
            return HTTPStatus.TOO_MANY_REQUESTS
        self.open += 1
        self.by_client[client] = held + 1
        return None

    def release(self, client: str) -> None:
        self.open -= 1
        held = self.by_client.get(client, 0) - 1
        if held > 0:
            self.by_client[client] = held
        else:
            self.by_client.pop(client, None)

    def refusal(self, status: HTTPStatus) -> bytes:
        if status is HTTPStatus.TOO_MANY_REQUESTS:
            text = (
                "too many connections from your address "
                f"(at most {self.limits.max_connections_per_client})\n"
            )
        else:
            text = f"too many connections (at most {self.limits.max_connections})\n"
        body = text.encode()
        return (
            f"HTTP/1.1 {status.value} {status.phrase}\r\n"
            "Content-Type: text/plain; charset=utf-8\r\n"
            f"Content-Length: {len(body)}\r\n"
            "Retry-After: 1\r\n"
            "Connection: close\r\n\r\n"
        ).encode() + body

    def __repr__(self) -> str:
        return (
            f"<ConnectionGate open={self.open}/{self.limits.max_connections} "
            f"clients={len(self.by_client)} refused={self.refused}>"
        )


class _QuietRequestHandler(web.RequestHandler):
    """aiohttp's connection handler, whose error answers never quote the request."""

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        # aiohttp's 400 text is the parser's message, which holds the offending bytes
        # (a too-long request line comes back whole): answer with the status alone.
        if status != HTTPStatus.INTERNAL_SERVER_ERROR:
            message = f"{status} {HTTPStatus(status).phrase}\n"
        return super().handle_error(request, status, exc, message)


class _GatedConnection(asyncio.Protocol):
    """One accepted connection: admitted by the gate to aiohttp's handler, or refused."""

    def __init__(self, gate: ConnectionGate, make: Callable[[], web.RequestHandler]) -> None:
        self.gate = gate
        self.make = make
        self.inner: web.RequestHandler | None = None
        self.client = ""
        self.linger: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        peer = transport.get_extra_info("peername")
        self.client = str(peer[0]) if peer else ""
        refused = self.gate.admit(self.client)
        if refused is None:
            self.inner = self.make()
            self.inner.connection_made(transport)
            return
        # A stream transport (uvloop's does not subclass asyncio.Transport).
        stream = cast(asyncio.Transport, transport)
        stream.write(self.gate.refusal(refused))
        if self.gate.lingering >= self.gate.limits.max_connections:
            stream.close()  # refusals themselves are bounded
            return
        # Half-close and drop what the client sends until it closes (or a second
        # passes): closing at once would answer its request with a reset, which can
        # discard the refusal before the client reads it.
        self.gate.lingering += 1
        if stream.can_write_eof():
            stream.write_eof()
        self.linger = asyncio.get_running_loop().call_later(LINGER, stream.close)

    def data_received(self, data: bytes) -> None:
        if self.inner is not None:
            self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        if self.inner is not None:
            self.inner.eof_received()
        return None  # the transport closes (aiohttp's handler answers the same)

    def pause_writing(self) -> None:
        if self.inner is not None:
            self.inner.pause_writing()

    def resume_writing(self) -> None:
        if self.inner is not None:
            self.inner.resume_writing()

    def connection_lost(self, exc: BaseException | None) -> None:
        if self.inner is not None:
            self.gate.release(self.client)
            self.inner.connection_lost(exc)
            self.inner = None
        elif self.linger is not None:
            self.linger.cancel()
            self.linger = None
            self.gate.lingering -= 1


class LimitedSite(web.BaseSite):
    """A TCP site whose connections pass the gate and get `_QuietRequestHandler`s."""

    def __init__(
        self,
        runner: web.BaseRunner,
        host: str,
        port: int,
        limits: ListenerLimits,
        *,
        backlog: int = 128,
        reuse_address: bool | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        super().__init__(runner, backlog=backlog)
        self.host = host
        self.port = port
        self.limits = limits
        self.gate = ConnectionGate(limits)
        self.reuse_address = reuse_address
        self.ssl_context = ssl_context  # HTTPS (the injection webhook)

    @property
    def name(self) -> str:
        scheme = "https" if self.ssl_context is not None else "http"
        return f"{scheme}://{self.host}:{self.port}"

    async def start(self) -> None:
        await super().start()
        loop = asyncio.get_running_loop()
        manager = self._runner.server
        assert manager is not None
        limits = self.limits

        def handler() -> web.RequestHandler:
            return _QuietRequestHandler(
                manager,
                loop=loop,
                # None: no access log (what every Tether listener asked of its runner).
                access_log=None,  # type: ignore[arg-type]
                keepalive_timeout=limits.idle_timeout,
                # aiohttp reads an unread body away after the answer, for this long.
                lingering_time=LINGER,
                max_line_size=limits.max_line_size,
                max_field_size=limits.max_field_size,
            )

        server = await loop.create_server(
            lambda: _GatedConnection(self.gate, handler),
            self.host,
            self.port,
            backlog=self._backlog,
            reuse_address=self.reuse_address,
            ssl=self.ssl_context,
        )
        self._server = server
        if server.sockets:
            self.port = int(server.sockets[0].getsockname()[1])


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def body_deadline(seconds: float) -> Any:
    """Middleware: the request body is read within `seconds` (408 and close otherwise),
    before the handler runs; handlers then read it from memory."""

    @web.middleware
    async def read_body_in_time(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.body_exists:
            try:
                async with asyncio.timeout(seconds):
                    await request.read()
            except TimeoutError:
                resp = web.Response(
                    status=HTTPStatus.REQUEST_TIMEOUT,
                    text=f"request body not received within {seconds:g}s\n",
                )
                # Not kept alive: the rest of the body is not coming (aiohttp drains
                # for LINGER at most, then closes).
                resp.force_close()
                return resp
        return await handler(request)

    return read_body_in_time


async def serve(
    app: web.Application,
    host: str,
    port: int,
    limits: ListenerLimits,
    *,
    backlog: int = 128,
    reuse_address: bool | None = None,
    shutdown_timeout: float = 60.0,
    ssl_context: ssl.SSLContext | None = None,
) -> tuple[web.AppRunner, LimitedSite]:
    """Run `app` on host:port behind `limits`; `site.port` is the bound port,
    `runner.cleanup()` stops it."""
    # Innermost, so the app's own error middlewares shape a 413 from the read.
    app.middlewares.append(body_deadline(limits.body_timeout))
    runner = web.AppRunner(
        app, access_log=None, handle_signals=False, shutdown_timeout=shutdown_timeout
    )
    await runner.setup()
    site = LimitedSite(
        runner,
        host,
        port,
        limits,
        backlog=backlog,
        reuse_address=reuse_address,
        ssl_context=ssl_context,
    )
    await site.start()
    return runner, site
