"""The peer check the sidecar runs (`wire.spiffe.verify_peer`), one refusal per
test, over certificates generated here; and the SPIFFE ID grammar."""

from __future__ import annotations

import datetime as dt
import subprocess
import sys

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from controlplane.ca import certs
from controlplane.ca.spiffe import (
    PeerVerificationError,
    SpiffeId,
    SpiffeIdError,
    new_key,
    parse_spiffe_id,
    renew_at,
    verify_peer,
)
from tests.ca_material import T0, LeafFlaws, ca_cert, leaf
from tests.conftest import ROOT

TD = "7f42f496-fbc7-8692-05ed-334aa5340c1e.consul"
ORDERS = SpiffeId(TD, "default", "dc1", "orders")
ROOT_KEY = new_key()
MESH_ROOT = certs.make_root(
    ROOT_KEY, trust_domain=TD, name="Tether CA 1", serial=7, now=T0, ttl=dt.timedelta(days=3650)
)


def check(chain: list[x509.Certificate], **kw: object) -> SpiffeId:
    args: dict[str, object] = {
        "trust_domain": TD,
        "now": T0,
        "role": "client",
        "expected": ORDERS,
    }
    args.update(kw)
    return verify_peer(chain, [MESH_ROOT], **args)  # type: ignore[arg-type]


def refused(chain: list[x509.Certificate], match: str, **kw: object) -> None:
    with pytest.raises(PeerVerificationError, match=match):
        check(chain, **kw)


def test_a_good_leaf_verifies_as_client_and_server() -> None:
    good = leaf(ORDERS, MESH_ROOT, ROOT_KEY)
    assert check([good]) == ORDERS
    assert check([good], role="server") == ORDERS
    assert check([good], expected=None) == ORDERS
    # Any datacenter of the same service is the same identity.
    assert check([good], expected=SpiffeId(TD, "default", "dc2", "orders")) == ORDERS


def test_refuses_a_leaf_of_another_ca() -> None:
    other_key = new_key()
    other = certs.make_root(
        other_key, trust_domain=TD, name="Tether CA 1", serial=7, now=T0, ttl=dt.timedelta(days=9)
    )
    refused([leaf(ORDERS, other, other_key)], "does not lead to a trusted root")


def test_refuses_another_trust_domain() -> None:
    foreign = SpiffeId("other.consul", "default", "dc1", "orders")
    refused([leaf(foreign, MESH_ROOT, ROOT_KEY)], "trust domain 'other.consul'")


def test_refuses_expired_and_not_yet_valid() -> None:
    past = leaf(ORDERS, MESH_ROOT, ROOT_KEY, start=T0 - dt.timedelta(days=2), hours=24)
    refused([past], "expired")
    future = leaf(ORDERS, MESH_ROOT, ROOT_KEY, start=T0 + dt.timedelta(hours=1))
    refused([future], "not valid before")


def test_refuses_a_leaf_with_the_ca_bit() -> None:
    refused([leaf(ORDERS, MESH_ROOT, ROOT_KEY, flaws=LeafFlaws(ca=True))], "CA bit")


def test_refuses_wrong_key_usage() -> None:
    no_sig = LeafFlaws(digital_signature=False)
    refused([leaf(ORDERS, MESH_ROOT, ROOT_KEY, flaws=no_sig)], "digitalSignature")
    signer = LeafFlaws(key_cert_sign=True)
    refused([leaf(ORDERS, MESH_ROOT, ROOT_KEY, flaws=signer)], "signing certificates")
    server_only = LeafFlaws(eku=(ExtendedKeyUsageOID.SERVER_AUTH,))
    refused([leaf(ORDERS, MESH_ROOT, ROOT_KEY, flaws=server_only)], "clientAuth")
    assert check([leaf(ORDERS, MESH_ROOT, ROOT_KEY, flaws=server_only)], role="server")
    refused([leaf(ORDERS, MESH_ROOT, ROOT_KEY, flaws=LeafFlaws(eku=()))], "extended key usage")


def test_refuses_a_missing_malformed_or_doubled_spiffe_id() -> None:
    refused([leaf(ORDERS, MESH_ROOT, ROOT_KEY, flaws=LeafFlaws(with_san=False))], "no SAN")
    refused([leaf(ORDERS, MESH_ROOT, ROOT_KEY, flaws=LeafFlaws(uris=()))], "exactly one URI")
    bad = LeafFlaws(uris=(f"spiffe://{TD}/ns/default/svc/orders",))
    refused([leaf(ORDERS, MESH_ROOT, ROOT_KEY, flaws=bad)], "malformed SPIFFE ID")
    https = LeafFlaws(uris=("https://orders.example/",))
    refused([leaf(ORDERS, MESH_ROOT, ROOT_KEY, flaws=https)], "malformed SPIFFE ID")
    two = LeafFlaws(uris=(ORDERS.uri, SpiffeId(TD, "default", "dc1", "payments").uri))
    refused([leaf(ORDERS, MESH_ROOT, ROOT_KEY, flaws=two)], "exactly one URI")


def test_refuses_an_identity_other_than_the_expected_destination() -> None:
    payments = SpiffeId(TD, "default", "dc1", "payments")
    refused([leaf(payments, MESH_ROOT, ROOT_KEY)], "expected")
    other_ns = SpiffeId(TD, "shop", "dc1", "orders")
    refused([leaf(other_ns, MESH_ROOT, ROOT_KEY)], "expected")


def test_refuses_chains_that_do_not_hold() -> None:
    refused([], "no certificate")
    with pytest.raises(PeerVerificationError, match="no trust bundle"):
        verify_peer([leaf(ORDERS, MESH_ROOT, ROOT_KEY)], [], trust_domain=TD, now=T0, role="client")
    # A leaf "issued" by another leaf: the issuer is not a CA.
    lk = new_key()
    not_ca = leaf(ORDERS, MESH_ROOT, ROOT_KEY)
    child = leaf(ORDERS, not_ca, lk)
    refused([child, not_ca], "does not lead to a trusted root")
    # A forged signature: right names, wrong key.
    forged = leaf(ORDERS, MESH_ROOT, new_key())
    refused([forged], "does not lead to a trusted root")


def test_an_operator_intermediate_chain_verifies_only_with_the_intermediate() -> None:
    op_root_key, inter_key = new_key(), new_key()
    op_root = ca_cert(op_root_key, "Op Root")
    inter = ca_cert(inter_key, "Op Intermediate", issuer=(op_root, op_root_key))
    good = leaf(ORDERS, inter, inter_key)
    assert verify_peer([good, inter], [op_root], trust_domain=TD, now=T0, role="server")
    with pytest.raises(PeerVerificationError, match="trusted root"):
        verify_peer([good], [op_root], trust_domain=TD, now=T0, role="server")


@pytest.mark.parametrize(
    "uri",
    [
        "spiffe://td.consul/ns/default/dc/dc1/svc/orders",
        "spiffe://a-b_c.example/ns/shop/dc/eu-west-1/svc/orders.v2",
    ],
)
def test_spiffe_ids_round_trip(uri: str) -> None:
    assert parse_spiffe_id(uri).uri == uri


@pytest.mark.parametrize(
    "uri",
    [
        "",
        "http://td/ns/a/dc/b/svc/c",
        "SPIFFE://td/ns/a/dc/b/svc/c",
        "spiffe://TD/ns/a/dc/b/svc/c",
        "spiffe://td:8080/ns/a/dc/b/svc/c",
        "spiffe://user@td/ns/a/dc/b/svc/c",
        "spiffe://td/ns/a/dc/b/svc/c?x=1",
        "spiffe://td/ns/a/dc/b/svc/c#f",
        "spiffe://td/ns/a/dc/b/svc/c/",
        "spiffe://td/ns/a/dc/b/svc/",
        "spiffe://td/ns/../dc/b/svc/c",
        "spiffe://td/ns/a/dc/b/agent/c",
        "spiffe://td",
        "spiffe://td/ns/a%2Fb/dc/b/svc/c",
        "spiffe://td/ns/a/dc/b/svc/" + "c" * 2100,
    ],
)
def test_malformed_spiffe_ids_are_refused(uri: str) -> None:
    with pytest.raises(SpiffeIdError):
        parse_spiffe_id(uri)


def test_renewal_is_at_about_half_the_lifetime() -> None:
    cert = leaf(ORDERS, MESH_ROOT, ROOT_KEY, start=T0, hours=24)
    assert renew_at(cert, 0.0) == T0 + dt.timedelta(hours=12)
    assert renew_at(cert, 0.05) == T0 + dt.timedelta(hours=13, minutes=12)


def test_the_sidecar_can_import_the_check_alone() -> None:
    """`wire.spiffe`: nothing of the control plane, the proxy, aiohttp or py-consul."""
    code = (
        "import sys, wire.spiffe as s; "
        "bad = [m for m in sys.modules if m.split('.')[0] in "
        "('aiohttp', 'consul', 'yaml', 'controlplane', 'proxy')]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stdout + out.stderr
