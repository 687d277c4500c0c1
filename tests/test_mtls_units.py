"""Pure parts of mTLS: the mode in force, the schema's mtls fields (decode, encode,
round trip, errors with field paths), and the push's bundle message."""

from __future__ import annotations

import pytest

from wire import push as protocol
from wire.resources import (
    MeshMTLSPolicy,
    NamespaceMTLSPolicy,
    Resource,
    SchemaError,
    ServiceMTLSPolicy,
    effective_mtls_mode,
)

HEAD = {"apiVersion": "tether.dev/v1alpha1"}


def test_the_mode_in_force_service_then_namespace_then_mesh() -> None:
    mesh = MeshMTLSPolicy(
        mode="permissive",
        namespaces={"pay": NamespaceMTLSPolicy(mode="strict"), "web": NamespaceMTLSPolicy()},
    )
    assert effective_mtls_mode(None, None, "default") == "strict"
    assert effective_mtls_mode(mesh, None, "default") == "permissive"
    assert effective_mtls_mode(mesh, None, "web") == "permissive"  # no mode of its own
    assert effective_mtls_mode(mesh, None, "pay") == "strict"
    assert effective_mtls_mode(mesh, ServiceMTLSPolicy("permissive"), "pay") == "permissive"
    assert effective_mtls_mode(None, ServiceMTLSPolicy("permissive"), "x") == "permissive"
    assert effective_mtls_mode(mesh, ServiceMTLSPolicy(None), "pay") == "strict"


def test_mesh_config_mtls_round_trips() -> None:
    doc = {
        **HEAD,
        "kind": "MeshConfig",
        "metadata": {"name": "mesh"},
        "spec": {
            "mtls": {
                "mode": "permissive",
                "namespaces": {"payments": {"mode": "strict", "isolated": True}},
            }
        },
    }
    res = Resource.from_dict(doc)
    spec = res.spec
    assert spec.mtls.namespaces["payments"] == NamespaceMTLSPolicy("strict", True)  # type: ignore[union-attr]
    assert Resource.from_dict(res.to_dict()) == res
    assert res.to_dict()["spec"]["mtls"]["namespaces"]["payments"] == {
        "mode": "strict",
        "isolated": True,
    }


@pytest.mark.parametrize(
    ("spec", "where"),
    [
        ({"mtls": {"mode": "off"}}, "spec.mtls.mode"),
        (
            {"mtls": {"namespaces": {"payments": {"mode": "loose"}}}},
            "spec.mtls.namespaces.payments.mode",
        ),
        (
            {"mtls": {"namespaces": {"payments": {"isolated": "yes"}}}},
            "spec.mtls.namespaces.payments.isolated",
        ),
        ({"mtls": {"namespaces": {"Bad_NS": {}}}}, "spec.mtls.namespaces.Bad_NS"),
        ({"mtls": {"strict": True}}, "spec.mtls.strict"),
    ],
)
def test_bad_mtls_settings_name_the_field(spec: dict[str, object], where: str) -> None:
    from wire.resources import check_resource

    doc = {**HEAD, "kind": "MeshConfig", "metadata": {"name": "mesh"}, "spec": spec}
    try:
        res = Resource.from_dict(doc)
    except SchemaError as exc:
        paths = [p.path for p in exc.problems]
        assert any(where in t for t in paths), paths
        return
    problems = check_resource(res)
    assert any(where in p.path for p in problems), problems


def test_service_defaults_takes_an_mtls_mode() -> None:
    doc = {
        **HEAD,
        "kind": "ServiceDefaults",
        "metadata": {"name": "orders"},
        "spec": {"mtls": {"mode": "permissive"}},
    }
    assert Resource.from_dict(doc).spec.mtls == ServiceMTLSPolicy("permissive")  # type: ignore[union-attr]


def test_the_bundle_message_round_trips_and_is_checked() -> None:
    pem = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
    msg = protocol.Bundle("abc.consul", (pem,), 7)
    assert protocol.decode(protocol.encode(msg)) == msg
    for bad in (
        '{"proto":1,"type":"bundle","trustDomain":"a","roots":[]}',
        '{"proto":1,"type":"bundle","trustDomain":"a","roots":["not pem"]}',
        '{"proto":1,"type":"bundle","trustDomain":"","roots":["-----BEGIN CERTIFICATE-----"]}',
    ):
        with pytest.raises(protocol.PushProtocolError):
            protocol.decode(bad)
