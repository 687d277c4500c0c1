"""`create_service_token` (what `tether token create --service S [--namespace N]` calls)
against a real registry with ACLs on."""

from __future__ import annotations

import json
from typing import Any

import consul.aio
import pytest

from controlplane.ca.state import TOKEN_BINDINGS
from controlplane.ca.tokens import create_service_token
from controlplane.errors import BadRequestError, PermissionDeniedError
from registry.server import RegistryServer
from tests.test_ca_api import acl_registry, root_client

__all__ = ["acl_registry", "root_client"]  # fixtures shared from there


@pytest.fixture
def root(root_client: Any) -> Any:
    return root_client


async def client_with(registry: RegistryServer, token: str) -> Any:
    return consul.aio.Consul(host="127.0.0.1", port=registry.port, token=token)


async def test_the_token_has_the_service_identity_and_its_namespace_binding(
    root: Any, acl_registry: RegistryServer
) -> None:
    secret = await create_service_token(root, "orders", "shop")
    mine = await client_with(acl_registry, secret)
    try:
        me = await mine.acl.token.read_self()
        # A service identity also lets the sidecar register its instance.
        assert await mine.agent.service.register("orders", service_id="orders-1")
    finally:
        await mine.close()
    assert me["ServiceIdentities"] == [{"ServiceName": "orders"}]
    _, entry = await root.kv.get(TOKEN_BINDINGS + me["AccessorID"])
    assert json.loads(entry["Value"]) == {"service": "orders", "namespace": "shop"}


@pytest.mark.parametrize(
    ("service", "namespace"), [("Orders", "default"), ("-x", "default"), ("orders", "a/b")]
)
async def test_bad_names_create_nothing(root: Any, service: str, namespace: str) -> None:
    before = len(await root.acl.token.list())
    with pytest.raises(BadRequestError):
        await create_service_token(root, service, namespace)
    assert len(await root.acl.token.list()) == before


async def test_a_refused_write_leaves_nothing_behind(
    root: Any, acl_registry: RegistryServer
) -> None:
    # May create tokens, may not write the binding: the token is deleted again.
    await root.acl.policy.create("tokens-only", rules='acl = "write"')
    limited = await root.acl.token.create(policies_name=["tokens-only"])
    before = len(await root.acl.token.list())
    c = await client_with(acl_registry, limited["SecretID"])
    try:
        with pytest.raises(PermissionDeniedError):
            await create_service_token(c, "orders")
    finally:
        await c.close()
    assert len(await root.acl.token.list()) == before
    # No acl:write at all: refused before anything exists.
    nobody = await client_with(acl_registry, "anonymous-caller")
    try:
        with pytest.raises(PermissionDeniedError):
            await create_service_token(nobody, "orders")
    finally:
        await nobody.close()
    assert len(await root.acl.token.list()) == before
