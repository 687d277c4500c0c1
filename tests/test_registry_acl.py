"""ACL policies and tokens: the rule language, token scoping through `consul.aio`, kill -9."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import consul
import consul.aio
import consul.callback
import pytest

from registry.acl_rules import RuleError, RuleSet, parse_rules
from registry.server import RegistryServer
from tests.conftest import MANAGEMENT_TOKEN, RegistryProcess

MGMT = MANAGEMENT_TOKEN

APP_RULES = {
    "key_prefix": {"app/": {"policy": "write"}, "": {"policy": "read"}},
    "key": {"app/secret": {"policy": "deny"}},
    "service": {"web": {"policy": "write"}},
    "service_prefix": {"": {"policy": "read"}},
    "node_prefix": {"": {"policy": "read"}},
}


# -- the rule language (pure) ----------------------------------------------------------


def test_longest_prefix_wins_and_exact_beats_prefix() -> None:
    rs = parse_rules(
        """
        # HCL, as Consul's docs write it
        key_prefix "" { policy = "read" }
        key_prefix "app/" { policy = "write" }
        key_prefix "app/locked/" { policy = "deny" }
        key "app/locked/open" { policy = "write" }
        service "web" { policy = "write" }
        operator = "read"
        """
    )
    assert rs.decide("key", "other", "read") is True
    assert rs.decide("key", "other", "write") is False
    assert rs.decide("key", "app/x", "write") is True
    assert rs.decide("key", "app/locked/x", "read") is False
    assert rs.decide("key", "app/locked/open", "write") is True
    assert rs.decide("service", "web", "write") is True
    assert rs.decide("service", "web2", "read") is None  # no rule: the default decides
    assert rs.decide("operator", "", "read") is True
    assert rs.decide("operator", "", "write") is False
    # Recursive delete needs write on everything under the prefix.
    assert rs.decide_write_prefix("key", "app/") is False
    assert rs.decide_write_prefix("key", "app/x/") is True
    assert rs.decide_write_prefix("key", "") is False


def test_json_forms_and_merge_precedence() -> None:
    listy = parse_rules('{"key_prefix": [{"a/": [{"policy": "list"}]}]}')
    assert listy.decide("key", "a/b", "list") is True
    assert listy.decide("key", "a/b", "read") is True
    assert listy.decide("key", "a/b", "write") is False
    # Same segment in two policies: deny beats write beats read.
    merged = RuleSet.merge(
        [
            parse_rules('{"key_prefix": {"x/": {"policy": "write"}}}'),
            parse_rules('{"key_prefix": {"x/": {"policy": "deny"}}}'),
            parse_rules('{"key_prefix": {"y/": {"policy": "read"}}}'),
            parse_rules('{"key_prefix": {"y/": {"policy": "write"}}}'),
        ]
    )
    assert merged.decide("key", "x/1", "read") is False
    assert merged.decide("key", "y/1", "write") is True
    # py-consul json.dumps the rules it is given: a JSON string of HCL parses too.
    assert parse_rules('"service \\"db\\" { policy = \\"read\\" }"').decide("service", "db", "read")


@pytest.mark.parametrize(
    "bad",
    [
        '{"kee_prefix": {"": {"policy": "read"}}}',
        '{"key_prefix": {"": {"policy": "root"}}}',
        '{"service_prefix": {"": {"policy": "list"}}}',
        'key_prefix "" { policy = "read" ',
        "key_prefix { = }",
        '{"key_prefix": ',
        'key_prefix "\\q" { policy = "read" }',
        '{"key_prefix": {"": "read"}}',
        "[1, 2]",
    ],
)
def test_bad_rules_are_rejected(bad: str) -> None:
    with pytest.raises(RuleError):
        parse_rules(bad)


# -- through the HTTP API --------------------------------------------------------------


async def _scoped_token(registry_admin: Any) -> dict[str, Any]:
    pol = await registry_admin.acl.policy.create("app-writer", rules=APP_RULES, description="app")
    assert pol["Name"] == "app-writer" and pol["ID"]
    tok: dict[str, Any] = await registry_admin.acl.token.create(
        policies_name=["app-writer"], description="sidecar"
    )
    assert tok["Policies"] == [{"ID": pol["ID"], "Name": "app-writer"}]
    return tok


async def test_token_scoping(secured_registry: RegistryServer, registry_admin: Any) -> None:
    tok = await _scoped_token(registry_admin)
    await registry_admin.kv.put("app/secret", "s3cr3t")
    await registry_admin.kv.put("other/x", "1")
    await registry_admin.catalog.register("n2", "10.0.0.2", service={"Service": "web", "Port": 80})
    c = consul.aio.Consul(port=secured_registry.port, token=tok["SecretID"])
    anon = consul.aio.Consul(port=secured_registry.port)
    try:
        assert await c.kv.put("app/config", "ok") is True
        with pytest.raises(consul.ACLPermissionDenied):
            await c.kv.put("other/x", "nope")
        with pytest.raises(consul.ACLPermissionDenied):
            await c.kv.get("app/secret")
        with pytest.raises(consul.ACLPermissionDenied):
            await c.kv.put("app/secret", "overwrite")
        with pytest.raises(consul.ACLPermissionDenied):
            await c.kv.delete("app/", recurse=True)  # app/secret is under it
        _, tree = await c.kv.get("app/", recurse=True)
        assert [e["Key"] for e in tree] == ["app/config"]  # the denied key is filtered out
        _, keys = await c.kv.get("app/", keys=True, separator="/")
        assert keys == ["app/config"]
        out = await c.http.put(
            consul.callback.CB.json(),
            "/v1/txn",
            params=[("token", tok["SecretID"])],
            data='[{"KV": {"Verb": "get-tree", "Key": "app/"}}]',
        )
        assert [r["KV"]["Key"] for r in out["Results"]] == ["app/config"]
        _, other = await c.kv.get("other/x")
        assert other["Value"] == b"1"  # key_prefix "" read
        # What a sidecar needs: catalog and health reads.
        _, healthy = await c.health.service("web", passing=True)
        assert [e["Service"]["Service"] for e in healthy] == ["web"]
        _, services = await c.catalog.services()
        assert "web" in services
        # ACL administration is not for this token.
        with pytest.raises(consul.ACLPermissionDenied):
            await c.acl.policy.list()
        me = await c.acl.token.read_self()
        assert me["AccessorID"] == tok["AccessorID"]
        # Anonymous: default deny, reads included; nothing changes.
        with pytest.raises(consul.ACLPermissionDenied):
            await anon.kv.get("other/x")
        with pytest.raises(consul.ACLPermissionDenied):
            await anon.kv.put("app/config", "anon")
        with pytest.raises(consul.ACLPermissionDenied):
            await anon.health.service("web")
        _, cfg = await registry_admin.kv.get("app/config")
        assert cfg["Value"] == b"ok"
        # An unknown secret is refused everything.
        ghost = consul.aio.Consul(port=secured_registry.port, token="not-a-token")
        try:
            with pytest.raises(consul.ACLPermissionDenied) as err:
                await ghost.kv.get("other/x")
            assert "ACL not found" in str(err.value)
        finally:
            await ghost.close()
    finally:
        await c.close()
        await anon.close()


async def test_policy_and_token_lifecycle(
    secured_registry: RegistryServer, registry_admin: Any
) -> None:
    tok = await _scoped_token(registry_admin)
    pol_id = tok["Policies"][0]["ID"]
    assert (await registry_admin.acl.policy.read(pol_id))["Rules"]
    names = [p["Name"] for p in await registry_admin.acl.policy.list()]
    assert names == ["global-management", "app-writer"]
    with pytest.raises(consul.ConsulException) as err:
        await registry_admin.acl.policy.create("app-writer")
    assert "already exists" in str(err.value)
    with pytest.raises(consul.ConsulException) as err:
        await registry_admin.acl.policy.create(
            "broken", rules={"key_prefix": {"": {"policy": "all"}}}
        )
    assert "Failed to parse ACL rules" in str(err.value)
    with pytest.raises(consul.ConsulException) as err:
        await registry_admin.acl.token.create(policies_name=["no-such-policy"])
    assert "No such ACL policy" in str(err.value)
    # Narrow the policy: the token loses write at once.
    read_only = {"key_prefix": {"": {"policy": "read"}}}
    await registry_admin.acl.policy.update(pol_id, "app-writer", rules=read_only)
    c = consul.aio.Consul(port=secured_registry.port, token=tok["SecretID"])
    try:
        with pytest.raises(consul.ACLPermissionDenied):
            await c.kv.put("app/config", "x")
        assert (await registry_admin.acl.token.read(tok["AccessorID"]))["Description"] == "sidecar"
        accessors = [t["AccessorID"] for t in await registry_admin.acl.token.list()]
        assert tok["AccessorID"] in accessors
        assert await registry_admin.acl.token.delete(tok["AccessorID"]) is True
        with pytest.raises(consul.ACLPermissionDenied):
            await c.kv.get("app/config")
    finally:
        await c.close()
    assert await registry_admin.acl.policy.delete(pol_id) is True
    with pytest.raises(consul.ACLPermissionDenied, match="ACL not found"):
        await registry_admin.acl.policy.read(pol_id)
    with pytest.raises(consul.ConsulException):
        await registry_admin.acl.policy.delete("00000000-0000-0000-0000-000000000001")


async def test_service_identity_token(
    secured_registry: RegistryServer, registry_admin: Any
) -> None:
    tok = await registry_admin.acl.token.create(service_identities=[{"ServiceName": "orders"}])
    c = consul.aio.Consul(port=secured_registry.port, token=tok["SecretID"])
    try:
        await c.agent.service.register("orders", service_id="orders-1", port=8080)
        with pytest.raises(consul.ACLPermissionDenied):
            await c.agent.service.register("payments", service_id="payments-1", port=8081)
        _, healthy = await c.health.service("orders")
        assert [e["Service"]["ID"] for e in healthy] == ["orders-1"]
        with pytest.raises(consul.ACLPermissionDenied):
            await c.kv.get("anything")
    finally:
        await c.close()


async def test_acl_disabled_is_401(consul_client: Any) -> None:
    with pytest.raises(consul.ACLDisabled):
        await consul_client.acl.token.read_self()


async def test_acl_state_survives_kill_9(registry_process: Callable[..., RegistryProcess]) -> None:
    rp = registry_process(token=MGMT)
    registry_admin = consul.aio.Consul(port=rp.port, token=MGMT)
    try:
        tok = await _scoped_token(registry_admin)
    finally:
        await registry_admin.close()
    rp.kill9()
    rp.start()
    c = consul.aio.Consul(port=rp.port, token=tok["SecretID"])
    try:
        assert await c.kv.put("app/after-restart", "ok") is True
        with pytest.raises(consul.ACLPermissionDenied):
            await c.kv.put("other/x", "nope")
        me = await c.acl.token.read_self()
        assert me["Policies"][0]["Name"] == "app-writer"
    finally:
        await c.close()


async def test_acl_read_hides_secrets_and_anonymous_can_be_granted(
    secured_registry: RegistryServer, registry_admin: Any
) -> None:
    await registry_admin.acl.policy.create(
        "auditor", rules='acl = "read"\nkey_prefix "pub/" { policy = "read" }'
    )
    auditor = await registry_admin.acl.token.create(policies_name=["auditor"])
    c = consul.aio.Consul(port=secured_registry.port, token=auditor["SecretID"])
    anon = consul.aio.Consul(port=secured_registry.port)
    try:
        listed = await c.acl.token.list()
        assert listed and all(t["SecretID"] == "<hidden>" for t in listed)
        one = await c.acl.token.read(auditor["AccessorID"])
        assert one["SecretID"] == "<hidden>"
        with pytest.raises(consul.ACLPermissionDenied):
            await c.acl.token.create(description="not allowed")
        # The anonymous token is a token like any other: grant it public reads.
        await registry_admin.kv.put("pub/motd", "hello")
        with pytest.raises(consul.ACLPermissionDenied):
            await anon.kv.get("pub/motd")
        await registry_admin.acl.token.update(
            "00000000-0000-0000-0000-000000000002", policies_name=["auditor"]
        )
        _, motd = await anon.kv.get("pub/motd")
        assert motd["Value"] == b"hello"
        with pytest.raises(consul.ACLPermissionDenied):
            await anon.kv.put("pub/motd", "defaced")
    finally:
        await c.close()
        await anon.close()
