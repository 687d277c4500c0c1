"""Cluster specs: a snapshot's ServiceDefaults and MeshConfig compiled into typed settings."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from controlplane.schema import API_VERSION
from proxy import balance
from proxy.cluster_spec import ClusterSpec, PoolKeys, compile_specs, default_specs
from proxy.policy import compile_table, decode
from proxy.pool import PoolPolicy
from proxy.retry import RetrySpec

BASE = PoolPolicy(connect_timeout=2.0)


def doc(kind: str, name: str, spec: dict[str, Any]) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name}
    if kind != "MeshConfig":
        meta["namespace"] = "default"
    return {"apiVersion": API_VERSION, "kind": kind, "metadata": meta, "spec": spec}


def specs_of(*docs: dict[str, Any], keys: PoolKeys | None = None) -> Any:
    table, mesh = compile_table(decode(docs), version=7)
    return compile_specs(table, mesh, BASE, keys or PoolKeys())


def test_without_policy_every_service_has_the_sidecars_own_settings() -> None:
    specs = default_specs(BASE, PoolKeys())
    spec = specs.get("default", "orders")
    assert spec is specs.default
    assert spec.pool is BASE and spec.connect_timeout == 2.0 and spec.request_timeout == 0.0
    assert spec.load_balancer is None
    # The default retry policy (2 attempts for connect failures, refusals and resets of
    # idempotent requests); no breakers, no outlier detection.
    assert spec.retry == RetrySpec() and spec.retry.attempts == 2
    assert (spec.circuit_breaker, spec.outlier_detection) == (None, None)


def test_service_defaults_win_over_mesh_config_which_wins_over_the_sidecar() -> None:
    specs = specs_of(
        doc(
            "ServiceDefaults",
            "orders",
            {
                "connectTimeout": "300ms",
                "requestTimeout": "1s",
                "loadBalancer": {"policy": "round_robin"},
            },
        ),
        doc("ServiceDefaults", "inventory", {}),
        doc("MeshConfig", "mesh", {"connectTimeout": "4s", "requestTimeout": "9s"}),
    )
    orders = specs.get("default", "orders")
    assert (orders.connect_timeout, orders.request_timeout) == (0.3, 1.0)
    assert orders.load_balancer == balance.LoadBalancerPolicy(policy="round_robin")
    inventory = specs.get("default", "inventory")
    assert (inventory.connect_timeout, inventory.request_timeout) == (4.0, 9.0)
    other = specs.get("default", "payments")
    assert other is specs.default and (other.connect_timeout, other.request_timeout) == (4.0, 9.0)
    assert specs.version == 7
    assert set(specs.load_balancers()) == {("default", "orders"), ("default", "inventory")}


def test_specs_are_frozen_and_equal_pools_share_a_key_across_snapshots() -> None:
    keys = PoolKeys()
    one = specs_of(doc("ServiceDefaults", "orders", {"connectTimeout": "300ms"}), keys=keys)
    two = specs_of(
        doc("ServiceDefaults", "orders", {"connectTimeout": "300ms"}),
        doc("ServiceDefaults", "inventory", {"connectTimeout": "1s"}),
        keys=keys,
    )
    a, b = one.get("default", "orders"), two.get("default", "orders")
    assert a.pool_key == b.pool_key and a.pool == b.pool
    assert two.get("default", "inventory").pool_key != a.pool_key
    assert one.default.pool_key == two.default.pool_key  # the sidecar's own, unchanged
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.request_timeout = 5.0
    assert isinstance(a, ClusterSpec)
