"""The CA through the control plane's HTTP API: real CSRs over real sockets (aiohttp client
→ control plane → registry with ACLs on), bootstrap credentials, Kubernetes TokenReview
against a fake API server, and a capturing proxy that proves the key never travels."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import consul.aio
import pytest
from aiohttp import web
from cryptography.hazmat.primitives import serialization

from controlplane.ca import certs
from controlplane.ca.service import CA_SERVICE
from controlplane.ca.spiffe import SpiffeId, make_csr, new_key, verify_peer
from controlplane.ca.state import SERIAL_KEY
from controlplane.ca.tokens import create_service_token
from controlplane.server import ControlPlane, ControlPlaneSpec, RegistryAddress
from registry.server import RegistryServer
from tests.conftest import serve_app, serving_registry

KEK = base64.b64encode(bytes(range(1, 33))).decode()
MakeCP = Callable[..., Awaitable[ControlPlane]]


@pytest.fixture
async def acl_registry(tmp_path: Path) -> AsyncIterator[RegistryServer]:
    async with serving_registry(tmp_path / "acl", management_token="root") as server:
        yield server


@pytest.fixture
async def make_cp(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[MakeCP]:
    made: list[ControlPlane] = []

    async def make(
        registry: RegistryServer, token: str | None = "root", **env: str
    ) -> ControlPlane:
        monkeypatch.setenv("TETHER_CA_ENCRYPTION_KEY", KEK)
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        reg = RegistryAddress("127.0.0.1", registry.port, "http", token)
        cp = ControlPlane(ControlPlaneSpec(port=0, registry=reg, watch_wait="5s"))
        await cp.start()
        made.append(cp)
        await asyncio.wait_for(cp.app[CA_SERVICE].ready.wait(), 15)
        return cp

    yield make
    for cp in made:
        await cp.aclose()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


@pytest.fixture
async def root_client(acl_registry: RegistryServer) -> AsyncIterator[Any]:
    c = consul.aio.Consul(host="127.0.0.1", port=acl_registry.port, token="root")
    try:
        yield c
    finally:
        await c.close()


async def call(http: aiohttp.ClientSession, method: str, url: str, **kw: Any) -> tuple[int, Any]:
    async with http.request(method, url, **kw) as resp:
        text = await resp.text()
        try:
            return resp.status, json.loads(text)
        except ValueError:
            return resp.status, text


async def trust_domain(http: aiohttp.ClientSession, cp: ControlPlane) -> str:
    status, body = await call(http, "GET", f"{cp.url}/api/v1/ca/bundle")
    assert status == 200, body
    return str(body["trustDomain"])


def csr_body(ident: SpiffeId, **extra: Any) -> tuple[Any, dict[str, Any]]:
    key = new_key()
    pem = make_csr(key, ident).public_bytes(serialization.Encoding.PEM).decode()
    return key, {"csr": pem, **extra}


async def serial_next(client: Any) -> int:
    _, entry = await client.kv.get(SERIAL_KEY)
    return int(json.loads(entry["Value"])["next"]) if entry else 1


async def test_a_service_token_gets_its_identity_over_real_sockets(
    make_cp: MakeCP, acl_registry: RegistryServer, root_client: Any, http: aiohttp.ClientSession
) -> None:
    cp = await make_cp(acl_registry)
    td = await trust_domain(http, cp)
    secret = await create_service_token(root_client, "orders")
    ident = SpiffeId(td, "default", "dc1", "orders")
    key, body = csr_body(ident)
    status, got = await call(
        http, "POST", f"{cp.url}/api/v1/ca/sign", json=body, headers={"X-Tether-Token": secret}
    )
    assert status == 200, got
    assert got["spiffeId"] == ident.uri
    leaf = certs.load_cert(got["certificatePem"])
    assert leaf.public_key() == key.public_key()
    roots = [certs.load_cert(p) for p in got["trustBundle"]]
    chain = [leaf, *(certs.load_cert(p) for p in got["intermediatePems"])]
    now = dt.datetime.now(dt.UTC)
    assert verify_peer(chain, roots, trust_domain=td, now=now, role="server", expected=ident)
    lifetime = leaf.not_valid_after_utc - leaf.not_valid_before_utc
    assert lifetime == dt.timedelta(hours=24, minutes=1)  # 24 h, backdated a minute


async def test_a_token_for_one_service_gets_403_for_another_and_nothing_is_issued(
    make_cp: MakeCP,
    acl_registry: RegistryServer,
    root_client: Any,
    http: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    cp = await make_cp(acl_registry)
    td = await trust_domain(http, cp)
    secret = await create_service_token(root_client, "orders")
    before = await serial_next(root_client)
    caplog.set_level(logging.WARNING, "tether.controlplane.ca")
    _, body = csr_body(SpiffeId(td, "default", "dc1", "payments"))
    url = f"{cp.url}/api/v1/ca/sign"
    status, got = await call(http, "POST", url, json=body, headers={"X-Tether-Token": secret})
    assert status == 403 and got["error"] == "permission_denied"
    assert "names orders, not payments" in got["message"]
    assert await serial_next(root_client) == before
    assert any("refused" in r.message and "payments" in r.message for r in caplog.records)
    # No token (anonymous), an unknown one, the reserved namespace: all refused.
    for headers in ({}, {"X-Tether-Token": "not-a-token"}):
        status, got = await call(http, "POST", url, json=body, headers=headers)
        assert status == 403, got
    _, cp_body = csr_body(SpiffeId(td, "tether-system", "dc1", "orders"))
    status, got = await call(http, "POST", url, json=cp_body, headers={"X-Tether-Token": "root"})
    assert status == 403 and "control plane" in got["message"]
    assert await serial_next(root_client) == before


async def test_a_token_is_bound_to_its_namespace(
    make_cp: MakeCP, acl_registry: RegistryServer, root_client: Any, http: aiohttp.ClientSession
) -> None:
    cp = await make_cp(acl_registry)
    td = await trust_domain(http, cp)
    secret = await create_service_token(root_client, "orders", "shop")
    url, headers = f"{cp.url}/api/v1/ca/sign", {"Authorization": f"Bearer {secret}"}
    _, body = csr_body(SpiffeId(td, "default", "dc1", "orders"))
    status, got = await call(http, "POST", url, json=body, headers=headers)
    assert status == 403 and "namespace shop" in got["message"]
    _, body = csr_body(SpiffeId(td, "shop", "dc1", "orders"))
    status, got = await call(http, "POST", url, json=body, headers=headers)
    assert status == 200 and got["spiffeId"].endswith("/ns/shop/dc/dc1/svc/orders")


async def test_with_acls_off_the_named_service_is_signed(
    make_cp: MakeCP, registry: RegistryServer, http: aiohttp.ClientSession
) -> None:
    cp = await make_cp(registry, token=None)
    td = await trust_domain(http, cp)
    _, body = csr_body(SpiffeId(td, "default", "dc1", "anything"))
    status, got = await call(http, "POST", f"{cp.url}/api/v1/ca/sign", json=body)
    assert status == 200 and got["spiffeId"].endswith("/svc/anything")


async def test_bad_requests_are_refused_clearly(
    make_cp: MakeCP, registry: RegistryServer, http: aiohttp.ClientSession
) -> None:
    cp = await make_cp(registry, token=None)
    td = await trust_domain(http, cp)
    url = f"{cp.url}/api/v1/ca/sign"
    status, got = await call(http, "POST", url, data=b"{nope")
    assert status == 400 and "not JSON" in got["message"]
    status, got = await call(http, "POST", url, json={"csr": "-----BEGIN CERTIFICATE REQUEST-----"})
    assert status == 400 and got["error"] == "bad_csr"
    status, got = await call(http, "POST", url, json={"csr": 5})
    assert status == 400
    csr = make_csr(new_key(), SpiffeId(td, "default", "dc1", "a"))
    status, got = await call(http, "POST", url, data=b"x" * (70 * 1024))
    assert status == 413
    # A CSR whose self-signature does not hold (its body altered after signing).
    pem = csr.public_bytes(serialization.Encoding.PEM)
    der = bytearray(csr.public_bytes(serialization.Encoding.DER))
    der[-5] ^= 0xFF
    broken = (
        b"-----BEGIN CERTIFICATE REQUEST-----\n"
        + base64.encodebytes(bytes(der))
        + b"-----END CERTIFICATE REQUEST-----\n"
    )
    assert broken != pem
    status, got = await call(http, "POST", url, json={"csr": broken.decode()})
    assert status == 400 and got["error"] == "bad_csr" and "signature" in got["message"]


async def test_kubernetes_service_account_tokens_via_token_review(
    make_cp: MakeCP, acl_registry: RegistryServer, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    reviews: list[dict[str, Any]] = []

    async def tokenreviews(request: web.Request) -> web.Response:
        if request.headers.get("Authorization") != "Bearer cp-sa-token":
            return web.json_response({"kind": "Status", "code": 401}, status=401)
        body = await request.json()
        reviews.append(body)
        token = body["spec"]["token"]
        status: dict[str, Any] = {"authenticated": False, "error": "invalid bearer token"}
        if token == "sa-orders":
            status = {
                "authenticated": True,
                "user": {"username": "system:serviceaccount:shop:orders", "uid": "1"},
                "audiences": body["spec"].get("audiences", []),
            }
        out = {**body, "status": status}
        return web.json_response(out, status=201)

    app = web.Application()
    app.router.add_post("/apis/authentication.k8s.io/v1/tokenreviews", tokenreviews)
    runner, port = await serve_app(app)
    token_file = tmp_path / "token"
    token_file.write_text("cp-sa-token\n")
    try:
        cp = await make_cp(
            acl_registry,
            TETHER_K8S_API_URL=f"http://127.0.0.1:{port}",
            TETHER_K8S_TOKEN_FILE=str(token_file),
            TETHER_K8S_AUDIENCES="tether",
        )
        td = await trust_domain(http, cp)
        url = f"{cp.url}/api/v1/ca/sign"
        _, body = csr_body(SpiffeId(td, "shop", "dc1", "orders"), kubernetesToken="sa-orders")
        status, got = await call(http, "POST", url, json=body)
        assert status == 200 and got["spiffeId"].endswith("/ns/shop/dc/dc1/svc/orders")
        assert reviews[-1]["kind"] == "TokenReview"
        assert reviews[-1]["apiVersion"] == "authentication.k8s.io/v1"
        assert reviews[-1]["spec"]["audiences"] == ["tether"]
        _, body = csr_body(SpiffeId(td, "shop", "dc1", "payments"), kubernetesToken="sa-orders")
        status, got = await call(http, "POST", url, json=body)
        assert status == 403 and "service account shop/orders" in got["message"]
        _, body = csr_body(SpiffeId(td, "shop", "dc1", "orders"), kubernetesToken="forged")
        status, got = await call(http, "POST", url, json=body)
        assert status == 403 and "invalid bearer token" in got["message"]
    finally:
        await runner.cleanup()


class CapturingProxy:
    """A TCP relay on loopback that keeps every byte the client sent."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.sent = bytearray()
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_r, up_w = await asyncio.open_connection("127.0.0.1", self.upstream_port)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter, keep: bool) -> None:
            try:
                while data := await src.read(65536):
                    if keep:
                        self.sent += data
                    dst.write(data)
                    await dst.drain()
            finally:
                dst.close()

        await asyncio.gather(pipe(reader, up_w, True), pipe(up_r, writer, False))

    async def aclose(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


async def test_the_private_key_never_travels_to_the_ca(
    make_cp: MakeCP, acl_registry: RegistryServer, root_client: Any, http: aiohttp.ClientSession
) -> None:
    cp = await make_cp(acl_registry)
    td = await trust_domain(http, cp)
    secret = await create_service_token(root_client, "orders")
    proxy = CapturingProxy(cp.port)
    await proxy.start()
    try:
        key, body = csr_body(SpiffeId(td, "default", "dc1", "orders"))
        status, got = await call(
            http,
            "POST",
            f"http://127.0.0.1:{proxy.port}/api/v1/ca/sign",
            json=body,
            headers={"X-Tether-Token": secret},
        )
    finally:
        await proxy.aclose()
    assert status == 200, got
    sent = bytes(proxy.sent)
    assert b"BEGIN CERTIFICATE REQUEST" in sent  # the capture did see the request
    scalar = key.private_numbers().private_value.to_bytes(32, "big")
    der = key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    for secret_form in (
        scalar,
        scalar.hex().encode(),
        base64.b64encode(scalar),
        der,
        base64.b64encode(der)[:40],
        b"PRIVATE KEY",
    ):
        assert secret_form not in sent
    assert certs.load_cert(got["certificatePem"]).public_key() == key.public_key()


async def test_the_ca_is_off_without_key_protection(
    registry: RegistryServer, http: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("TETHER_CA_ENCRYPTION_KEY", "TETHER_CA_KEY_DIR", "TETHER_CA_CERT_FILE"):
        monkeypatch.delenv(name, raising=False)
    reg = RegistryAddress("127.0.0.1", registry.port, "http", None)
    cp = ControlPlane(ControlPlaneSpec(port=0, registry=reg))
    await cp.start()
    try:
        status, got = await call(http, "GET", f"{cp.url}/api/v1/ca/bundle")
        assert status == 503 and got["error"] == "ca_not_configured"
        assert "TETHER_CA_ENCRYPTION_KEY" in got["message"]
        status, text = await call(http, "GET", f"{cp.url}/v1/agent/connect/ca/roots")
        assert status == 503 and "mesh CA is off" in text
        status, got = await call(http, "GET", f"{cp.url}/api/v1/health")
        assert status == 200  # the rest of the control plane is unaffected
    finally:
        await cp.aclose()


async def test_two_replicas_starting_at_once_share_one_root(
    make_cp: MakeCP, acl_registry: RegistryServer, http: aiohttp.ClientSession
) -> None:
    a, b = await asyncio.gather(make_cp(acl_registry), make_cp(acl_registry))
    _, ba = await call(http, "GET", f"{a.url}/api/v1/ca/bundle")
    _, bb = await call(http, "GET", f"{b.url}/api/v1/ca/bundle")
    assert ba["roots"] == bb["roots"] and len(ba["roots"]) == 1


async def test_a_replica_with_another_encryption_key_says_why_it_cannot_sign(
    make_cp: MakeCP,
    registry: RegistryServer,
    http: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    await make_cp(registry, token=None)  # stores a root sealed with KEK
    monkeypatch.setenv("TETHER_CA_ENCRYPTION_KEY", base64.b64encode(bytes(32)).decode())
    reg = RegistryAddress("127.0.0.1", registry.port, "http", None)
    other = ControlPlane(ControlPlaneSpec(port=0, registry=reg))
    await other.start()
    try:
        service = other.app[CA_SERVICE]
        assert service._task is not None
        await asyncio.wait_for(service._task, 15)  # gives up: retrying cannot help
        status, got = await call(http, "GET", f"{other.url}/api/v1/ca/bundle")
        assert status == 500 and got["error"] == "ca_key"
        assert "another encryption key" in got["message"]
        status, _ = await call(http, "GET", f"{other.url}/api/v1/health")
        assert status == 200
    finally:
        await other.aclose()
