"""Root rotation: cross-signed so old and new leaves verify during the overlap, the old root
retired after its last leaf expired; switching to an operator CA; keys that must not open.
Over a real registry's KV, with a settable clock (no waiting for expiry)."""

from __future__ import annotations

import base64
import datetime as dt
import os
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from controlplane.ca import certs
from controlplane.ca.builtin import BuiltinCA
from controlplane.ca.errors import KeyProtectionError
from controlplane.ca.keys import EncryptedKeyVault
from controlplane.ca.provider import IssuedLeaf, StoredCA
from controlplane.ca.spec import CASpec
from controlplane.ca.spiffe import (
    PeerVerificationError,
    SpiffeId,
    make_csr,
    new_key,
    verify_peer,
)
from controlplane.ca.state import RootsChangedError
from controlplane.ca.supplied import OperatorCA
from tests.ca_material import FakeClock, write_operator_ca

KEK = bytes(range(32))
SPEC = CASpec(encryption_key=base64.b64encode(KEK).decode(), trust_domain="mesh.test")
ORDERS = SpiffeId("mesh.test", "default", "dc1", "orders")


@pytest.fixture
def client(consul_client: Any) -> Any:
    return consul_client


async def issue(ca: StoredCA) -> IssuedLeaf:
    return await ca.sign(make_csr(new_key(), ORDERS), ORDERS)


def chain_of(leaf: IssuedLeaf) -> list[x509.Certificate]:
    return [leaf.cert, *(certs.load_cert(p) for p in leaf.intermediate_pems)]


def verifies(leaf: IssuedLeaf, roots: list[x509.Certificate], now: dt.datetime) -> bool:
    try:
        verify_peer(
            chain_of(leaf), roots, trust_domain="mesh.test", now=now, role="client", expected=ORDERS
        )
    except PeerVerificationError:
        return False
    return True


async def test_old_and_new_leaves_verify_across_the_overlap(client: Any) -> None:
    clock = FakeClock()
    ca = BuiltinCA(client, SPEC, clock=clock)
    await ca.start()
    old_root = certs.load_cert((await ca.roots()).roots[0].root_pem)
    old_leaf = await issue(ca)  # valid until T0 + 24h

    clock.advance(hours=1)
    record = await ca.rotate()
    assert len(record.intermediate_pems) == 1  # the cross-signed new root
    cross = certs.load_cert(record.intermediate_pems[0])
    assert cross.issuer == old_root.subject
    new_root = certs.load_cert(record.root_pem)
    assert cross.public_key() == new_root.public_key()
    new_leaf = await issue(ca)  # valid until T0 + 25h
    assert new_leaf.root_id == record.id

    state = await ca.roots()
    assert [r.active for r in state.roots] == [False, True]
    assert state.active is not None and state.active.id == record.id
    bundle = (await ca.trust_bundle()).certificates()
    assert len(bundle) == 2
    now = clock.now
    # Peers with the new bundle accept both leaves.
    assert verifies(old_leaf, bundle, now) and verifies(new_leaf, bundle, now)
    # A peer still on the old bundle accepts the new leaf through the cross-signed root.
    assert verifies(new_leaf, [old_root], now)
    # The old leaf needs its own root: that is why the old root stays for the overlap.
    assert not verifies(old_leaf, [new_root], now)

    # The old root's last leaf expires: it leaves the bundle, then the stored roots.
    clock.now = old_leaf.cert.not_valid_after_utc + dt.timedelta(seconds=1)
    assert [r.id for r in (await ca.roots()).roots] == [record.id]
    assert await ca.maintain() == [state.roots[0].id]
    stored = await ca.state.roots()
    assert [r.id for r in stored.roots] == [record.id]
    assert stored.roots[0].intermediate_pems == ()  # the cross-signed cert left with it
    assert verifies(new_leaf, [new_root], clock.now)
    assert await ca.maintain() == []


async def test_a_root_rotated_out_before_signing_anything_leaves_at_once(client: Any) -> None:
    clock = FakeClock()
    ca = BuiltinCA(client, SPEC, clock=clock)
    await ca.start()
    first = (await ca.roots()).roots[0].id
    await ca.rotate()
    assert first not in [r.id for r in (await ca.roots()).roots]
    assert await ca.maintain() == [first]


async def test_a_serial_claimed_on_stale_roots_is_refused(client: Any) -> None:
    ca = BuiltinCA(client, SPEC, clock=FakeClock())
    await ca.start()
    stale = await ca.state.roots()
    await ca.rotate()
    assert stale.active is not None
    with pytest.raises(RootsChangedError):
        await ca.state.claim_serial(stale, stale.active.id, FakeClock().now)
    # sign re-reads and uses the new active root.
    leaf = await issue(ca)
    assert leaf.root_id == (await ca.state.roots()).active.id  # type: ignore[union-attr]


async def test_switching_to_an_operator_ca_is_cross_signed(client: Any, tmp_path: Path) -> None:
    clock = FakeClock()
    builtin = BuiltinCA(client, SPEC, clock=clock)
    await builtin.start()
    old_root = certs.load_cert((await builtin.roots()).roots[0].root_pem)
    old_leaf = await issue(builtin)

    cert_file, key_file, op_root = write_operator_ca(tmp_path, intermediate=True)
    spec = CASpec(cert_file=cert_file, key_file=key_file, trust_domain="mesh.test")
    operator = OperatorCA(client, spec, vault=EncryptedKeyVault(KEK), clock=clock)
    await operator.start()
    state = await operator.roots()
    assert state.active is not None and state.active.provider == "operator"
    assert len(state.roots) == 2
    op_leaf = await issue(operator)
    bundle = (await operator.trust_bundle()).certificates()
    assert verifies(op_leaf, bundle, clock.now) and verifies(old_leaf, bundle, clock.now)
    assert verifies(op_leaf, [old_root], clock.now)  # cross-signed by the built-in root
    assert verifies(op_leaf, [op_root], clock.now)


async def test_a_key_sealed_with_another_encryption_key_does_not_open(client: Any) -> None:
    await BuiltinCA(client, SPEC).start()
    other = CASpec(encryption_key=base64.b64encode(bytes(32)).decode())
    with pytest.raises(KeyProtectionError, match="another encryption key"):
        await BuiltinCA(client, other).start()


async def test_a_key_file_others_may_read_is_refused(client: Any, tmp_path: Path) -> None:
    spec = CASpec(key_dir=tmp_path / "keys")
    ca = BuiltinCA(client, spec)
    await ca.start()
    root = (await ca.roots()).roots[0]
    os.chmod(tmp_path / "keys" / root.key["file"], 0o644)
    with pytest.raises(KeyProtectionError, match="must be 0600"):
        await BuiltinCA(client, spec).start()
