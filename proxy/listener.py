"""Listeners: bind the outbound, inbound and opaque-TCP ports, sweep timeouts, drain.

    stats = ProxyStats()
    outbound = await start_outbound(directory, stats=stats, port=15001, namespace="default")
    inbound = await start_inbound(app_port, stats=stats, host="0.0.0.0", port=15006)
    ...
    await inbound.drain(10.0)   # stop accepting, finish in-flight, close idle keep-alive
    await outbound.aclose()

Both HTTP listeners take optional TLS contexts: `ssl` for the accepting side and
`upstream_ssl` / `app_ssl` for the pools they dial, so mTLS between sidecars wraps the
same code. Each listener runs one repeating timer (the sweep), never one per request.
"""

from __future__ import annotations

import asyncio
import gc
import os
import ssl as ssl_module
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal

from proxy.cluster import ServiceDirectory
from proxy.dispatch import InboundRouter, OutboundRouter
from proxy.downstream import ProxyServer, Router, TimeoutPolicy
from proxy.egress import EgressGuard
from proxy.pool import Pool, PoolPolicy
from proxy.stats import ProxyStats
from proxy.tunnel import TcpProxyServer

if TYPE_CHECKING:
    from proxy.authz import InboundAuthz
    from proxy.tls import MeshTLS, Mode


def settle_process(*, batch: bool = True, heap_reads: bool = True) -> None:
    """Tune a relaying process once its listeners are up: freeze the GC heap, large reads
    from the heap (`keep_reads_on_heap`), batch scheduling.

    `gc.freeze()` moves everything startup allocated (modules, config, the listeners)
    out of the collector's generations, so a full collection never walks it again.
    SCHED_BATCH (Linux) keeps this process from preempting the running one when a
    socket wakes it: the sidecar shares a core with its app and with the sidecar at
    the other end of a hop, and every wake-up preemption cut a batch of ready requests
    short (measured on the two-hop bench path: about 0.15 context switches per request
    per process instead of 0.04, and ~10% more CPU per request). A woken sidecar still
    runs as soon as the running task blocks or its slice ends.
    """
    gc.freeze()
    if heap_reads:
        keep_reads_on_heap()
    if batch and hasattr(os, "SCHED_BATCH"):
        try:
            os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
        except OSError:
            pass  # not permitted here (seccomp, container policy): keep the default


# glibc's malloc options (mallopt(3)): M_TRIM_THRESHOLD, M_MMAP_THRESHOLD.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# Above uvloop's TLS read size (256 KiB), and twice that for trimming (glibc's own
# ratio when it moves the threshold itself).
MMAP_THRESHOLD = 1 << 20
TRIM_THRESHOLD = 2 << 20


def keep_reads_on_heap() -> bool:
    """Serve allocations up to 1 MiB from the heap, not from mmap (glibc only).

    uvloop's TLS transport decrypts each record with `SSLObject.read(256 KiB)`: a 256 KiB
    bytes object, shrunk to the few hundred bytes read. Above glibc's initial mmap
    threshold (128 KiB), whenever the heap has no free block that large, that is an
    mmap, an mremap and later an munmap per read, and page faults on fresh zero pages:
    measured on the inbound hop of the mTLS path, one of each per request (strace; 2
    page faults per request), kernel work a plaintext hop never does. glibc raises
    its threshold by itself only when a large mmapped block is freed, which the shrunk
    block never is. With the threshold above the read size, the block comes from the
    heap and the shrink happens in place; with the trim threshold above it too, the
    heap's top is not given back and taken again on every read (brk). What start-up
    left free is given back once, here (malloc_trim), so the higher trim threshold does
    not keep it. Returns whether the options were set."""
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    done = bool(
        mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )
    trim = getattr(libc, "malloc_trim", None)
    if trim is not None:
        trim.argtypes = (ctypes.c_size_t,)
        trim(0)
    return done


class Listener:
    """One bound HTTP listener: `.port`, `.drain(seconds)`, `.aclose()`."""

    def __init__(self, proxy: ProxyServer, server: asyncio.Server | Any) -> None:
        self.proxy = proxy
        self.server = server
        sockname = server.sockets[0].getsockname()
        self.host: str = sockname[0]
        self.port: int = sockname[1]
        self._sweeper: asyncio.TimerHandle | None = None
        self._closed = False
        self._schedule()

    @property
    def router(self) -> Router:
        return self.proxy.router

    @property
    def connections(self) -> int:
        return len(self.proxy.connections)

    def pools(self) -> list[Pool]:
        return self.proxy.router.pools()

    def _schedule(self) -> None:
        loop = asyncio.get_running_loop()
        self._sweeper = loop.call_later(self.proxy.timeouts.tick, self._sweep)

    def _sweep(self) -> None:
        if self._closed:
            return
        try:
            self.proxy.sweep(time.monotonic())
        finally:
            self._schedule()

    async def drain(self, seconds: float) -> bool:
        """Stop accepting, let in-flight requests finish within `seconds`, then cut.

        Idle keep-alive connections close now; busy ones close after their response
        (which says `Connection: close`). True if everything finished in time.
        """
        proxy = self.proxy
        proxy.draining = True
        self.server.close()
        for conn in list(proxy.connections):
            if not conn.active:
                conn.close()
        h2 = proxy.h2
        if h2 is not None:
            h2.drain()  # GOAWAY: streams in flight finish
        deadline = time.monotonic() + seconds
        while (
            proxy.connections or (h2 is not None and h2.connections)
        ) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        clean = not proxy.connections and not (h2 is not None and h2.connections)
        for conn in list(proxy.connections):
            conn.abort()
        if h2 is not None:
            h2.abort()
        proxy.router.close()
        return clean

    async def aclose(self) -> None:
        if self._closed:
            return
        if not self.proxy.draining:
            await self.drain(0.0)
        self._closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
        await self.server.wait_closed()

    def __repr__(self) -> str:
        return f"<Listener {self.proxy.name} {self.host}:{self.port} {self.proxy!r}>"


async def _listen(
    router: Router,
    stats: ProxyStats,
    timeouts: TimeoutPolicy,
    host: str,
    port: int,
    ssl: ssl_module.SSLContext | None,
) -> Listener:
    proxy = ProxyServer(router, timeouts, stats, scheme=b"https" if ssl else b"http")
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        proxy,
        host,
        port,
        ssl=ssl,
        reuse_address=True,
        backlog=1024,
    )
    stats.pool_sources.append(router.pools)
    return Listener(proxy, server)


async def start_outbound(
    directory: ServiceDirectory,
    *,
    stats: ProxyStats | None = None,
    host: str = "127.0.0.1",
    port: int = 15001,
    namespace: str = "default",
    egress: Literal["allow", "deny"] = "allow",
    timeouts: TimeoutPolicy | None = None,
    pool_policy: PoolPolicy | None = None,
    ssl: ssl_module.SSLContext | None = None,
    upstream_ssl: ssl_module.SSLContext | None = None,
    egress_guard: EgressGuard | None = None,
    mesh_tls: MeshTLS | None = None,
) -> Listener:
    """The app's way out: absolute-form (HTTP_PROXY) and Host-named requests, CONNECT.

    Egress never reaches this listener's own port, nor what `egress_guard` protects.
    """
    stats = stats if stats is not None else ProxyStats()
    timeouts = timeouts or TimeoutPolicy()
    policy = pool_policy or PoolPolicy(connect_timeout=timeouts.connect)
    router = OutboundRouter(
        directory,
        stats,
        namespace=namespace,
        egress=egress,
        pool_policy=policy,
        upstream_ssl=upstream_ssl,
        egress_guard=egress_guard,
        mesh_tls=mesh_tls,
    )
    return await _listen_outbound(router, stats, timeouts, host, port, ssl)


async def _listen_outbound(
    router: OutboundRouter,
    stats: ProxyStats,
    timeouts: TimeoutPolicy,
    host: str,
    port: int,
    ssl: ssl_module.SSLContext | None,
) -> Listener:
    """An outbound router's listener; egress never reaches the port it is bound to."""
    listener = await _listen(router, stats, timeouts, host, port, ssl)
    router.listen_port = listener.port
    router.egress_guard.protect_local("this sidecar's outbound listener", listener.port)
    return listener


async def start_inbound(
    app_port: int,
    *,
    stats: ProxyStats | None = None,
    host: str = "127.0.0.1",
    port: int = 15006,
    app_host: str = "127.0.0.1",
    timeouts: TimeoutPolicy | None = None,
    pool_policy: PoolPolicy | None = None,
    ssl: ssl_module.SSLContext | None = None,
    app_ssl: ssl_module.SSLContext | None = None,
    mesh_tls: MeshTLS | None = None,
    mtls_mode: Mode = "strict",
    authz: InboundAuthz | None = None,
    app_protocol: str = "http",
) -> Listener:
    """Other sidecars' way in: every request goes to the app at app_host:app_port, once
    `authz` (the service's intentions, when a control plane sends them) allows it.

    With `mesh_tls` the port speaks mutual TLS (proxy/tls.py): the caller's SPIFFE ID
    goes on its `Peer` and to the app as `x-tether-peer-identity`; plaintext is refused
    with `400 mtls_required` (`mtls_mode` "strict") or served (mode "permissive").
    HTTP/2 streams reach the app over h2c when `app_protocol` is `http2` or `grpc`."""
    stats = stats if stats is not None else ProxyStats()
    timeouts = timeouts or TimeoutPolicy()
    policy = pool_policy or PoolPolicy(connect_timeout=timeouts.connect)
    router = InboundRouter(
        app_port, stats, app_host=app_host, pool_policy=policy, app_ssl=app_ssl, authz=authz
    )
    if mesh_tls is None:
        listener = await _listen(router, stats, timeouts, host, port, ssl)
        listener.proxy.app_h2 = app_protocol in ("http2", "grpc")
        return listener
    from proxy.tls import InboundIdentity, MeshServer

    proxy = ProxyServer(router, timeouts, stats, scheme=b"https")
    proxy.identify = InboundIdentity(mesh_tls)
    proxy.app_h2 = app_protocol in ("http2", "grpc")
    server = await MeshServer.start(proxy, mesh_tls, host, port, mtls_mode)
    stats.pool_sources.append(router.pools)
    return Listener(proxy, server)


async def start_ingress(
    inner: OutboundRouter,
    service: str,
    namespace: str,
    *,
    stats: ProxyStats,
    host: str = "127.0.0.1",
    port: int = 0,
    timeouts: TimeoutPolicy | None = None,
) -> Listener:
    """The ingress listener (proxy/ingress.py): outside callers to `service` through
    `inner`, an outbound router of its own (egress denied) named "ingress" in stats."""
    from proxy.ingress import IngressRouter

    inner.name = "ingress"
    router = IngressRouter(inner, service, namespace)
    listener = await _listen(router, stats, timeouts or TimeoutPolicy(), host, port, None)
    inner.listen_port = listener.port
    return listener


async def start_expose(
    path: str,
    app_port: int,
    *,
    stats: ProxyStats,
    host: str = "127.0.0.1",
    port: int = 0,
    app_host: str = "127.0.0.1",
    timeouts: TimeoutPolicy | None = None,
) -> Listener:
    """The plaintext health-check listener (proxy/expose.py): the app's `path` only."""
    from proxy.expose import ExposeRouter

    timeouts = timeouts or TimeoutPolicy()
    policy = PoolPolicy(connect_timeout=timeouts.connect, max_connections=16)
    router = ExposeRouter(path, app_port, stats, app_host=app_host, pool_policy=policy)
    return await _listen(router, stats, timeouts, host, port, None)


async def start_tcp_proxy(
    pick: Callable[[], tuple[str, int] | None],
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    connect_timeout: float = 2.0,
) -> TcpProxyServer:
    """An opaque port: each accepted connection is spliced raw to `pick()`'s address."""
    server = TcpProxyServer(pick, connect_timeout)
    await server.start(host, port)
    return server
