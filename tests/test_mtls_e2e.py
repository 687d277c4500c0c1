"""mTLS between sidecars, end to end: a real registry, a control plane with its CA, two
sidecars (in this process, on real sockets) and an app that echoes what it received.

The calling sidecar gets its certificate from a CSR, dials the serving sidecar over
TLS 1.3 and checks its SPIFFE ID; the serving sidecar reads the caller's identity from
its certificate and hands it to the app as `x-tether-peer-identity` (a forged one from
outside is dropped). Plaintext at the inbound port is answered `400 mtls_required`; a
certificate from another CA, an expired one, one with the CA bit and one naming another
service are refused at the handshake or right after it.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import json
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from controlplane.ca.service import CA_SERVICE
from controlplane.server import ControlPlane, ControlPlaneSpec, RegistryAddress
from proxy.sidecar import Sidecar, SidecarSpec
from proxy.tls import MeshTLS
from registry.server import RegistryServer
from tests.ca_material import ca_cert
from tests.conftest import serve_app
from tests.polling import until
from wire.spiffe import SpiffeId, make_csr, new_key

KEK = base64.b64encode(bytes(range(1, 33))).decode()


async def echo(request: web.Request) -> web.Response:
    body = {"path": request.path, "headers": {k.lower(): v for k, v in request.headers.items()}}
    return web.json_response(body)


@dataclass
class Mesh:
    cp: ControlPlane
    a: Sidecar
    b: Sidecar
    app_b_port: int

    @property
    def trust_domain(self) -> str:
        tls = self.b.mesh_tls
        assert isinstance(tls, MeshTLS)
        return tls.trust_domain


StartSidecar = Callable[..., Awaitable[Sidecar]]


@pytest.fixture
async def cp(
    registry: RegistryServer, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[ControlPlane]:
    monkeypatch.setenv("TETHER_CA_ENCRYPTION_KEY", KEK)
    monkeypatch.setenv("TETHER_CA_LEAF_TTL", "10m")
    reg = RegistryAddress("127.0.0.1", registry.port, "http", None)
    server = ControlPlane(ControlPlaneSpec(port=0, registry=reg, watch_wait="5s", tls_port=0))
    await server.start()
    await asyncio.wait_for(server.app[CA_SERVICE].ready.wait(), 15)
    await until(lambda: server.app[CA_SERVICE].tls is not None, 15, "the TLS port open")
    try:
        yield server
    finally:
        await server.aclose()


@pytest.fixture
async def start_sidecar(registry: RegistryServer) -> AsyncIterator[StartSidecar]:
    made: list[Sidecar] = []

    async def start(service: str, app_port: int, controlplane: str | None, **kw: Any) -> Sidecar:
        spec = SidecarSpec(
            service=service,
            app_port=app_port,
            outbound_port=0,
            inbound_port=0,
            admin_port=0,
            registry_port=registry.port,
            controlplane=controlplane,
            check_interval=0.5,
            sched_batch=False,
            **kw,
        )
        sidecar = Sidecar(spec)
        made.append(sidecar)
        await sidecar.start()
        return sidecar

    yield start
    for s in made:
        await s.aclose()


@pytest.fixture
async def mesh(cp: ControlPlane, start_sidecar: StartSidecar) -> AsyncIterator[Mesh]:
    app = web.Application()
    app.router.add_get("/{tail:.*}", echo)
    runner, app_port = await serve_app(app)
    url = f"http://127.0.0.1:{cp.port}"
    try:
        b = await start_sidecar(
            "b", app_port, url, ingress_port=0, app_check_via="inbound", app_health_path="/health"
        )
        a = await start_sidecar("a", app_port, url)
        yield Mesh(cp, a, b, app_port)
    finally:
        await runner.cleanup()


async def get(port: int, path: str, **kw: Any) -> tuple[int, dict[str, str], Any]:
    async with (
        aiohttp.ClientSession() as s,
        s.get(
            f"http://127.0.0.1:{port}{path}", timeout=aiohttp.ClientTimeout(total=10), **kw
        ) as resp,
    ):
        text = await resp.text()
        try:
            body = json.loads(text)
        except ValueError:
            body = text
        return resp.status, dict(resp.headers), body


async def test_sidecars_talk_mtls_and_the_app_learns_the_callers_identity(mesh: Mesh) -> None:
    a_tls, b_tls = mesh.a.mesh_tls, mesh.b.mesh_tls
    assert isinstance(a_tls, MeshTLS) and isinstance(b_tls, MeshTLS)
    td = mesh.trust_domain
    assert a_tls.identity.uri == f"spiffe://{td}/ns/default/dc/dc1/svc/a"

    async def call() -> Any:
        status, _, body = await get(
            mesh.a.ports()["outbound"],
            "/hello",
            headers={"Host": "b", "x-tether-peer-identity": "spiffe://evil/ns/x/dc/y/svc/z"},
        )
        return body if status == 200 else None

    body = await until(call, 20, "a call from a to b through both sidecars")
    # The forged value is gone; the one the inbound sidecar proved is there.
    assert body["headers"]["x-tether-peer-identity"] == a_tls.identity.uri
    # The hop between the sidecars was TLS: the inbound listener accepted it as such.
    server = mesh.b.inbound.server
    assert server.tls_accepted >= 1 and server.plaintext_refused == 0
    (pool,) = [p for p in mesh.a.outbound.pools() if p.name.startswith("b.default/")]
    assert pool.tls is not None and pool.connects >= 1


async def test_the_outbound_listener_drops_a_forged_identity(mesh: Mesh) -> None:
    """An app's own request to its outbound sidecar never carries a peer identity."""
    status, _, body = await get(
        mesh.b.inbound.port, "/", headers={"x-tether-peer-identity": "spiffe://x/ns/a/dc/b/svc/c"}
    )
    assert status == 400  # plaintext at the inbound port: refused before anything else
    assert body["error"] == "mtls_required"


async def test_plaintext_at_a_strict_inbound_port_is_refused_and_closed(mesh: Mesh) -> None:
    port = mesh.b.inbound.port

    def exchange() -> bytes:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: b\r\n\r\n")
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
            return data  # the server closed: recv returned b""

    data = await asyncio.get_running_loop().run_in_executor(None, exchange)
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 ")
    assert b"x-tether-error: mtls_required" in head
    assert json.loads(body)["error"] == "mtls_required"
    assert mesh.b.inbound.server.plaintext_refused == 1


# -- certificates the inbound sidecar must refuse ------------------------------------------


def _leaf(
    identity: SpiffeId,
    issuer: x509.Certificate,
    issuer_key: ec.EllipticCurvePrivateKey,
    key: ec.EllipticCurvePrivateKey,
    *,
    start: dt.datetime,
    hours: float = 1,
    ca: bool = False,
) -> x509.Certificate:
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, identity.service)]))
        .issuer_name(issuer.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + dt.timedelta(hours=hours))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(True, False, False, False, False, ca, False, False, False),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(identity.uri)]),
            critical=False,
        )
        .sign(issuer_key, hashes.SHA256())
    )


def _client_context(
    tmp: Path, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate, roots: str
) -> ssl.SSLContext:
    path = tmp / f"client-{cert.serial_number}.pem"
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        + cert.public_bytes(serialization.Encoding.PEM)
    )
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(cadata=roots)
    ctx.load_cert_chain(path)
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


async def _served(port: int, ctx: ssl.SSLContext) -> bytes:
    """What the inbound sidecar answers a GET over TLS with this client certificate (b""
    when it refused the handshake or closed right after it)."""
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname=""), 10
        )
    except (ssl.SSLError, ConnectionError, OSError):
        return b""
    try:
        writer.write(b"GET /x HTTP/1.1\r\nHost: b\r\nConnection: close\r\n\r\n")
        return await asyncio.wait_for(reader.read(), 10)
    except (ssl.SSLError, ConnectionError, OSError):
        return b""
    finally:
        writer.close()


async def test_the_inbound_sidecar_refuses_certificates_that_are_not_mesh_identities(
    mesh: Mesh, tmp_path: Path
) -> None:
    b_tls = mesh.b.mesh_tls
    assert isinstance(b_tls, MeshTLS)
    td = mesh.trust_domain
    provider = mesh.cp.app[CA_SERVICE].require()
    state = await provider.state.roots()
    root_record = state.active
    assert root_record is not None
    # The mesh CA's own root key signs the flawed leaves: only the flaw is wrong.
    root_key = provider._open_key(root_record)
    assert isinstance(root_key, ec.EllipticCurvePrivateKey)
    roots_pem = b_tls.roots_pem
    now = dt.datetime.now(dt.UTC)
    who = SpiffeId(td, "default", "dc1", "a")

    # A certificate the mesh CA signed for `a`, through the real CSR path: accepted.
    ok_key = new_key()
    issued = await provider.sign(make_csr(ok_key, who), who)
    good = _client_context(tmp_path, ok_key, issued.cert, roots_pem)
    answer = await _served(mesh.b.inbound.port, good)
    assert answer.startswith(b"HTTP/1.1 200 "), answer[:200]
    assert who.uri.encode() in answer

    # Another CA's certificate with a perfect SPIFFE ID of this trust domain.
    other_key = new_key()
    other_root = ca_cert(other_key, "Another CA", start=now - dt.timedelta(days=1))
    k = new_key()
    foreign = _client_context(
        tmp_path,
        k,
        _leaf(who, other_root, other_key, k, start=now - dt.timedelta(minutes=1)),
        roots_pem,
    )
    assert await _served(mesh.b.inbound.port, foreign) == b""

    root_cert = x509.load_pem_x509_certificate(root_record.root_pem.encode())
    cases = {
        "expired": dict(start=now - dt.timedelta(hours=3), hours=1),
        "not yet valid": dict(start=now + dt.timedelta(hours=1), hours=1),
        "CA bit": dict(start=now - dt.timedelta(minutes=1), ca=True),
    }
    for what, kw in cases.items():
        k = new_key()
        cert = _leaf(who, root_cert, root_key, k, **kw)  # type: ignore[arg-type]
        ctx = _client_context(tmp_path, k, cert, roots_pem)
        assert await _served(mesh.b.inbound.port, ctx) == b"", what
    before = b_tls.refused
    k = new_key()
    bad_id = SpiffeId("other.consul", "default", "dc1", "a")
    cert = _leaf(bad_id, root_cert, root_key, k, start=now - dt.timedelta(minutes=1))
    assert await _served(mesh.b.inbound.port, _client_context(tmp_path, k, cert, roots_pem)) == b""
    assert b_tls.refused == before + 1


# -- renewal and rotation --------------------------------------------------------------


async def _steady_load(port: int, stop: asyncio.Event, limit: int = 2000) -> tuple[int, list[Any]]:
    """Requests one after another on two keep-alive clients (bounded in count), until
    `stop`; returns (how many, the failures)."""
    done = 0
    failures: list[Any] = []
    conn = aiohttp.TCPConnector(limit=2, force_close=False)
    async with aiohttp.ClientSession(connector=conn) as s:

        async def worker() -> None:
            nonlocal done
            while not stop.is_set() and done < limit:
                try:
                    async with s.get(
                        f"http://127.0.0.1:{port}/load",
                        headers={"Host": "b"},
                        timeout=aiohttp.ClientTimeout(total=10),
                    ) as resp:
                        await resp.read()
                        if resp.status != 200:
                            failures.append((resp.status, resp.headers.get("x-tether-error")))
                except (aiohttp.ClientError, TimeoutError) as exc:
                    failures.append(repr(exc))
                done += 1

        await asyncio.gather(worker(), worker())
    return done, failures


async def test_leaf_renewal_under_load_fails_no_request(mesh: Mesh) -> None:
    a_tls, b_tls = mesh.a.mesh_tls, mesh.b.mesh_tls
    assert isinstance(a_tls, MeshTLS) and isinstance(b_tls, MeshTLS)
    port = mesh.a.ports()["outbound"]
    await until(lambda: _ok(port), 20, "the first call from a to b")
    serials = {(a_tls.leaf.serial_number, b_tls.leaf.serial_number)}  # type: ignore[union-attr]
    stop = asyncio.Event()
    load = asyncio.ensure_future(_steady_load(port, stop))
    before = mesh.b.inbound.server.tls_accepted
    for _ in range(3):
        await mesh.a.identity.renew()
        await mesh.b.identity.renew()
        serials.add((a_tls.leaf.serial_number, b_tls.leaf.serial_number))  # type: ignore[union-attr]
        # A new connection (made after the renewal) carries the new certificates.
        await _fresh_pool_connection(mesh)
    stop.set()
    done, failures = await load
    assert failures == [] and done > 0
    assert len(serials) == 4
    assert mesh.b.inbound.server.tls_accepted > before
    # The new leaves are the ones presented now: a new handshake sees b's new serial.
    seen = await _peer_serial(mesh.b.inbound.port, a_tls)
    assert seen == b_tls.leaf.serial_number  # type: ignore[union-attr]


async def _ok(port: int) -> bool:
    status, _, _ = await get(port, "/", headers={"Host": "b"})
    return status == 200


async def _fresh_pool_connection(mesh: Mesh) -> None:
    """Close a's idle pooled connections to b, so the next call makes a new handshake."""
    for pool in mesh.a.outbound.pools():
        for conn in list(pool.idle):
            conn.close()


async def _peer_serial(port: int, tls: MeshTLS) -> int:
    """The serial of the certificate the server at `port` presents (handshake with `tls`'s
    client context, as a sidecar makes it)."""
    assert tls.client is not None
    _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=tls.client, server_hostname="")
    try:
        der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        return x509.load_der_x509_certificate(der).serial_number
    finally:
        writer.close()


async def test_the_renewal_timer_is_due_at_half_the_lifetime(mesh: Mesh) -> None:
    identity = mesh.a.identity
    leaf = identity.tls.leaf
    life = (leaf.not_valid_after_utc - leaf.not_valid_before_utc).total_seconds()
    now = dt.datetime.now(dt.UTC)
    identity.clock = lambda: leaf.not_valid_before_utc
    identity.rng.uniform = lambda lo, hi: 0.0  # no jitter
    assert identity.due_in() == pytest.approx(life / 2)
    identity.clock = lambda: now + dt.timedelta(days=1)
    assert identity.due_in() == 0.0


async def test_root_rotation_end_to_end(mesh: Mesh) -> None:
    a_tls, b_tls = mesh.a.mesh_tls, mesh.b.mesh_tls
    assert isinstance(a_tls, MeshTLS) and isinstance(b_tls, MeshTLS)
    port = mesh.a.ports()["outbound"]
    await until(lambda: _ok(port), 20, "the first call from a to b")
    old_root = a_tls.roots[0]
    async with (
        aiohttp.ClientSession() as s,
        s.post(f"http://127.0.0.1:{mesh.cp.port}/api/v1/ca/rotate") as resp,
    ):
        assert resp.status == 200, await resp.text()
        assert (await resp.json())["crossSigned"] is True
    # The new root reaches both sidecars through the push; the old one stays.
    await until(lambda: len(a_tls.roots) == 2 and len(b_tls.roots) == 2, 20, "the new bundle")
    assert old_root in a_tls.roots
    # b renews from the new root; a still has its old leaf: both ways still verify.
    await mesh.b.identity.renew()
    assert b_tls.leaf.issuer != a_tls.leaf.issuer  # type: ignore[union-attr]
    await _fresh_pool_connection(mesh)
    status, _, body = await get(port, "/after-rotation", headers={"Host": "b"})
    assert status == 200, body
    assert body["headers"]["x-tether-peer-identity"] == a_tls.identity.uri
    await mesh.a.identity.renew()
    await _fresh_pool_connection(mesh)
    status, _, body = await get(port, "/both-new", headers={"Host": "b"})
    assert status == 200, body


# -- modes ------------------------------------------------------------------------------


async def _apply(cp: ControlPlane, doc: dict[str, Any]) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession() as s,
        s.post(f"http://127.0.0.1:{cp.port}/api/v1/apply", json=doc) as resp,
    ):
        return resp.status, await resp.json()


def _doc(kind: str, name: str, spec: dict[str, Any]) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name}
    if kind != "MeshConfig":
        meta["namespace"] = "default"
    return {"apiVersion": "tether.dev/v1alpha1", "kind": kind, "metadata": meta, "spec": spec}


async def test_permissive_mode_serves_plaintext_and_the_service_can_insist(mesh: Mesh) -> None:
    server = mesh.b.inbound.server
    port = mesh.b.inbound.port
    assert server.mode == "strict"
    status, body = await _apply(
        mesh.cp, _doc("MeshConfig", "mesh", {"mtls": {"mode": "permissive"}})
    )
    assert status == 200, body
    await until(lambda: server.mode == "permissive", 20, "b follows the mesh's permissive mode")
    status, _, got = await get(
        port, "/plain", headers={"x-tether-peer-identity": "spiffe://x/ns/a/dc/b/svc/c"}
    )
    assert status == 200 and got["path"] == "/plain"
    # Plaintext has no identity: the forged one is dropped, none is added.
    assert "x-tether-peer-identity" not in got["headers"]
    # mTLS callers still come with theirs.
    status, _, got = await get(mesh.a.ports()["outbound"], "/tls", headers={"Host": "b"})
    assert status == 200 and got["headers"]["x-tether-peer-identity"].endswith("/svc/a")
    # The namespace's setting wins over the mesh's, the service's over both.
    ns_doc = {"mtls": {"mode": "permissive", "namespaces": {"default": {"mode": "strict"}}}}
    assert (await _apply(mesh.cp, _doc("MeshConfig", "mesh", ns_doc)))[0] == 200
    await until(lambda: server.mode == "strict", 20, "the namespace's strict mode")
    sd = _doc("ServiceDefaults", "b", {"mtls": {"mode": "permissive"}})
    assert (await _apply(mesh.cp, sd))[0] == 200
    await until(lambda: server.mode == "permissive", 20, "the service's permissive mode")
    assert (await get(port, "/again"))[0] == 200


async def test_other_meshes_kinds_are_refused_naming_what_replaces_them(mesh: Mesh) -> None:
    for kind, instead in (
        ("PeerAuthentication", "MeshConfig spec.mtls"),
        ("MTLSPolicy", "ServiceDefaults spec.mtls.mode"),
        ("AuthorizationPolicy", "Intention"),
    ):
        status, body = await _apply(mesh.cp, _doc(kind, "x", {}))
        assert status == 422 or status == 400, body
        assert instead in json.dumps(body), body
    status, body = await _apply(mesh.cp, _doc("MeshConfig", "mesh", {"mtls": {"mode": "off"}}))
    assert status in (400, 422) and "spec.mtls.mode" in json.dumps(body), body


# -- the ingress and health-check listeners ------------------------------------------------


async def test_the_ingress_listener_takes_outside_callers_into_the_mesh(mesh: Mesh) -> None:
    port = mesh.b.ports()["ingress"]
    b_tls = mesh.b.mesh_tls
    assert isinstance(b_tls, MeshTLS)

    async def call() -> Any:
        status, _, body = await get(
            port, "/from-outside", headers={"Host": "localhost:8080", "x-tether-peer-identity": "x"}
        )
        return body if status == 200 else None

    body = await until(call, 20, "a call through b's ingress")
    # Routed as b's own outbound calls are: over mTLS to an instance of b (itself here).
    assert body["headers"]["x-tether-peer-identity"] == b_tls.identity.uri
    assert body["headers"]["x-forwarded-host"] == "localhost:8080"

    # Not an open proxy: an absolute-form request goes to b all the same; no CONNECT.
    def raw(head: bytes) -> bytes:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(head)
            return sock.recv(65536)

    loop = asyncio.get_running_loop()
    answer = await loop.run_in_executor(
        None, raw, b"GET http://example.com/abs HTTP/1.1\r\nHost: example.com\r\n\r\n"
    )
    assert answer.startswith(b"HTTP/1.1 200 ")
    got = json.loads(answer.partition(b"\r\n\r\n")[2])
    assert got["path"] == "/abs" and got["headers"]["x-forwarded-host"] == "example.com"
    answer = await loop.run_in_executor(
        None, raw, b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n"
    )
    assert answer.startswith(b"HTTP/1.1 400 ") and b"x-tether-error: bad_request" in answer


async def test_the_registry_checks_the_app_through_a_health_only_listener(
    mesh: Mesh, registry: RegistryServer
) -> None:
    ports = mesh.b.ports()
    assert ports["check"] not in (ports["inbound"], 0)
    import consul.aio

    c = consul.aio.Consul(host="127.0.0.1", port=registry.port)
    try:

        async def passing() -> bool:
            _, nodes = await c.health.service("b", passing=True)
            return bool(nodes)

        await until(passing, 20, "b's checks passing (the app's through the check listener)")
        _, checks = await c.health.checks("b")
        http_checks = [ch for ch in checks if "HTTP" in ch.get("Name", "")]
        assert http_checks and str(ports["check"]) in http_checks[0]["Output"] + str(http_checks[0])
    finally:
        await c.close()
    assert (await get(ports["check"], "/health"))[0] == 200
    status, headers, _ = await get(ports["check"], "/secret")
    assert status == 404 and headers["x-tether-error"] == "not_exposed"


async def test_a_sidecar_without_a_control_plane_speaks_plaintext(
    start_sidecar: StartSidecar,
) -> None:
    app = web.Application()
    app.router.add_get("/{tail:.*}", echo)
    runner, app_port = await serve_app(app)
    try:
        plain = await start_sidecar("p", app_port, None)
        assert plain.mesh_tls is None and plain.identity is None
        assert plain.plaintext_reason == "no control plane, so no mesh CA"
        # Its inbound port is the plain listener: an HTTP request is served.
        status, _, body = await get(
            plain.inbound.port, "/x", headers={"x-tether-peer-identity": "spiffe://forged"}
        )
        assert status == 200 and "x-tether-peer-identity" not in body["headers"]
    finally:
        await runner.cleanup()


async def test_http2_between_sidecars_is_mtls_with_alpn_h2(mesh: Mesh) -> None:
    from tests.h2_peers import H2Client

    a_tls = mesh.a.mesh_tls
    assert isinstance(a_tls, MeshTLS)
    client = await H2Client().connect(mesh.a.ports()["outbound"])
    try:

        async def call() -> Any:
            r = await client.request(
                "/hello", "b", headers=[(b"x-tether-peer-identity", b"spiffe://evil/x")]
            )
            return json.loads(bytes(r.body)) if r.status == 200 else None

        body = await until(call, 20, "an HTTP/2 call from a to b through both sidecars")
        # b's app speaks HTTP/1.1: the stream was bridged; the identity is the proved one.
        assert body["headers"]["x-tether-peer-identity"] == a_tls.identity.uri
        h2 = mesh.a.outbound.proxy.h2
        assert h2 is not None
        (pool,) = [p for p in h2.pools.values() if p.name.startswith("b.default/")]
        assert pool.tls is not None and pool.connects >= 1
        (conn,) = pool.conns
        tls = conn.transport.get_extra_info("ssl_object")
        assert tls is not None and tls.selected_alpn_protocol() == "h2"
        assert mesh.b.inbound.proxy.h2 is not None
    finally:
        await client.aclose()


# -- the control plane's TLS port -------------------------------------------------------


async def test_the_push_and_signing_live_on_the_tls_port(mesh: Mesh, tmp_path: Path) -> None:
    cp = mesh.cp
    tls_port = cp.app[CA_SERVICE].tls.port  # type: ignore[union-attr]
    status, _, index = await get(cp.port, "/api/v1")
    assert status == 200 and index["tlsPort"] == tls_port and index["tlsStarting"] is False
    # The plain port refuses what moved, naming the port.
    async with aiohttp.ClientSession() as s:
        for method, path in (("POST", "/api/v1/ca/sign"), ("GET", "/api/v1/push")):
            async with s.request(method, f"http://127.0.0.1:{cp.port}{path}", json={}) as r:
                body = await r.json()
                assert r.status == 403 and body["error"] == "use_tls_port", body
                assert str(tls_port) in body["message"]
    # Both sidecars hold the push on the TLS port, identified by their certificates.
    for sc in (mesh.a, mesh.b):
        pc = sc.policy_client
        assert pc.url == f"wss://127.0.0.1:{tls_port}/api/v1/push"
        await until(lambda pc=pc: pc.connected and pc.bundles >= 1, 20, "push over TLS")
    # A certificate for `a` cannot ask for `b`'s config; no certificate: no push.
    a_tls = mesh.a.mesh_tls
    assert isinstance(a_tls, MeshTLS) and a_tls.client is not None
    bare = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    bare.check_hostname = False
    bare.load_verify_locations(cadata=a_tls.roots_pem)
    for ctx, service, why in (
        (a_tls.client, "b", "not b in default"),
        (bare, "a", "takes the sidecar's mesh certificate"),
    ):
        hello = {"proto": 1, "type": "hello", "node": {"service": service, "namespace": "default"}}
        async with (
            aiohttp.ClientSession() as s,
            s.ws_connect(
                f"wss://127.0.0.1:{tls_port}/api/v1/push", ssl=ctx, protocols=("tether.push.v1",)
            ) as ws,
        ):
            await ws.send_json(hello)
            msg = await ws.receive(timeout=10)
            got = json.loads(msg.data)
            assert got["type"] == "error" and got["code"] == "permission_denied", got
            assert why in got["message"], got
