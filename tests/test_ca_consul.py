"""Consul's connect CA endpoints on the control plane, called with py-consul's own `connect`
API, their JSON shapes checked against Consul's documented ones (agent/structs/
connect_ca.go, api-docs/agent/connect.mdx, api-docs/connect/ca.mdx); rotation through
the API, blocking roots queries, and the trust bundle reaching subscribers."""

from __future__ import annotations

import asyncio
import datetime as dt
import re
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import consul
import consul.aio
import pytest

from controlplane.ca import certs
from controlplane.ca.provider import TrustBundle
from controlplane.ca.service import CA_SERVICE
from controlplane.ca.spiffe import parse_spiffe_id
from controlplane.ca.tokens import create_service_token
from controlplane.server import ControlPlane
from registry.server import RegistryServer
from tests.test_ca_api import MakeCP, acl_registry, call, http, make_cp, root_client

__all__ = ["acl_registry", "http", "make_cp", "root_client"]  # fixtures shared from there

ROOT_FIELDS = {
    "ID", "Name", "SerialNumber", "SigningKeyID", "ExternalTrustDomain", "NotBefore",
    "NotAfter", "RootCert", "IntermediateCerts", "Active", "PrivateKeyType",
    "PrivateKeyBits", "CreateIndex", "ModifyIndex",
}  # fmt: skip
LEAF_FIELDS = {
    "SerialNumber", "CertPEM", "PrivateKeyPEM", "Service", "ServiceURI", "ValidAfter",
    "ValidBefore", "Namespace", "CreateIndex", "ModifyIndex",
}  # fmt: skip
RFC3339 = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")
COLON_HEX = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2})*$")


@pytest.fixture
async def cp(make_cp: MakeCP, acl_registry: RegistryServer) -> ControlPlane:
    return await make_cp(acl_registry)


@pytest.fixture
async def cp_client(cp: ControlPlane) -> AsyncIterator[Any]:
    """py-consul pointed at the control plane, where the connect CA lives."""
    c = consul.aio.Consul(host="127.0.0.1", port=cp.port, token="root")
    try:
        yield c
    finally:
        await c.close()


def check_roots(body: dict[str, Any]) -> None:
    assert set(body) == {"ActiveRootID", "TrustDomain", "Roots"}
    assert body["TrustDomain"].endswith(".consul")
    actives = [r for r in body["Roots"] if r["Active"]]
    assert len(actives) == 1 and actives[0]["ID"] == body["ActiveRootID"]
    for root in body["Roots"]:
        assert set(root) == ROOT_FIELDS
        cert = certs.load_cert(root["RootCert"])
        assert isinstance(root["SerialNumber"], int) and root["SerialNumber"] == cert.serial_number
        assert COLON_HEX.match(root["ID"]) and COLON_HEX.match(root["SigningKeyID"])
        assert RFC3339.match(root["NotBefore"]) and RFC3339.match(root["NotAfter"])
        assert root["PrivateKeyType"] == "ec" and root["PrivateKeyBits"] == 256
        assert root["IntermediateCerts"] is None or isinstance(root["IntermediateCerts"], list)
        assert isinstance(root["CreateIndex"], int) and root["CreateIndex"] > 0


async def test_roots_have_consuls_shape_on_both_paths(
    cp: ControlPlane, cp_client: Any, http: aiohttp.ClientSession
) -> None:
    agent_roots = await cp_client.agent.connect.ca.roots()
    server_roots = await cp_client.connect.ca.roots()
    check_roots(agent_roots)
    assert agent_roots == server_roots
    async with http.get(f"{cp.url}/v1/connect/ca/roots?pem=true") as resp:
        assert resp.content_type == "application/pem-certificate-chain"
        assert int(resp.headers["X-Consul-Index"]) > 0
        pems = certs.load_certs(await resp.read())
    assert [certs.cert_pem(c) for c in pems] == [agent_roots["Roots"][0]["RootCert"]]


async def test_the_leaf_endpoint_serves_consul_clients_with_service_write(
    cp: ControlPlane, root_client: Any, http: aiohttp.ClientSession
) -> None:
    secret = await create_service_token(root_client, "web")
    async with _client(cp, secret) as c:
        leaf = await c.agent.connect.ca.leaf("web", token=secret)
        again = await c.agent.connect.ca.leaf("web", token=secret)
        with pytest.raises(consul.ACLPermissionDenied):
            await c.agent.connect.ca.leaf("db", token=secret)
    # Not even the management token gets the control plane's own identity here.
    status, text = await call(
        http,
        "GET",
        f"{cp.url}/v1/agent/connect/ca/leaf/tether-controlplane?ns=tether-system",
        headers={"X-Consul-Token": "root"},
    )
    assert status == 403 and "control plane" in text
    assert set(leaf) == LEAF_FIELDS
    assert again == leaf  # reused until half its lifetime, as Consul's agent cache
    cert = certs.load_certs(leaf["CertPEM"])[0]
    assert leaf["SerialNumber"] == certs.serial_hex(cert.serial_number)
    assert leaf["PrivateKeyPEM"].startswith("-----BEGIN EC PRIVATE KEY-----")
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    key = load_pem_private_key(leaf["PrivateKeyPEM"].encode(), None)
    assert key.public_key() == cert.public_key()
    ident = parse_spiffe_id(leaf["ServiceURI"])
    assert (ident.service, ident.namespace, ident.datacenter) == ("web", "default", "dc1")
    assert leaf["Service"] == "web" and leaf["Namespace"] == "default"
    assert RFC3339.match(leaf["ValidAfter"]) and RFC3339.match(leaf["ValidBefore"])


async def test_configuration_needs_operator_write(cp: ControlPlane, root_client: Any) -> None:
    async with _client(cp, "root") as c:
        conf = await c.connect.ca.configuration()
    assert set(conf) == {
        "Provider", "Config", "State", "ForceWithoutCrossSigning", "CreateIndex", "ModifyIndex",
    }  # fmt: skip
    assert conf["Provider"] == "consul" and conf["Config"]["LeafCertTTL"] == "24h"
    assert conf["Config"]["PrivateKeyType"] == "ec"
    secret = await create_service_token(root_client, "web")
    async with _client(cp, secret) as c:
        with pytest.raises(consul.ACLPermissionDenied):
            await c.connect.ca.configuration()


async def test_authorize_without_intentions_follows_the_mesh_default(
    cp: ControlPlane, cp_client: Any, root_client: Any
) -> None:
    """No intention matches: MeshConfig's default action decides (allow when unset), as
    the inbound sidecars do; tests/test_intentions_api.py has intentions deciding."""
    roots = await cp_client.agent.connect.ca.roots()
    uri = f"spiffe://{roots['TrustDomain']}/ns/default/dc/dc1/svc/web"
    got = await cp_client.agent.connect.authorize("db", uri, "01")
    assert got == {
        "Authorized": True,
        "Reason": "Default behavior configured by MeshConfig (allow)",
    }
    mesh = {
        "apiVersion": "tether.dev/v1alpha1",
        "kind": "MeshConfig",
        "metadata": {"name": "mesh"},
        "spec": {"authorization": {"defaultAction": "deny"}},
    }
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{cp.url}/api/v1/apply", json=mesh,
                             headers={"X-Tether-Token": "root"}) as resp:  # fmt: skip
            assert resp.status == 200, await resp.text()
    got = await cp_client.agent.connect.authorize("db", uri, "01")
    assert got == {
        "Authorized": False,
        "Reason": "Default behavior configured by MeshConfig (deny)",
    }
    foreign = await cp_client.agent.connect.authorize(
        "db", "spiffe://other.consul/ns/default/dc/dc1/svc/web", "01"
    )
    assert foreign["Authorized"] is False and "trust domain" in foreign["Reason"]
    with pytest.raises(consul.ConsulException, match="not a valid Connect identifier"):
        await cp_client.agent.connect.authorize("db", "https://web", "01")
    secret = await create_service_token(root_client, "web")
    with pytest.raises(consul.ACLPermissionDenied):
        await cp_client.agent.connect.authorize("db", uri, "01", token=secret)


async def test_authorize_allows_with_acls_off(make_cp: MakeCP, registry: RegistryServer) -> None:
    cp = await make_cp(registry, token=None)
    async with _client(cp, None) as c:
        roots = await c.agent.connect.ca.roots()
        uri = f"spiffe://{roots['TrustDomain']}/ns/default/dc/dc1/svc/web"
        got = await c.agent.connect.authorize("db", uri, "01")
    assert got["Authorized"] is True


async def test_rotation_reaches_blocking_queries_and_bundle_subscribers(
    cp: ControlPlane, cp_client: Any, http: aiohttp.ClientSession
) -> None:
    service = cp.app[CA_SERVICE]
    bundles: list[TrustBundle] = []
    two_roots = asyncio.Event()

    async def on_bundle(bundle: TrustBundle) -> None:
        bundles.append(bundle)
        if len(bundle.root_pems) == 2:
            two_roots.set()

    service.subscribe_bundle(on_bundle)
    await cp_client.agent.connect.ca.leaf("web")  # the old root signs a leaf: it stays
    async with http.get(f"{cp.url}/v1/connect/ca/roots") as resp:
        index = int(resp.headers["X-Consul-Index"])
        before = await resp.json()
    blocked = asyncio.create_task(
        call(http, "GET", f"{cp.url}/v1/agent/connect/ca/roots?index={index}&wait=30s")
    )
    await cp_client.connect.ca.roots()  # a round trip made after the blocking one
    assert not blocked.done()

    url = f"{cp.url}/api/v1/ca/rotate"
    status, got = await call(http, "POST", url)  # anonymous: the registry refuses
    assert status == 403 and got["error"] == "permission_denied"
    status, got = await call(http, "POST", url, headers={"X-Tether-Token": "root"})
    assert status == 200 and got["crossSigned"] is True and len(got["roots"]) == 2

    status, after = await asyncio.wait_for(blocked, 15)
    assert status == 200
    check_roots(after)
    assert after["ActiveRootID"] == got["activeRootId"] != before["ActiveRootID"]
    new = next(r for r in after["Roots"] if r["Active"])
    assert len(new["IntermediateCerts"]) == 1  # the cross-signed root goes with leaves
    await asyncio.wait_for(two_roots.wait(), 15)
    assert {certs.load_cert(p).serial_number for p in bundles[-1].root_pems} == {
        r["SerialNumber"] for r in after["Roots"]
    }


async def test_bad_blocking_parameters_are_400(
    cp: ControlPlane, http: aiohttp.ClientSession
) -> None:
    for query in ("index=x", "index=-1", "index=1&wait=forever"):
        status, text = await call(http, "GET", f"{cp.url}/v1/connect/ca/roots?{query}")
        assert status == 400, (query, text)


class _client:
    def __init__(self, cp: ControlPlane, token: str | None) -> None:
        self.c = consul.aio.Consul(host="127.0.0.1", port=cp.port, token=token)

    async def __aenter__(self) -> Any:
        return self.c

    async def __aexit__(self, *exc: object) -> None:
        await self.c.close()


def test_iso_times_are_utc() -> None:
    from controlplane.ca.state import iso, parse_iso

    t = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC)
    assert parse_iso(iso(t)) == t
