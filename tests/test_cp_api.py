"""The control plane's REST API: real ControlPlane servers on ephemeral ports, a real registry."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import consul.aio
import pytest

from controlplane.server import ConfigChange, ControlPlane, ControlPlaneSpec, RegistryAddress
from controlplane.store import PolicyStore
from registry.server import RegistryServer
from tests.conftest import serving_registry

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "tether" / "demo" / "policies").glob("*.yaml"))
HEAD = "apiVersion: tether.dev/v1alpha1\n"

MakeCP = Callable[..., Awaitable[ControlPlane]]


def example_files() -> dict[str, Any]:
    return {"files": [{"name": p.name, "text": p.read_text()} for p in EXAMPLES]}


@pytest.fixture
async def make_cp(registry: RegistryServer) -> AsyncIterator[MakeCP]:
    made: list[ControlPlane] = []

    async def make(token: str | None = None, port: int | None = None) -> ControlPlane:
        reg = RegistryAddress("127.0.0.1", port or registry.port, "http", token)
        cp = ControlPlane(ControlPlaneSpec(port=0, registry=reg, watch_wait="5s"))
        await cp.start()
        made.append(cp)
        return cp

    yield make
    for cp in made:
        await cp.aclose()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


async def call(http: aiohttp.ClientSession, method: str, url: str, **kw: Any) -> tuple[int, Any]:
    async with http.request(method, url, **kw) as resp:
        return resp.status, await resp.json()


async def test_apply_list_get_and_reapply(make_cp: MakeCP, http: aiohttp.ClientSession) -> None:
    cp = await make_cp()
    api = f"{cp.url}/api/v1"
    status, body = await call(http, "POST", f"{api}/apply", json=example_files())
    assert status == 200, body
    assert [c["action"] for c in body["changes"]] == ["created"] * 6
    assert body["version"] == 1 and body["dryRun"] is False
    split_change = next(c for c in body["changes"] if c["kind"] == "TrafficSplit")
    assert "+    weight: 90\n" in split_change["diff"]
    # No instances registered yet: a warning per service configured, not an error.
    assert {w["path"] for w in body["warnings"]} == {"metadata.name"}
    assert len(body["warnings"]) == 3  # once per service: frontend, inventory, orders
    # The writing replica publishes before answering.
    assert cp.snapshot.version == 1 and len(cp.snapshot.resources) == 6

    status, body = await call(http, "GET", f"{api}/resources/trafficsplit")
    assert status == 200 and [i["metadata"]["name"] for i in body["items"]] == ["orders"]
    status, body = await call(http, "GET", f"{api}/resources/TrafficSplit/default/orders")
    assert status == 200
    assert [s["weight"] for s in body["spec"]["subsets"]] == [90, 10]
    assert body["metadata"]["generation"] == 1
    status, body = await call(http, "GET", f"{api}/resources/MeshConfig/_/mesh")
    assert status == 200 and body["kind"] == "MeshConfig"
    status, body = await call(http, "GET", f"{api}/resources/route/default/nope")
    assert status == 404 and body["error"] == "not_found"
    status, body = await call(http, "GET", f"{api}/resources/retrypolicy")
    assert status == 400 and "not supported yet" in body["message"]
    status, body = await call(http, "GET", f"{api}/resources?namespace=default")
    assert len(body["items"]) == 6  # the mesh-wide MeshConfig shows in every namespace

    status, body = await call(http, "POST", f"{api}/apply", json=example_files())
    assert [c["action"] for c in body["changes"]] == ["unchanged"] * 6
    assert body["version"] == 1
    status, body = await call(http, "GET", f"{api}/version")
    assert status == 200 and body["version"] == 1


async def test_raw_yaml_body_and_single_json_document(
    make_cp: MakeCP, http: aiohttp.ClientSession
) -> None:
    cp = await make_cp()
    text = HEAD + "kind: ServiceDefaults\nmetadata: {name: orders}\nspec: {protocol: tcp}\n"
    status, body = await call(
        http,
        "POST",
        f"{cp.url}/api/v1/apply?file=sd.yaml",
        data=text,
        headers={"Content-Type": "application/yaml"},
    )
    assert status == 200 and body["changes"][0]["action"] == "created"
    doc = {
        "apiVersion": "tether.dev/v1alpha1",
        "kind": "ServiceDefaults",
        "metadata": {"name": "orders"},
        "spec": {"protocol": "http"},
    }
    status, body = await call(http, "POST", f"{cp.url}/api/v1/apply", json=doc)
    assert status == 200 and body["changes"][0]["action"] == "configured"


async def test_bad_document_is_rejected_and_nothing_changes(
    make_cp: MakeCP, http: aiohttp.ClientSession
) -> None:
    cp = await make_cp()
    api = f"{cp.url}/api/v1"
    await call(http, "POST", f"{api}/apply", json=example_files())
    before = cp.snapshot
    # A good document and a bad one in one apply: neither is stored.
    text = (
        HEAD
        + "kind: ServiceDefaults\nmetadata: {name: orders}\nspec: {protocol: tcp}\n---\n"
        + HEAD
        + "kind: TrafficSplit\nmetadata: {name: orders}\nspec:\n  subsets:\n"
        "    - {name: v1, selector: {version: v1}, weight: 50}\n"
        "    - {name: v2, selector: {version: v2}, weigth: 50}\n"
    )
    files = {"files": [{"name": "canary.yaml", "text": text}]}
    status, body = await call(http, "POST", f"{api}/apply", json=files)
    assert status == 422 and body["error"] == "invalid"
    problems = {(p["file"], p["document"], p["path"], p["line"]) for p in body["problems"]}
    assert ("canary.yaml", 2, "spec.subsets[1].weigth", 12) in problems
    assert ("canary.yaml", 2, "spec.subsets[1]", 12) in problems  # missing 'weight'
    p = next(p for p in body["problems"] if p["path"] == "spec.subsets[1].weigth")
    assert p["kind"] == "TrafficSplit" and p["name"] == "orders" and p["severity"] == "error"
    # Meaning errors (after the schema passed) are rejected the same way.
    route = (
        HEAD + "kind: Route\nmetadata: {name: orders}\nspec:\n  rules:\n"
        "    - match: {path: {regex: '(['}}\n"
    )
    status, body = await call(http, "POST", f"{api}/apply?file=r.yaml", data=route)
    assert status == 422
    assert [(p["path"], p["line"]) for p in body["problems"]] == [
        ("spec.rules[0].match.path.regex", 6)
    ]
    # Nothing stored, version unchanged, previous resources still in force.
    status, body = await call(http, "GET", f"{api}/version")
    assert body["version"] == before.version == 1
    after = await cp.refresh()
    assert after.resources == before.resources
    status, body = await call(http, "GET", f"{api}/resources/servicedefaults/default/orders")
    assert body["spec"].get("protocol", "http") == "http"
    status, body = await call(http, "POST", f"{api}/validate", json=files)
    assert status == 422 and body["valid"] is False


async def test_dry_run_and_diff(make_cp: MakeCP, http: aiohttp.ClientSession) -> None:
    cp = await make_cp()
    api = f"{cp.url}/api/v1"
    status, body = await call(http, "POST", f"{api}/apply?dryRun=true", json=example_files())
    assert status == 200 and body["dryRun"] is True
    assert [c["action"] for c in body["changes"]] == ["created"] * 6
    assert (await cp.refresh()).resources == {}
    await call(http, "POST", f"{api}/apply", json=example_files())
    promoted = (
        (EXAMPLES[0].read_text())
        .replace("weight: 90", "weight: 0")
        .replace("weight: 10", "weight: 100")
    )
    status, body = await call(http, "POST", f"{api}/diff?file=orders.yaml", data=promoted)
    assert status == 200
    (changed,) = [c for c in body["changes"] if c["action"] != "unchanged"]
    assert changed["kind"] == "TrafficSplit" and changed["action"] == "configured"
    assert "-    weight: 90\n" in changed["diff"] and "+    weight: 0\n" in changed["diff"]
    got = cp.store
    res = await got.snapshot()
    assert [s.weight for s in res.of_kind("TrafficSplit")[0].spec.subsets] == [90, 10]  # type: ignore[union-attr]


async def test_delete(make_cp: MakeCP, http: aiohttp.ClientSession) -> None:
    cp = await make_cp()
    api = f"{cp.url}/api/v1"
    await call(http, "POST", f"{api}/apply", json=example_files())
    # The Route uses the split's subsets: deleting the split alone is refused.
    status, body = await call(http, "DELETE", f"{api}/resources/TrafficSplit/default/orders")
    assert status == 422 and "Route default/orders rules[0] still sends" in body["message"]
    status, body = await call(http, "DELETE", f"{api}/resources/Route/default/orders")
    assert status == 200 and body["changes"][0]["action"] == "deleted"
    assert body["version"] == 2
    status, body = await call(http, "DELETE", f"{api}/resources/Route/default/orders")
    assert status == 404
    doc = HEAD + "kind: TrafficSplit\nmetadata: {name: orders}\nspec: {}\n"  # spec not checked
    status, body = await call(http, "POST", f"{api}/delete?file=d.yaml", data=doc)
    assert status == 200 and body["changes"][0]["action"] == "deleted"
    assert {k.kind for k in cp.snapshot.resources} == {"ServiceDefaults", "MeshConfig"}


async def test_subset_warning_follows_registered_instances(
    make_cp: MakeCP, http: aiohttp.ClientSession, consul_client: Any
) -> None:
    cp = await make_cp()
    status, body = await call(http, "POST", f"{cp.url}/api/v1/diff", json=example_files())
    # Nothing registered yet: each service the documents configure is named, once.
    assert sorted(w["name"] for w in body["warnings"]) == ["frontend", "inventory", "orders"]
    assert all("no instance of service default/" in w["message"] for w in body["warnings"])
    for i, version in enumerate(["v1", "v2"]):
        await consul_client.agent.service.register(
            "orders",
            service_id=f"orders-{i}",
            port=9000 + i,
            meta={"version": version, "namespace": "default"},
        )
    for service in ("frontend", "inventory"):
        await consul_client.agent.service.register(service, service_id=f"{service}-0", port=9100)
    status, body = await call(http, "POST", f"{cp.url}/api/v1/apply", json=example_files())
    assert status == 200 and body["warnings"] == []
    split = EXAMPLES[0].read_text().replace("version: v2}", "version: v9}")
    status, body = await call(http, "POST", f"{cp.url}/api/v1/diff?file=o.yaml", data=split)
    assert status == 200
    (w,) = body["warnings"]
    assert w["path"] == "spec.subsets[1].selector" and w["line"] == 30
    assert w["severity"] == "warning" and "selects no instance" in w["message"]


async def test_two_replicas_concurrent_applies_lose_nothing(
    make_cp: MakeCP, http: aiohttp.ClientSession
) -> None:
    cps = [await make_cp(), await make_cp()]
    changes: list[list[ConfigChange]] = [[], []]
    for i, cp in enumerate(cps):

        async def record(change: ConfigChange, i: int = i) -> None:
            changes[i].append(change)

        cp.subscribe(record)
    n = 12

    async def writer(i: int) -> None:
        for k in range(n):
            text = (
                HEAD + "kind: ServiceDefaults\n"
                f"metadata: {{name: shared, labels: {{by: r{i}-{k}}}}}\nspec: {{}}\n---\n"
                + HEAD
                + f"kind: ServiceDefaults\nmetadata: {{name: own-{i}-{k}}}\nspec: {{}}\n"
            )
            status, body = await call(http, "POST", f"{cps[i].url}/api/v1/apply", data=text)
            assert status == 200, body

    await asyncio.gather(writer(0), writer(1))
    final = await cps[0].store.snapshot()
    assert final.version == 2 * n
    assert len(final.resources) == 1 + 2 * n
    shared = next(r for k, r in final.resources.items() if k.name == "shared")
    assert shared.metadata.generation == 2 * n
    # Both replicas converge on the same published snapshot through their KV watch.
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    while loop.time() < deadline and not all(
        cp.snapshot.version == final.version and cp.snapshot.resources == final.resources
        for cp in cps
    ):
        await asyncio.sleep(0.02)
    for i, cp in enumerate(cps):
        assert cp.snapshot.resources == final.resources
        # Every own resource was announced to each replica's subscribers.
        seen = set().union(*(c.changed for c in changes[i]))
        assert {k.name for k in seen} >= {f"own-{j}-{k}" for j in (0, 1) for k in range(n)}


async def test_subscriber_sees_changes_made_straight_in_the_registry(
    make_cp: MakeCP, registry: RegistryServer
) -> None:
    cp = await make_cp()
    got: asyncio.Queue[ConfigChange] = asyncio.Queue()

    async def on_change(change: ConfigChange) -> None:
        await got.put(change)

    unsubscribe = cp.subscribe(on_change)
    other = consul.aio.Consul(host="127.0.0.1", port=registry.port)
    try:
        from controlplane.schema import parse_resources

        await PolicyStore(other).apply(parse_resources(EXAMPLES[0].read_text()))
    finally:
        await other.close()
    keys: set[Any] = set()
    while len(keys) < 3:
        change = await asyncio.wait_for(got.get(), 10)
        keys |= change.changed
        assert change.current.index >= change.previous.index
    assert {k.kind for k in keys} == {"ServiceDefaults", "TrafficSplit", "Route"}
    unsubscribe()
    await cp.wait_for_version(1)
    assert cp.snapshot.version == 1


@pytest.fixture
async def acl_registry(tmp_path: Path) -> AsyncIterator[RegistryServer]:
    async with serving_registry(tmp_path / "acl", management_token="root") as server:
        yield server


async def test_writes_need_a_token_the_registry_accepts(
    make_cp: MakeCP, http: aiohttp.ClientSession, acl_registry: RegistryServer
) -> None:
    cp = await make_cp(token="root", port=acl_registry.port)  # reads with its own token
    api = f"{cp.url}/api/v1"
    status, body = await call(http, "POST", f"{api}/apply", json=example_files())
    assert status == 401 and body["error"] == "unauthorized"
    status, body = await call(
        http, "POST", f"{api}/apply", json=example_files(), headers={"X-Tether-Token": "nope"}
    )
    assert status == 403
    assert (await cp.refresh()).resources == {}
    status, body = await call(
        http,
        "POST",
        f"{api}/apply",
        json=example_files(),
        headers={"Authorization": "Bearer root"},
    )
    assert status == 200 and body["version"] == 1
    status, body = await call(http, "DELETE", f"{api}/resources/Route/default/orders")
    assert status == 401
    status, body = await call(
        http,
        "DELETE",
        f"{api}/resources/Route/default/orders",
        headers={"X-Tether-Token": "root"},
    )
    assert status == 200
    # Reads of policy need the caller's token too (tests/test_cp_security.py has the rest).
    status, body = await call(http, "GET", f"{api}/resources")
    assert status == 401
    status, body = await call(http, "GET", f"{api}/resources", headers={"X-Consul-Token": "root"})
    assert status == 200 and len(body["items"]) == 5


async def test_bad_requests_get_json_errors(make_cp: MakeCP, http: aiohttp.ClientSession) -> None:
    cp = await make_cp()
    api = f"{cp.url}/api/v1"
    status, body = await call(http, "POST", f"{api}/apply", data=b"\xff\xfe")
    assert status == 400 and "UTF-8" in body["message"]
    status, body = await call(http, "POST", f"{api}/apply", json={"files": "x"})
    assert status == 400
    status, body = await call(http, "POST", f"{api}/apply", data="a: [1,\n")
    assert status == 422 and "invalid YAML" in body["problems"][0]["message"]
    status, body = await call(http, "GET", f"{api}/resources/Frobnicator")
    assert status == 404 and "unknown kind" in body["message"]
    status, body = await call(http, "GET", f"{api}/nothing-here")
    assert status == 404 and body["error"] == "not_found"
    big = "#" * (5 * 1024 * 1024)
    status, body = await call(http, "POST", f"{api}/apply", data=big)
    assert status == 413
    status, body = await call(http, "GET", f"{api}/health")
    assert status == 200 and body["status"] == "ok"
    status, body = await call(http, "GET", api)
    assert status == 200 and body["kinds"] == [
        "ServiceDefaults",
        "Route",
        "TrafficSplit",
        "MeshConfig",
        "Intention",
    ]
    assert f"{api[len(cp.url) :]}/apply" in body["endpoints"]
    assert json.dumps(body)
