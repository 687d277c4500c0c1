"""HTTP/2 connection pool for one upstream address: many streams on few connections.

`acquire(waiter)` returns a connection with room for one more stream (the peer's
SETTINGS_MAX_CONCURRENT_STREAMS), or dials one (a Task per new connection, never per
stream) and later calls `waiter.on_h2_ready(conn)` / `on_h2_failed(reason, message)`.
A second connection is opened only when every open one is full; past
`max_connections` waiters queue up to `max_pending`, beyond which the caller answers
`overflow`. `sweep` closes connections that carried no stream for `idle_timeout`.

The pool dials through `dial_h2`, which hands the `H2UpstreamConnection` a transport:
plain TCP (h2c with prior knowledge, between sidecars without TLS and to an app whose
protocol is `http2` or `grpc`), or TLS when an `ssl` context is given. With TLS the
context offers ALPN `h2` (`alpn_context`) and the dial fails unless the server chose
it: that is how the mTLS connection between sidecars becomes HTTP/2.
"""

from __future__ import annotations

import asyncio
import ssl as ssl_module
from collections import deque
from typing import TYPE_CHECKING, Protocol

from proxy import local_reply
from proxy.h2_link import flush_touched
from proxy.h2_upstream import H2UpstreamConnection

if TYPE_CHECKING:
    from proxy.egress import EgressGuard
    from proxy.pool import PoolPolicy
    from proxy.tls import UpstreamTLS


class H2PoolWaiter(Protocol):
    def on_h2_ready(self, conn: H2UpstreamConnection) -> None: ...

    def on_h2_failed(self, reason: str, message: str) -> None: ...


class H2PoolOverflowError(Exception):
    """Every connection is full, and so is the pending queue."""


def alpn_context(ctx: ssl_module.SSLContext) -> ssl_module.SSLContext:
    """`ctx` (a client context of its own, not the HTTP/1 pools') offering ALPN `h2`."""
    ctx.set_alpn_protocols(["h2"])
    return ctx


async def dial_h2(
    pool: H2Pool, host: str, port: int, ssl: ssl_module.SSLContext | None, timeout: float
) -> H2UpstreamConnection:
    """Connect and hand the transport to a new `H2UpstreamConnection`."""
    loop = asyncio.get_running_loop()
    transport, conn = await asyncio.wait_for(
        loop.create_connection(
            lambda: H2UpstreamConnection(pool),
            host,
            port,
            ssl=ssl,
            # A mesh peer is checked by its SPIFFE ID (pool.tls), not a host name.
            server_hostname=("" if pool.tls is not None else pool.server_hostname) if ssl else None,
        ),
        timeout,
    )
    if ssl is not None:
        tls = transport.get_extra_info("ssl_object")
        chosen = tls.selected_alpn_protocol() if tls is not None else None
        if chosen != "h2":
            transport.abort()
            raise ConnectionError(f"{host}:{port} did not negotiate ALPN h2 (got {chosen!r})")
    return conn


class H2Pool:
    def __init__(
        self,
        host: str,
        port: int,
        policy: PoolPolicy,
        *,
        ssl: ssl_module.SSLContext | None = None,
        server_hostname: str | None = None,
        name: str | None = None,
        guard: EgressGuard | None = None,
        tls: UpstreamTLS | None = None,
    ) -> None:
        self.host = host
        # Mesh TLS (proxy/tls.py): the sidecar's ALPN-h2 client context, and the peer's
        # SPIFFE ID checked after each handshake, as the HTTP/1 pools do.
        self.tls = tls
        self.port = port
        self.policy = policy
        self.ssl = ssl
        self.server_hostname = server_hostname
        self.name = name or f"{host}:{port}"
        self.guard = guard
        self.conns: list[H2UpstreamConnection] = []
        self.connecting = 0
        self.waiters: deque[H2PoolWaiter] = deque()
        self.closed = False
        self.connects = 0
        self.connect_failures = 0
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def size(self) -> int:
        return len(self.conns) + self.connecting

    @property
    def idle(self) -> list[H2UpstreamConnection]:
        """Connections carrying no stream (the pool gauges' `idle`, as for HTTP/1)."""
        return [c for c in self.conns if not c.sinks]

    def acquire(self, waiter: H2PoolWaiter) -> H2UpstreamConnection | None:
        for conn in self.conns:
            if conn.capacity > 0:
                return conn
        if self.closed:
            raise H2PoolOverflowError("pool closed")
        if len(self.waiters) >= self.policy.max_pending:
            raise H2PoolOverflowError(f"{self.name}: all streams busy, pending queue full")
        self.waiters.append(waiter)
        # A new connection only when the ones dialling cannot take the queue.
        want = -(-len(self.waiters) // 100)  # streams per connection before SETTINGS
        if self.connecting < want and self.size < self.policy.max_connections:
            self._connect()
        return None

    def cancel(self, waiter: H2PoolWaiter) -> None:
        try:
            self.waiters.remove(waiter)
        except ValueError:
            pass

    def stream_closed(self, conn: H2UpstreamConnection) -> None:
        """A stream ended on `conn`: a waiter may take its place."""
        if not conn.sinks:
            if conn.goaway:
                conn.close()  # its last stream ended after a GOAWAY
                return
            conn.idle_since = asyncio.get_running_loop().time()
        self._serve(conn)

    def _serve(self, conn: H2UpstreamConnection) -> None:
        while self.waiters and conn.capacity > 0:
            waiter = self.waiters.popleft()
            waiter.on_h2_ready(conn)

    def connection_gone(self, conn: H2UpstreamConnection) -> None:
        try:
            self.conns.remove(conn)
        except ValueError:
            return
        if self.waiters and not self.closed and self.size < self.policy.max_connections:
            self._connect()

    def sweep(self, now: float) -> None:
        deadline = now - self.policy.idle_timeout
        for conn in [c for c in self.conns if not c.sinks and c.idle_since < deadline]:
            conn.send_goaway()
            conn.close()

    def _connect(self) -> None:
        self.connecting += 1
        task = asyncio.get_running_loop().create_task(self._open())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _open(self) -> None:
        try:
            await self._opened()
        finally:
            flush_touched()  # what the waiters wrote to their clients

    async def _opened(self) -> None:
        try:
            tls = self.tls
            ctx = tls.h2_context if tls is not None else self.ssl
            try:
                conn = await dial_h2(self, self.host, self.port, ctx, self.policy.connect_timeout)
            finally:
                self.connecting -= 1
        except (OSError, TimeoutError, ssl_module.SSLError) as e:
            self.connect_failures += 1
            message = (
                f"connect to {self.name} timed out after {self.policy.connect_timeout}s"
                if isinstance(e, TimeoutError)
                else f"connect to {self.name} failed: {e}"
            )
            # As proxy/pool.py: a timeout has its own reason (503 upstream_connect_timeout),
            # a failed TLS handshake its own (502 upstream_tls_error), a refusal 502.
            if isinstance(e, TimeoutError):
                reason = local_reply.UPSTREAM_CONNECT_TIMEOUT
            elif isinstance(e, ssl_module.SSLError):
                reason = local_reply.UPSTREAM_TLS_ERROR
                if tls is not None:  # a mesh handshake (proxy/tls_stats.py)
                    tls.handshake_failed(e)
            else:
                reason = local_reply.UPSTREAM_CONNECT_ERROR
            self._fail_waiters(reason, message)
            return
        if tls is not None:
            refused = tls.check(conn.transport)
            if refused is not None:
                conn.abort()
                self.connect_failures += 1
                self._fail_waiters(local_reply.UPSTREAM_TLS_ERROR, f"{self.name}: {refused}")
                return
        self.connects += 1
        if self.closed:
            conn.close()
            self._fail_waiters(local_reply.UPSTREAM_CONNECT_ERROR, "pool closed")
            return
        if self.guard is not None:
            what = self.guard.denied(conn.transport)
            if what is not None:
                conn.abort()
                self._fail_waiters(
                    local_reply.EGRESS_DENIED, f"egress to {self.name} reaches {what}"
                )
                return
        if conn.closed:
            # It ended before it could carry anything (the peer's GOAWAY, a protocol
            # error in its first bytes): the waiters fail rather than dial in a loop.
            self._fail_waiters(
                local_reply.UPSTREAM_CONNECT_ERROR, f"{self.name} closed the connection at once"
            )
            return
        conn.idle_since = asyncio.get_running_loop().time()
        self.conns.append(conn)
        # Before the peer's SETTINGS arrive, h2 assumes unlimited streams; a pool
        # never sends more than MAX_CONCURRENT_STREAMS' usual floor (100) at once.
        served = 0
        while self.waiters and served < 100 and conn.capacity > 0:
            self.waiters.popleft().on_h2_ready(conn)
            served += 1
        if self.waiters and self.size < self.policy.max_connections:
            self._connect()

    def _fail_waiters(self, reason: str, message: str) -> None:
        """A dial failed: the waiters it was for fail too (each would fail the same)."""
        waiters = list(self.waiters)
        self.waiters.clear()
        for waiter in waiters:
            waiter.on_h2_failed(reason, message)

    def close(self) -> None:
        """Refuse new streams; connections close once their streams ended."""
        self.closed = True
        for conn in list(self.conns):
            if not conn.sinks:
                conn.close()
            else:
                conn.send_goaway()
        self._fail_waiters(local_reply.UPSTREAM_CONNECT_ERROR, "pool closed")

    def __repr__(self) -> str:
        streams = sum(len(c.sinks) for c in self.conns)
        return (
            f"<H2Pool {self.name} connections={len(self.conns)} streams={streams}"
            f" connecting={self.connecting} pending={len(self.waiters)}"
            f"{' closed' if self.closed else ''}>"
        )
