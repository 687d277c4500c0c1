"""One suite for every CA provider (built-in with either key vault, operator-supplied root
or intermediate), each over a real registry's KV through consul.aio."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import os
import stat
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import consul.aio
import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from controlplane.ca import certs
from controlplane.ca.builtin import BuiltinCA
from controlplane.ca.errors import CSRError
from controlplane.ca.provider import StoredCA
from controlplane.ca.spec import CASpec
from controlplane.ca.spiffe import SpiffeId, make_csr, new_key, verify_peer
from controlplane.ca.state import ROOTS_KEY
from controlplane.ca.supplied import OperatorCA
from registry.server import RegistryServer
from tests.ca_material import FakeClock, write_operator_ca

KINDS = ["builtin-encrypted", "builtin-file", "operator-root", "operator-intermediate"]
KEK = base64.b64encode(bytes(range(32))).decode()

MakeCA = Callable[[], Awaitable[StoredCA]]


@pytest.fixture(params=KINDS)
async def make_ca(
    request: pytest.FixtureRequest, registry: RegistryServer, tmp_path: Path
) -> AsyncIterator[tuple[MakeCA, FakeClock, str]]:
    """A factory of replicas of one CA (same configuration, same registry, one clock)."""
    kind: str = request.param
    clock = FakeClock()
    clients: list[Any] = []
    if kind == "builtin-encrypted":
        spec = CASpec(encryption_key=KEK)
    elif kind == "builtin-file":
        spec = CASpec(key_dir=tmp_path / "keys")
    else:
        cert_file, key_file, _ = write_operator_ca(
            tmp_path / "op", intermediate=kind.endswith("intermediate")
        )
        spec = CASpec(cert_file=cert_file, key_file=key_file, trust_domain="mesh.example")

    async def make() -> StoredCA:
        client = consul.aio.Consul(host="127.0.0.1", port=registry.port)
        clients.append(client)
        ca: StoredCA = (
            OperatorCA(client, spec, clock=clock)
            if spec.cert_file
            else BuiltinCA(client, spec, clock=clock)
        )
        await ca.start()
        return ca

    yield make, clock, kind
    for c in clients:
        await c.close()


def identity(td: str, service: str = "orders", ns: str = "default") -> SpiffeId:
    return SpiffeId(td, ns, "dc1", service)


async def issue(ca: StoredCA, service: str = "orders") -> tuple[Any, SpiffeId]:
    td = (await ca.roots()).trust_domain
    ident = identity(td, service)
    key = new_key()
    return await ca.sign(make_csr(key, ident), ident), ident


async def test_one_active_root_and_replicas_agree(make_ca: Any) -> None:
    make, _, _ = make_ca
    first, second = await asyncio.gather(make(), make())  # two replicas starting at once
    a, b = await first.roots(), await second.roots()
    assert [r.id for r in a.roots] == [r.id for r in b.roots]
    assert len(a.roots) == 1 and a.active is not None and a.active.active
    assert a.trust_domain and a.trust_domain == b.trust_domain
    bundle = await first.trust_bundle()
    assert bundle.root_pems == (a.active.root_pem,)
    assert (
        certs.load_cert(a.active.root_pem)
        .extensions.get_extension_for_class(x509.BasicConstraints)
        .value.ca
    )


async def test_a_leaf_is_an_svid_that_verifies_against_the_bundle(make_ca: Any) -> None:
    make, clock, _ = make_ca
    ca = await make()
    issued, ident = await issue(ca)
    cert = issued.cert
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [ident.uri]
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.digital_signature and not ku.key_cert_sign and not ku.crl_sign
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert cert.not_valid_after_utc - clock.now == dt.timedelta(hours=24)
    bundle = await ca.trust_bundle()
    chain = [cert, *certs.load_certs(issued.chain_pem)[1:]]
    for role in ("client", "server"):
        got = verify_peer(
            chain,
            bundle.certificates(),
            trust_domain=bundle.trust_domain,
            now=clock.now,
            role=role,
            expected=ident,
        )
        assert got == ident


async def test_serials_are_unique_across_replicas(make_ca: Any) -> None:
    make, _, _ = make_ca
    a, b = await make(), await make()
    issued = await asyncio.gather(*(issue(ca) for ca in (a, b) * 5))
    serials = [leaf.serial for leaf, _ in issued]
    assert len(set(serials)) == 10 and all(s > 0 for s in serials)
    assert sorted(leaf.cert.serial_number for leaf, _ in issued) == sorted(serials)


async def test_a_csr_for_another_identity_or_domain_is_refused(make_ca: Any) -> None:
    make, _, _ = make_ca
    ca = await make()
    td = (await ca.roots()).trust_domain
    key = new_key()
    with pytest.raises(CSRError, match="asks for"):
        await ca.sign(make_csr(key, identity(td, "payments")), identity(td, "orders"))
    foreign = identity("other.example")
    with pytest.raises(CSRError, match="trust domain"):
        await ca.sign(make_csr(key, foreign), foreign)


async def test_the_leaf_ttl_is_configurable_and_capped_by_the_ca(make_ca: Any) -> None:
    make, clock, _ = make_ca
    ca = await make()
    td = (await ca.roots()).trust_domain
    ident = identity(td)
    leaf = await ca.sign(make_csr(new_key(), ident), ident, ttl=dt.timedelta(minutes=5))
    assert leaf.cert.not_valid_after_utc - clock.now == dt.timedelta(minutes=5)


async def test_the_root_key_is_kept_only_protected(
    make_ca: Any, consul_client: Any, tmp_path: Path
) -> None:
    make, _, kind = make_ca
    ca = await make()
    _, entry = await consul_client.kv.get(ROOTS_KEY)
    stored = entry["Value"].decode()
    assert "PRIVATE KEY" not in stored
    root = (await ca.roots()).active
    assert root is not None
    if kind == "builtin-encrypted":
        assert root.key["kind"] == "aes-256-gcm"
    elif kind == "builtin-file":
        path = tmp_path / "keys" / root.key["file"]
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        assert stat.S_IMODE(os.stat(tmp_path / "keys").st_mode) == 0o700
    else:
        assert root.key == {"kind": "operator"}
