"""The sidecar's side of issuance (proxy/identity.py) against a real control plane and a
registry with ACLs on: its bootstrap token gets only its own service's identity, and
the private key it makes never appears in what it sends (a capturing relay in between).
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import consul.aio
import pytest
from cryptography.hazmat.primitives import serialization

from controlplane.ca.service import CA_SERVICE
from controlplane.ca.tokens import create_service_token
from controlplane.server import ControlPlane, ControlPlaneSpec, RegistryAddress
from proxy.errors import SidecarStartError
from proxy.identity import IdentityError, SidecarIdentity, http_base
from proxy.sidecar import Sidecar, SidecarSpec
from registry.server import RegistryServer
from tests.conftest import serving_registry
from tests.test_ca_api import KEK, CapturingProxy

MakeCP = Callable[[RegistryServer], Awaitable[ControlPlane]]


@pytest.fixture
async def acl_registry(tmp_path: Path) -> AsyncIterator[RegistryServer]:
    async with serving_registry(tmp_path / "acl", management_token="root") as server:
        yield server


@pytest.fixture
async def make_cp(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[MakeCP]:
    made: list[ControlPlane] = []

    async def make(registry: RegistryServer) -> ControlPlane:
        monkeypatch.setenv("TETHER_CA_ENCRYPTION_KEY", KEK)
        reg = RegistryAddress("127.0.0.1", registry.port, "http", "root")
        cp = ControlPlane(ControlPlaneSpec(port=0, registry=reg, watch_wait="5s"))
        await cp.start()
        made.append(cp)
        await asyncio.wait_for(cp.app[CA_SERVICE].ready.wait(), 15)
        return cp

    yield make
    for cp in made:
        await cp.aclose()


@pytest.fixture
async def root_client(acl_registry: RegistryServer) -> AsyncIterator[Any]:
    c = consul.aio.Consul(host="127.0.0.1", port=acl_registry.port, token="root")
    try:
        yield c
    finally:
        await c.close()


async def test_a_sidecar_gets_its_own_identity_and_its_key_stays_home(
    make_cp: MakeCP, acl_registry: RegistryServer, root_client: Any
) -> None:
    cp = await make_cp(acl_registry)
    secret = await create_service_token(root_client, "orders")
    relay = CapturingProxy(cp.port)
    await relay.start()
    try:
        identity = SidecarIdentity(
            f"http://127.0.0.1:{relay.port}", "orders", "default", token=secret
        )
        tls = await identity.bootstrap()
        assert tls is not None and tls.leaf is not None
        first = tls.leaf.serial_number
        await identity.renew()  # a renewal is a new key and a new CSR, through the relay too
        assert tls.leaf.serial_number != first
    finally:
        await relay.aclose()
    assert tls.identity.service == "orders" and tls.identity.namespace == "default"
    sent = bytes(relay.sent)
    assert sent.count(b"POST /api/v1/ca/sign") == 2  # the relay saw both requests
    key = tls._key
    assert key is not None and tls.leaf.public_key() == key.public_key()
    scalar = key.private_numbers().private_value.to_bytes(32, "big")
    der = key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    for form in (scalar, scalar.hex().encode(), base64.b64encode(scalar), der, b"PRIVATE KEY"):
        assert form not in sent


async def test_a_token_for_one_service_cannot_get_another_identity(
    make_cp: MakeCP, acl_registry: RegistryServer, root_client: Any
) -> None:
    cp = await make_cp(acl_registry)
    secret = await create_service_token(root_client, "orders")
    identity = SidecarIdentity(cp.url, "payments", "default", token=secret)
    with pytest.raises(IdentityError) as err:
        await identity.bootstrap()
    assert err.value.status == 403 and err.value.code == "permission_denied"
    assert identity.tls is None
    # The sidecar itself stops with the reason instead of serving without an identity.
    sidecar = Sidecar(
        SidecarSpec(
            service="payments",
            app_port=9,
            outbound_port=0,
            inbound_port=0,
            admin_port=0,
            registry_port=acl_registry.port,
            registry_token=secret,
            controlplane=cp.url,
        )
    )
    try:
        with pytest.raises(SidecarStartError, match="refused this sidecar's identity"):
            await sidecar.start()
        assert sidecar.inbound is None and sidecar.mesh_tls is None
    finally:
        await sidecar.aclose()


def test_the_control_plane_address_forms() -> None:
    assert http_base("http://cp:15010") == "http://cp:15010"
    assert http_base("ws://cp:15010/api/v1/push") == "http://cp:15010"
    assert http_base("cp:15010") == "http://cp:15010"
    assert http_base("https://cp:15012/") == "https://cp:15012"
