"""Control-plane security: callers' own tokens (never the control plane's), push auth.

The control plane runs as a real `tether controlplane` process with the registry's
management token in its own environment (as a deployment runs it), against a real
`tether registry` process with ACLs on; callers are plain HTTP clients.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from controlplane.server import ControlPlane, ControlPlaneSpec, RegistryAddress
from proxy.policy_client import PolicyClient, push_url
from registry.server import RegistryServer
from tests.conftest import MANAGEMENT_TOKEN, ControlPlaneProcess, RegistryProcess, serving_registry
from wire import push as protocol

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "tether" / "demo" / "policies").glob("*.yaml"))
MANAGEMENT = MANAGEMENT_TOKEN


def example_files() -> dict[str, Any]:
    return {"files": [{"name": p.name, "text": p.read_text()} for p in EXAMPLES]}


async def call(
    http: aiohttp.ClientSession, method: str, url: str, token: str | None = None, **kw: Any
) -> tuple[int, Any, aiohttp.typedefs.LooseHeaders]:
    headers = dict(kw.pop("headers", {}))
    if token:
        headers["X-Tether-Token"] = token
    async with http.request(method, url, headers=headers, **kw) as resp:
        return resp.status, await resp.json(), resp.headers


async def make_token(http: aiohttp.ClientSession, registry: str, rules: str) -> str:
    """A registry token with one policy of `rules`; returns its secret."""
    root = {"X-Consul-Token": MANAGEMENT}
    name = f"p-{uuid.uuid4().hex[:8]}"
    async with http.put(
        f"{registry}/v1/acl/policy", json={"Name": name, "Rules": rules}, headers=root
    ) as resp:
        assert resp.status == 200, await resp.text()
    async with http.put(
        f"{registry}/v1/acl/token", json={"Policies": [{"Name": name}]}, headers=root
    ) as resp:
        assert resp.status == 200, await resp.text()
        return str((await resp.json())["SecretID"])


async def stored_keys(http: aiohttp.ClientSession, registry: str) -> list[str]:
    """The policy keys in the registry KV, read with the management token."""
    async with http.get(
        f"{registry}/v1/kv/tether/v1/?keys", headers={"X-Consul-Token": MANAGEMENT}
    ) as resp:
        return [] if resp.status == 404 else list(await resp.json())


async def test_callers_use_their_own_token_never_the_control_planes(
    acl_processes: Callable[..., tuple[RegistryProcess, ControlPlaneProcess]],
) -> None:
    reg, cp = acl_processes()
    registry = f"http://127.0.0.1:{reg.port}"
    api = f"{cp.url}/api/v1"
    async with aiohttp.ClientSession() as http:
        reader = await make_token(http, registry, 'key_prefix "tether/v1/" { policy = "read" }')
        status_reader = await make_token(
            http, registry, 'key_prefix "tether/push/" { policy = "read" }'
        )
        # Open: liveness and the version number.
        status, body, _ = await call(http, "GET", f"{api}/health")
        assert status == 200 and body["status"] == "ok"
        # No token: 401 with a way to authenticate, for every write and sensitive read.
        for method, path, payload in [
            ("POST", "/apply", example_files()),
            ("POST", "/apply?dryRun=true", example_files()),
            ("POST", "/delete", example_files()),
            ("DELETE", "/resources/Route/default/orders", None),
            ("GET", "/resources", None),
            ("GET", "/resources/Route/default/orders", None),
            ("POST", "/diff", example_files()),
            ("POST", "/validate", example_files()),
            ("GET", "/sidecars", None),
        ]:
            status, body, headers = await call(http, method, f"{api}{path}", json=payload)
            assert status == 401, (method, path, body)
            assert body["error"] == "unauthorized" and "token" in body["message"]
            assert headers["WWW-Authenticate"].startswith("Bearer")
            # A token the registry does not know: 403.
            status, body, _ = await call(http, method, f"{api}{path}", "nope", json=payload)
            assert status == 403 and body["error"] == "permission_denied", (method, path)
        assert await stored_keys(http, registry) == []
        # A token that may only read policy may not change it, even as a dry run.
        status, body, _ = await call(http, "POST", f"{api}/apply", reader, json=example_files())
        assert status == 403 and 'key_prefix "tether/v1/" write' in body["message"]
        status, body, _ = await call(
            http, "POST", f"{api}/apply?dryRun=true", reader, json=example_files()
        )
        assert status == 403
        assert await stored_keys(http, registry) == []
        status, body, _ = await call(http, "GET", f"{api}/sidecars", reader)
        assert status == 403 and "tether/push/sidecars/" in body["message"]
        status, body, _ = await call(http, "GET", f"{api}/sidecars", status_reader)
        assert status == 200 and body["sidecars"] == []
        # The management token may write; the reader may then read.
        status, body, _ = await call(http, "POST", f"{api}/apply", MANAGEMENT, json=example_files())
        assert status == 200 and body["version"] == 1, body
        stored = await stored_keys(http, registry)
        assert "tether/v1/resources/Route/default/orders" in stored
        status, body, _ = await call(http, "GET", f"{api}/resources", reader)
        assert status == 200 and len(body["items"]) == len(stored) - 1  # and the version
        status, body, _ = await call(http, "POST", f"{api}/diff", reader, json=example_files())
        assert status == 200 and {c["action"] for c in body["changes"]} == {"unchanged"}
        # Deleting: not without a token, not with a reader's; the document stays.
        for token, want in ((None, 401), (reader, 403)):
            status, body, _ = await call(
                http, "DELETE", f"{api}/resources/Route/default/orders", token
            )
            assert status == want
        assert "tether/v1/resources/Route/default/orders" in await stored_keys(http, registry)
        status, body, _ = await call(
            http, "DELETE", f"{api}/resources/Route/default/orders", MANAGEMENT
        )
        assert status == 200 and body["changes"][0]["action"] == "deleted"


async def test_with_acls_off_no_token_is_needed(
    acl_processes: Callable[..., tuple[RegistryProcess, ControlPlaneProcess]],
) -> None:
    _, cp = acl_processes(acl=False, cp_token="whatever")
    api = f"{cp.url}/api/v1"
    async with aiohttp.ClientSession() as http:
        status, body, _ = await call(http, "POST", f"{api}/apply", json=example_files())
        assert status == 200 and body["version"] == 1
        status, body, _ = await call(http, "GET", f"{api}/resources")
        assert status == 200 and body["items"]
        status, body, _ = await call(
            http, "DELETE", f"{api}/resources/Route/default/orders", "any-token"
        )
        assert status == 200


# -- push: the sidecar's own token, for the service it names ---------------------------------


class NullApplier:
    """Takes every snapshot (what is applied is not the point here: who is served is)."""

    version = 0
    hash = ""

    async def apply(self, snapshot: protocol.Snapshot) -> None:
        self.version, self.hash = snapshot.version, snapshot.hash


async def refusal(url: str, token: str | None, service: str) -> protocol.ErrorMessage:
    """What the push server answers a hello for `service` sent with `token`."""
    headers = {"X-Consul-Token": token} if token else {}
    hello = protocol.Hello(protocol.NodeIdentity(service, "default", f"{service}-1", "z1"))
    async with aiohttp.ClientSession() as http:
        async with http.ws_connect(push_url(url), headers=headers) as ws:
            await ws.send_str(protocol.encode(hello))
            msg = await ws.receive(timeout=10)
            err = protocol.decode(msg.data)
            assert isinstance(err, protocol.ErrorMessage), err
            closing = await ws.receive(timeout=10)
            assert closing.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
            return err


async def test_push_serves_a_hello_only_to_a_token_that_may_write_its_service(
    acl_cp: tuple[RegistryServer, ControlPlane],
) -> None:
    reg, cp = acl_cp
    registry = f"http://127.0.0.1:{reg.port}"
    async with aiohttp.ClientSession() as http:
        orders = await make_token(http, registry, 'service "orders" { policy = "write" }')
        reader = await make_token(http, registry, 'service_prefix "" { policy = "read" }')
    err = await refusal(cp.url, None, "orders")
    assert err.code == "unauthorized"
    err = await refusal(cp.url, reader, "orders")
    assert err.code == "permission_denied" and 'service "orders" write' in err.message
    # A token for orders does not make its holder inventory.
    err = await refusal(cp.url, orders, "inventory")
    assert err.code == "permission_denied"
    # The sidecar's client sends its token, and is served.
    node = protocol.NodeIdentity("orders", "default", "orders-1", "z1")
    client = PolicyClient(cp.url, node, NullApplier(), rng=random.Random(1), token=orders)
    client.start()
    try:
        deadline = time.monotonic() + 10
        while client.acks < 1:
            assert time.monotonic() < deadline, client.describe()
            await asyncio.sleep(0.02)
    finally:
        await client.aclose()


async def test_registry_answers_what_a_token_may_do(tmp_path: Path) -> None:
    """`POST /v1/internal/acl/authorize`, the question the control plane asks (Consul's)."""
    async with serving_registry(tmp_path / "acl", management_token=MANAGEMENT) as reg:
        url = f"http://127.0.0.1:{reg.port}/v1/internal/acl/authorize"
        registry = f"http://127.0.0.1:{reg.port}"
        asks = [
            {"Resource": "key", "Segment": "tether/v1/", "Access": "read"},
            {"Resource": "key", "Segment": "tether/v1/", "Access": "write"},
            {"resource": "service", "segment": "orders", "access": "write"},
        ]
        async with aiohttp.ClientSession() as http:
            token = await make_token(
                http,
                registry,
                'key_prefix "tether/" { policy = "read" }\nservice "orders" { policy = "write" }',
            )
            async with http.post(url, json=asks, headers={"X-Consul-Token": token}) as resp:
                assert resp.status == 200
                assert [a["Allow"] for a in await resp.json()] == [True, False, True]
            async with http.post(url, json=asks, headers={"X-Consul-Token": "nope"}) as resp:
                assert resp.status == 403 and "ACL not found" in await resp.text()
            async with http.post(url, json=asks * 22, headers={"X-Consul-Token": token}) as resp:
                assert resp.status == 400 and "64" in await resp.text()
            bad = [{"Resource": "key", "Segment": "x", "Access": "own"}]
            async with http.post(url, json=bad, headers={"X-Consul-Token": token}) as resp:
                assert resp.status == 400 and "Access" in await resp.text()
    async with serving_registry(tmp_path / "open") as reg:
        url = f"http://127.0.0.1:{reg.port}/v1/internal/acl/authorize"
        async with aiohttp.ClientSession() as http:
            async with http.post(url, json=asks) as resp:
                assert resp.status == 401 and "ACL support disabled" in await resp.text()


# -- route regexes are RE2 at apply time --------------------------------------------------


@pytest.fixture
async def open_api(tmp_path: Path) -> AsyncIterator[str]:
    """The API URL of a control plane over a registry with ACLs off."""
    async with serving_registry(tmp_path / "reg") as reg:
        cp = ControlPlane(ControlPlaneSpec(port=0, registry=RegistryAddress(port=reg.port)))
        await cp.start()
        try:
            yield f"{cp.url}/api/v1"
        finally:
            await cp.aclose()


async def test_apply_refuses_regexes_re2_cannot_run_and_keeps_the_old_policy(
    open_api: str,
) -> None:
    api = open_api
    head = "apiVersion: tether.dev/v1alpha1\nkind: Route\nmetadata: {name: orders}\nspec:\n"
    good = head + "  rules:\n    - match: {path: {regex: '/v[0-9]+/.*'}}\n"
    bad = (
        head + "  rules:\n"
        "    - match: {path: {regex: '/(a)\\1'}}\n"  # 6: a backreference
        "    - match:\n"
        "        headers: [{name: x-v, regex: '(?=x)y'}]\n"  # 8: lookahead
        "    - match:\n"
        "        queryParams: [{name: q, regex: '(?<=a)b'}]\n"  # 10: lookbehind
    )
    async with aiohttp.ClientSession() as http:
        status, body, _ = await call(http, "POST", f"{api}/apply?file=r.yaml", data=good)
        assert status == 200 and body["version"] == 1
        status, body, _ = await call(http, "POST", f"{api}/apply?file=r.yaml", data=bad)
        assert status == 422, body
        got = {(p["path"], p["line"]): p["message"] for p in body["problems"]}
        assert set(got) == {
            ("spec.rules[0].match.path.regex", 6),
            ("spec.rules[1].match.headers[0].regex", 8),
            ("spec.rules[2].match.queryParams[0].regex", 10),
        }
        assert all("RE2" in m for m in got.values())
        assert "invalid escape sequence" in got[("spec.rules[0].match.path.regex", 6)]
        status, body, _ = await call(http, "GET", f"{api}/resources/Route/default/orders")
        assert body["spec"]["rules"][0]["match"]["path"]["regex"] == "/v[0-9]+/.*"
        assert body["metadata"]["generation"] == 1


# -- hostile documents: deep nesting and alias bombs -----------------------------------------


async def test_deep_json_and_yaml_bombs_get_clear_errors(open_api: str) -> None:
    api = open_api
    head = "apiVersion: tether.dev/v1alpha1\nkind: Route\nmetadata: {name: orders}\n"
    bomb = head + "x0: &a0 [s, s, s, s, s, s, s, s, s]\n"
    for i in range(1, 9):
        bomb += f"x{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]\n"
    bomb += "spec: {rules: [{match: {headers: *a8}}]}\n"
    deep_yaml = head + "spec: " + "[" * 5000 + "]" * 5000 + "\n"
    deep_json = '{"files": ' + "[" * 100_000 + "]" * 100_000 + "}"
    async with aiohttp.ClientSession() as http:
        status, body, _ = await call(
            http,
            "POST",
            f"{api}/apply",
            data=deep_json,
            headers={"Content-Type": "application/json"},
        )
        assert status == 400 and "nested deeper than 64" in body["message"], body
        for text, why in ((bomb, "aliases expanded"), (deep_yaml, "more than 64 levels")):
            status, body, _ = await call(http, "POST", f"{api}/apply", data=text)
            assert status == 422 and "invalid YAML" in body["message"], body
            assert why in body["message"]
        status, body, _ = await call(http, "GET", f"{api}/version")
        assert body["version"] == 0
