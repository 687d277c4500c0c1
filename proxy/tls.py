"""Mesh TLS in the sidecar: its identity as SSL contexts, the peer checks, and the TLS port.

`MeshTLS` holds the sidecar's key, its leaf (with intermediates) and the trust bundle,
and builds from them a server and two client `ssl.SSLContext`s (TLS 1.3 only, a
certificate required from the peer and verified by OpenSSL against the bundle; ALPN:
the server offers `h2` and `http/1.1`, the HTTP/1 pools' client `http/1.1`, the HTTP/2
pools' client `h2`, so each pool gets the protocol it speaks). A renewal or a new
bundle builds new contexts: connections already open keep the one they were made with,
new handshakes take the new one, nothing is dropped.

After each handshake the peer's leaf is checked again with `wire.spiffe.verify_peer`
(the SPIFFE rules OpenSSL does not know: one URI SAN in Consul's form, the trust
domain, no CA bit, digitalSignature and the role's extended key usage, and, when this
side dialled, that the peer is the destination it meant to reach).

`MeshServer` is the accepting side of an inbound port: it looks at the first byte a
client sends without reading it (`MSG_PEEK`), 0x16 being a TLS handshake record, and
either hands the socket to the event loop with TLS, or, for plaintext, serves it as is
(mode `permissive`) or answers `400 mtls_required` and closes (mode `strict`), as nginx
answers plain HTTP on a TLS port.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import os
import secrets
import socket
import ssl
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from proxy import local_reply
from proxy.tls_stats import HandshakeCounts, failure_reason
from wire.spiffe import PeerVerificationError, SpiffeId, verify_peer

log = logging.getLogger("tether.tls")

ALPN = ("http/1.1",)
# The accepting side offers both and the client chooses: the HTTP/1 pools' client
# context offers http/1.1 only, the HTTP/2 pools' one (`client_h2`) h2 only.
ALPN_SERVER = ("h2", "http/1.1")
ALPN_H2 = ("h2",)
MTLS_REQUIRED = "mtls_required"
TLS_RECORD_HANDSHAKE = 0x16
# How long a client has to send its first byte, and then to finish the handshake.
FIRST_BYTE_TIMEOUT = 10.0
HANDSHAKE_TIMEOUT = 10.0
# Connections accepted but not yet handed to the loop (first byte or handshake pending).
MAX_PENDING = 1024

Mode = Literal["strict", "permissive"]


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class MeshTLS:
    """The sidecar's identity and trust bundle, as the contexts its listeners and pools use."""

    def __init__(self, identity: SpiffeId, *, clock: Callable[[], dt.datetime] = _utcnow) -> None:
        self.identity = identity
        self.trust_domain = identity.trust_domain
        self.clock = clock
        self.roots: tuple[x509.Certificate, ...] = ()
        self.roots_pem = ""
        self.leaf: x509.Certificate | None = None
        # Certificates between a leaf and a root (a cross-signed root after a rotation):
        # our own, presented after our leaf, and the ones the bundle's peers may need.
        self.intermediates: tuple[x509.Certificate, ...] = ()
        self._key: ec.EllipticCurvePrivateKey | None = None
        self._chain_pem = ""
        self.server: ssl.SSLContext | None = None
        self.client: ssl.SSLContext | None = None
        self.client_h2: ssl.SSLContext | None = None  # ALPN h2 (proxy/h2_pool.py)
        self.generation = 0  # bumped on every new pair of contexts
        self.refused = 0  # peers whose certificate was refused after the handshake
        self.handshakes = HandshakeCounts()  # by side and result (proxy/tls_stats.py)

    @property
    def ready(self) -> bool:
        return self.server is not None

    def trust(self, trust_domain: str, roots_pem: Sequence[str]) -> None:
        """A new trust bundle (at start, and when the roots rotate)."""
        if trust_domain != self.trust_domain:
            raise ValueError(
                f"the bundle is for trust domain {trust_domain!r}, this sidecar is in "
                f"{self.trust_domain!r}"
            )
        roots = tuple(x509.load_pem_x509_certificate(p.encode()) for p in roots_pem)
        if not roots:
            raise ValueError("an empty trust bundle")
        self.roots = roots
        self.roots_pem = "".join(p if p.endswith("\n") else p + "\n" for p in roots_pem)
        self._rebuild()

    def load(
        self,
        key: ec.EllipticCurvePrivateKey,
        leaf_pem: str,
        intermediate_pems: Sequence[str] = (),
    ) -> x509.Certificate:
        """A new key and leaf (at start, and at each renewal)."""
        leaf = x509.load_pem_x509_certificate(leaf_pem.encode())
        self.intermediates = tuple(
            x509.load_pem_x509_certificate(p.encode()) for p in intermediate_pems
        )
        self._key = key
        self.leaf = leaf
        self._chain_pem = "".join(
            p if p.endswith("\n") else p + "\n" for p in (leaf_pem, *intermediate_pems)
        )
        self._rebuild()
        return leaf

    def _rebuild(self) -> None:
        if self._key is None or not self.roots:
            return
        self.server = self._context(ssl.PROTOCOL_TLS_SERVER, ALPN_SERVER)
        self.client = self._context(ssl.PROTOCOL_TLS_CLIENT)
        self.client_h2 = self._context(ssl.PROTOCOL_TLS_CLIENT, ALPN_H2)
        self.generation += 1

    def _context(self, protocol: int, alpn: Sequence[str] = ALPN) -> ssl.SSLContext:
        ctx = ssl.SSLContext(protocol)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.check_hostname = False  # identities are SPIFFE URIs, checked after the handshake
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.set_alpn_protocols(list(alpn))
        ctx.load_verify_locations(cadata=self.roots_pem)
        assert self._key is not None
        _load_chain(ctx, self._key, self._chain_pem)
        return ctx

    # -- after a handshake -------------------------------------------------------------

    def peer_identity(self, transport: Any, expected: SpiffeId | None = None) -> SpiffeId:
        """The SPIFFE ID of the peer of a TLS transport; `PeerVerificationError` if its
        certificate is not a mesh identity (or not `expected`, when we dialled it)."""
        sslobj = transport.get_extra_info("ssl_object")
        der = sslobj.getpeercert(binary_form=True) if sslobj is not None else None
        if not der:
            raise PeerVerificationError("the peer sent no certificate")
        leaf = x509.load_der_x509_certificate(der)
        now = self.clock()
        # OpenSSL already built the path to a root of the bundle; this repeats it with
        # the intermediates we know (a cross-signed root) and adds the SPIFFE rules.
        known = [c for c in self.intermediates if c.not_valid_after_utc > now]
        return verify_peer(
            [leaf, *known],
            self.roots,
            trust_domain=self.trust_domain,
            now=now,
            role="client" if expected is None else "server",
            expected=expected,
        )

    def describe(self) -> dict[str, Any]:
        leaf = self.leaf
        return {
            "identity": self.identity.uri,
            "trust_domain": self.trust_domain,
            "roots": len(self.roots),
            "serial": format(leaf.serial_number, "x") if leaf else None,
            "valid_before": leaf.not_valid_after_utc.isoformat() if leaf else None,
            "generation": self.generation,
            "refused_peers": self.refused,
        }

    def __repr__(self) -> str:
        serial = format(self.leaf.serial_number, "x") if self.leaf else "-"
        return f"<MeshTLS {self.identity} serial={serial} roots={len(self.roots)}>"


def _load_chain(ctx: ssl.SSLContext, key: ec.EllipticCurvePrivateKey, chain_pem: str) -> None:
    """`ssl` reads a key only from a file: it is written encrypted with a password that
    exists only in this process, in a 0700 directory removed at once."""
    password = secrets.token_bytes(32)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(password),
    ).decode()
    with tempfile.TemporaryDirectory(prefix="tether-tls-") as tmp:
        path = Path(tmp) / "identity.pem"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(key_pem + chain_pem)
        ctx.load_cert_chain(path, password=password)


class UpstreamTLS:
    """How a pool dials one mesh destination: the sidecar's client context, and the
    identity the peer must prove (its service in its namespace, any datacenter)."""

    __slots__ = ("expected", "mesh")

    def __init__(self, mesh: MeshTLS, namespace: str, service: str) -> None:
        self.mesh = mesh
        self.expected = SpiffeId(mesh.trust_domain, namespace, "dc", service)

    @property
    def context(self) -> ssl.SSLContext | None:
        return self.mesh.client

    @property
    def h2_context(self) -> ssl.SSLContext | None:
        """The client context offering ALPN `h2` (the HTTP/2 pools')."""
        return self.mesh.client_h2

    def handshake_failed(self, exc: BaseException) -> None:
        """A handshake with the destination failed before any check (counted)."""
        self.mesh.handshakes.failed("client", failure_reason(exc))

    def check(self, transport: Any) -> str | None:
        """None if the peer is the destination, else why not."""
        try:
            self.mesh.peer_identity(transport, self.expected)
        except PeerVerificationError as exc:
            self.mesh.refused += 1
            self.mesh.handshakes.failed("client", "identity")
            return str(exc)
        self.mesh.handshakes.ok("client")
        return None

    def __repr__(self) -> str:
        return f"<UpstreamTLS expect {self.expected.namespace}/{self.expected.service}>"


class InboundIdentity:
    """The inbound listener's check of each accepted connection (ProxyServer.identify):
    the caller's SPIFFE ID for a TLS connection, "" for plaintext (permissive mode)."""

    __slots__ = ("mesh",)

    def __init__(self, mesh: MeshTLS) -> None:
        self.mesh = mesh

    def __call__(self, transport: Any) -> str | None:
        """The identity, "" without TLS, or None: refused (logged once per reason)."""
        if transport.get_extra_info("ssl_object") is None:
            return ""
        try:
            uri = self.mesh.peer_identity(transport).uri
        except PeerVerificationError as exc:
            self.mesh.refused += 1
            self.mesh.handshakes.failed("server", "identity")
            peer = transport.get_extra_info("peername")
            log.warning("inbound: refused %s: %s", peer[0] if peer else "?", exc)
            return None
        self.mesh.handshakes.ok("server")
        return uri


def mtls_required_reply() -> bytes:
    return local_reply.render(
        MTLS_REQUIRED,
        "this port accepts mutual TLS only (the caller must be a mesh sidecar)",
        status=400,
        close=True,
    )


class MeshServer:
    """An accepting socket that sorts TLS from plaintext by the first byte.

    The same face as `asyncio.Server` for the `Listener` (`sockets`, `close`,
    `wait_closed`); `mode` may change while it runs (a new policy)."""

    def __init__(
        self,
        factory: Callable[[], asyncio.Protocol],
        mesh: MeshTLS,
        sock: socket.socket,
        mode: Mode = "strict",
    ) -> None:
        self.factory = factory
        self.mesh = mesh
        self.mode: Mode = mode
        self.sock = sock
        self.sockets = [sock]
        self.loop = asyncio.get_running_loop()
        self.pending: dict[int, tuple[socket.socket, asyncio.TimerHandle]] = {}
        self.handshakes: set[asyncio.Task[None]] = set()
        self.closed = False
        self.plaintext_refused = 0
        self.plaintext_served = 0
        self.tls_accepted = 0
        self.handshake_failures = 0
        sock.setblocking(False)
        self.loop.add_reader(sock.fileno(), self._accept)

    @classmethod
    async def start(
        cls,
        factory: Callable[[], asyncio.Protocol],
        mesh: MeshTLS,
        host: str,
        port: int,
        mode: Mode = "strict",
        backlog: int = 1024,
    ) -> MeshServer:
        infos = await asyncio.get_running_loop().getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
        family, type_, proto, _, addr = infos[0]
        sock = socket.socket(family, type_, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(addr)
            sock.listen(backlog)
        except OSError:
            sock.close()
            raise
        return cls(factory, mesh, sock, mode)

    def _accept(self) -> None:
        for _ in range(64):  # a burst of connections, then let the loop run
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE and the like: refuse, keep listening
                log.warning("inbound: accept failed: %s", exc)
                return
            if len(self.pending) + len(self.handshakes) >= MAX_PENDING:
                conn.close()
                continue
            conn.setblocking(False)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            fd = conn.fileno()
            timer = self.loop.call_later(FIRST_BYTE_TIMEOUT, self._give_up, fd)
            self.pending[fd] = (conn, timer)
            self.loop.add_reader(fd, self._first_byte, fd)

    def _give_up(self, fd: int) -> None:
        entry = self.pending.pop(fd, None)
        if entry is not None:
            self.loop.remove_reader(fd)
            entry[0].close()

    def _first_byte(self, fd: int) -> None:
        entry = self.pending.pop(fd, None)
        if entry is None:
            return
        conn, timer = entry
        timer.cancel()
        self.loop.remove_reader(fd)
        try:
            first = conn.recv(1, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            self.pending[fd] = (conn, self.loop.call_later(FIRST_BYTE_TIMEOUT, self._give_up, fd))
            self.loop.add_reader(fd, self._first_byte, fd)
            return
        except OSError:
            conn.close()
            return
        if not first:
            conn.close()
            return
        if first[0] == TLS_RECORD_HANDSHAKE:
            ctx = self.mesh.server
            if ctx is None:  # no identity yet: nothing to present
                conn.close()
                return
            task = self.loop.create_task(self._handshake(conn, ctx))
            self.handshakes.add(task)
            task.add_done_callback(self.handshakes.discard)
        elif self.mode == "permissive":
            self.plaintext_served += 1
            task = self.loop.create_task(self._plain(conn))
            self.handshakes.add(task)
            task.add_done_callback(self.handshakes.discard)
        else:
            self.plaintext_refused += 1
            self._refuse(conn)

    async def _handshake(self, conn: socket.socket, ctx: ssl.SSLContext) -> None:
        try:
            await self.loop.connect_accepted_socket(
                self.factory, conn, ssl=ctx, ssl_handshake_timeout=HANDSHAKE_TIMEOUT
            )
            self.tls_accepted += 1
        except (OSError, ssl.SSLError, TimeoutError, ConnectionError) as exc:
            self.handshake_failures += 1
            self.mesh.handshakes.failed("server", failure_reason(exc))
            log.debug("inbound: TLS handshake failed: %s", exc)
            conn.close()

    async def _plain(self, conn: socket.socket) -> None:
        try:
            await self.loop.connect_accepted_socket(self.factory, conn)
        except OSError:
            conn.close()

    def _refuse(self, conn: socket.socket) -> None:
        """Plaintext at a strict port: `400 mtls_required`, and the connection closed
        (what was sent is read and dropped first, so the close does not reset the reply)."""
        try:
            conn.recv(65536)
            conn.send(mtls_required_reply())
            conn.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        conn.close()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.loop.remove_reader(self.sock.fileno())
        self.sock.close()
        for fd, (conn, timer) in list(self.pending.items()):
            timer.cancel()
            self.loop.remove_reader(fd)
            conn.close()
        self.pending.clear()

    async def wait_closed(self) -> None:
        for task in list(self.handshakes):
            task.cancel()
        if self.handshakes:
            await asyncio.gather(*self.handshakes, return_exceptions=True)

    def __repr__(self) -> str:
        return (
            f"<MeshServer {self.mode} tls={self.tls_accepted}"
            f" plaintext_refused={self.plaintext_refused} pending={len(self.pending)}>"
        )
