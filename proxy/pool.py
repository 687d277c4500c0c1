"""Keep-alive connection pool for one upstream address (an endpoint or an egress host).

`acquire` returns an idle connection at once (last used first, the warmest), or starts
a connection (one Task per new connection, never per request) and later calls the
waiter's `on_upstream_ready` / `on_upstream_failed`; past `max_connections` waiters queue
up to `max_pending`, beyond which the caller answers 503 `overflow`. `release` takes a
connection back only if its response was read to the end and both sides keep it alive;
`sweep` closes connections idle longer than `idle_timeout`.
"""

from __future__ import annotations

import asyncio
import ssl as ssl_module
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from proxy import local_reply
from proxy.egress import EgressGuard
from proxy.head_cache import HeadCache
from proxy.upstream import UpstreamConnection

if TYPE_CHECKING:
    from proxy.tls import UpstreamTLS


@dataclass(frozen=True)
class PoolPolicy:
    max_connections: int = 1024
    max_idle: int = 256
    # Below the usual server keep-alive timeouts (nginx 75 s, aiohttp 75 s, Node 5 s is
    # lower: a reused connection the server just closed is retried once, see downstream).
    idle_timeout: float = 30.0
    max_pending: int = 4096
    connect_timeout: float = 2.0


class PoolWaiter(Protocol):
    def on_upstream_ready(self, conn: UpstreamConnection) -> None: ...

    def on_upstream_failed(self, reason: str, message: str) -> None: ...


class PoolOverflowError(Exception):
    """The pool is at max_connections and its pending queue is full."""


class Pool:
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
        head_cache: HeadCache | None = None,
        tls: UpstreamTLS | None = None,
    ) -> None:
        self.host = host
        # mTLS to a remote sidecar: the context at each connect (it changes on renewal)
        # and the check that the peer is the destination's identity.
        self.tls = tls
        # Egress pools: what each new connection reached is checked before use.
        self.guard = guard
        # Response heads llhttp already parsed, shared by the pools of one listener.
        self.head_cache = head_cache
        self.port = port
        self.policy = policy
        self.ssl = ssl
        self.server_hostname = server_hostname
        self.name = name or f"{host}:{port}"
        self.idle: list[UpstreamConnection] = []
        self.size = 0  # open or opening connections
        self.connecting = 0
        self.waiters: deque[PoolWaiter] = deque()
        self.closed = False
        self.connects = 0
        self.connect_failures = 0
        self._tasks: set[asyncio.Task[None]] = set()

    def acquire(self, waiter: PoolWaiter) -> UpstreamConnection | None:
        idle = self.idle
        while idle:
            conn = idle.pop()
            if not conn.closed:
                return conn
        if self.closed:
            raise PoolOverflowError("pool closed")
        if self.size < self.policy.max_connections:
            self._connect(waiter)
        elif len(self.waiters) < self.policy.max_pending:
            self.waiters.append(waiter)
        else:
            raise PoolOverflowError(f"{self.name}: {self.size} connections, pending queue full")
        return None

    def cancel(self, waiter: PoolWaiter) -> None:
        """The waiter no longer wants a connection (its client went away)."""
        try:
            self.waiters.remove(waiter)
        except ValueError:
            pass

    def release(self, conn: UpstreamConnection, now: float) -> None:
        conn.unbind()
        codec = conn.codec
        if conn.closed or not conn.keep_alive or codec.in_body or codec.upgraded or self.closed:
            conn.close()
            return
        if self.waiters:
            waiter = self.waiters.popleft()
            asyncio.get_running_loop().call_soon(self._hand, waiter, conn)
            return
        if len(self.idle) >= self.policy.max_idle:
            conn.close()
            return
        conn.idle_since = now
        self.idle.append(conn)

    def _hand(self, waiter: PoolWaiter, conn: UpstreamConnection) -> None:
        if conn.closed:
            # Lost while queued for the waiter: a fresh connection takes its place.
            if self.size < self.policy.max_connections:
                self._connect(waiter)
            else:
                self.waiters.appendleft(waiter)
            return
        waiter.on_upstream_ready(conn)

    def discard(self, conn: UpstreamConnection) -> None:
        """A connection closed (either side): forget it."""
        self.size -= 1
        try:
            self.idle.remove(conn)
        except ValueError:
            pass
        if self.waiters and self.size < self.policy.max_connections and not self.closed:
            self._connect(self.waiters.popleft())

    def detach(self, conn: UpstreamConnection) -> None:
        """The connection leaves the pool for good (it became a tunnel after a 101)."""
        conn.closed = True  # to the pool's eyes
        self.size -= 1

    def sweep(self, now: float) -> None:
        deadline = now - self.policy.idle_timeout
        for conn in [c for c in self.idle if c.idle_since < deadline]:
            conn.close()

    def _connect(self, waiter: PoolWaiter) -> None:
        self.size += 1
        self.connecting += 1
        task = asyncio.get_running_loop().create_task(self._open(waiter))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _open(self, waiter: PoolWaiter) -> None:
        loop = asyncio.get_running_loop()
        tls = self.tls
        ctx = tls.context if tls is not None else self.ssl
        try:
            try:
                _, conn = await asyncio.wait_for(
                    loop.create_connection(
                        lambda: UpstreamConnection(self),
                        self.host,
                        self.port,
                        ssl=ctx,
                        # A mesh peer is checked by its SPIFFE ID, not a host name.
                        server_hostname=""
                        if tls is not None
                        else (self.server_hostname if ctx else None),
                    ),
                    self.policy.connect_timeout,
                )
            finally:
                self.connecting -= 1
        except (OSError, TimeoutError, ssl_module.SSLError) as e:
            self.size -= 1
            self.connect_failures += 1
            message = (
                f"connect to {self.name} timed out after {self.policy.connect_timeout}s"
                if isinstance(e, TimeoutError)
                else f"connect to {self.name} failed: {e}"
            )
            # A timeout has its own reason (503 upstream_connect_timeout), a failed TLS
            # handshake its own (502 upstream_tls_error), a refusal 502.
            if isinstance(e, TimeoutError):
                reason = local_reply.UPSTREAM_CONNECT_TIMEOUT
            elif isinstance(e, ssl_module.SSLError):
                reason = local_reply.UPSTREAM_TLS_ERROR
                if tls is not None:  # a mesh handshake (proxy/tls_stats.py)
                    tls.handshake_failed(e)
            else:
                reason = local_reply.UPSTREAM_CONNECT_ERROR
            waiter.on_upstream_failed(reason, message)
            # Queued waiters get their own attempt rather than waiting for nothing.
            if self.waiters and self.size < self.policy.max_connections:
                self._connect(self.waiters.popleft())
            return
        self.connects += 1
        if self.closed:
            conn.close()
            waiter.on_upstream_failed("upstream_connect_error", "pool closed")
            return
        if tls is not None:
            refused = tls.check(conn.transport)
            if refused is not None:
                conn.abort()
                self.connect_failures += 1
                waiter.on_upstream_failed(local_reply.UPSTREAM_TLS_ERROR, f"{self.name}: {refused}")
                return
        if self.guard is not None:
            what = self.guard.denied(conn.transport)
            if what is not None:
                conn.abort()
                waiter.on_upstream_failed(
                    local_reply.EGRESS_DENIED, f"egress to {self.name} reaches {what}"
                )
                return
        waiter.on_upstream_ready(conn)

    def close(self) -> None:
        """Close idle connections and refuse new ones; busy ones finish their requests."""
        self.closed = True
        for conn in list(self.idle):
            conn.close()
        while self.waiters:
            self.waiters.popleft().on_upstream_failed("upstream_connect_error", "pool closed")

    def __repr__(self) -> str:
        busy = self.size - len(self.idle) - self.connecting
        return (
            f"<Pool {self.name} idle={len(self.idle)} busy={busy} connecting={self.connecting}"
            f" pending={len(self.waiters)} max={self.policy.max_connections}"
            f"{' closed' if self.closed else ''}>"
        )
