"""A terminating injected pod leaves rotation at once: the control plane watches pods
through the Kubernetes API (a stand-in API server here, speaking the real list/watch
protocol) and puts the pod's instances in maintenance in a real registry."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import consul.aio
import pytest
from aiohttp import web

from controlplane.inject.podwatch import pod_instances, terminating_injected
from tests.conftest import ControlPlaneProcess, RegistryProcess, serve_app
from tests.polling import until

TOKEN = "sa-token-of-the-controlplane"


def pod(name: str, ns: str = "shop", *, injected: bool = True, deleting: bool = False) -> Any:
    meta: dict[str, Any] = {"name": name, "namespace": ns, "uid": f"uid-{ns}-{name}"}
    if injected:
        meta["annotations"] = {"tether.dev/status": "injected"}
    if deleting:
        meta["deletionTimestamp"] = "2026-12-03T08:00:00Z"
    meta["resourceVersion"] = "11"
    return {"kind": "Pod", "metadata": meta}


class FakeKubeAPI:
    """`GET /api/v1/pods` as a list, and with `?watch=1` as a stream of JSON lines fed
    from `events`; the first watch answers 410 Gone so the client must list again."""

    def __init__(self, items: list[Any]) -> None:
        self.items = items
        self.events: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        self.lists = 0
        self.watches = 0
        self.unauthorized = 0
        self.watching = asyncio.Event()

    async def pods(self, request: web.Request) -> web.StreamResponse:
        if request.headers.get("Authorization") != f"Bearer {TOKEN}":
            self.unauthorized += 1
            return web.json_response({"kind": "Status", "code": 401}, status=401)
        if request.query.get("watch") != "1":
            self.lists += 1
            return web.json_response(
                {"kind": "PodList", "metadata": {"resourceVersion": "10"}, "items": self.items}
            )
        self.watches += 1
        assert request.query["resourceVersion"] == "10" or self.watches > 2
        if self.watches == 1:
            return web.json_response({"kind": "Status", "code": 410}, status=410)
        resp = web.StreamResponse()
        resp.content_type = "application/json"
        await resp.prepare(request)
        self.watching.set()
        while (event := await self.events.get()) is not None:
            await resp.write(json.dumps(event).encode() + b"\n")
        return resp


async def register(client: Any, sid: str, pod_name: str, ns: str) -> None:
    assert await client.agent.service.register(
        "web",
        service_id=sid,
        address="127.0.0.1",
        port=9,
        meta={"pod": pod_name, "namespace": ns},
        check={"CheckID": f"ttl:{sid}", "Name": "ttl", "TTL": "600s", "Status": "passing"},
    )


def test_pure_parts() -> None:
    assert terminating_injected(pod("a")) is None
    assert terminating_injected(pod("a", injected=False, deleting=True)) is None
    assert terminating_injected(pod("a", deleting=True)) == ("uid-shop-a", "shop", "a")
    services = {
        "web-1": {"Meta": {"pod": "a", "namespace": "shop"}},
        "web-2": {"Meta": {"pod": "a", "namespace": "other"}},  # same name, other namespace
        "web-3": {"Meta": {"pod": "b", "namespace": "shop"}},
        "web-4": {},
    }
    assert pod_instances(services, "shop", "a") == ["web-1"]


@pytest.fixture
def registry_proc(tmp_path: Path) -> Any:
    rp = RegistryProcess(tmp_path / "reg")
    rp.start()
    yield rp
    rp.stop()


async def test_terminating_pods_leave_rotation(
    tmp_path: Path, registry_proc: RegistryProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = consul.aio.Consul(host="127.0.0.1", port=registry_proc.port)
    # Already terminating when the control plane starts: drained from the list.
    api = FakeKubeAPI([pod("web-a"), pod("web-c", deleting=True), pod("app-x", deleting=True)])
    app = web.Application()
    app.router.add_get("/api/v1/pods", api.pods)
    runner, port = await serve_app(app)
    token = tmp_path / "token"
    token.write_text(TOKEN + "\n")
    monkeypatch.setenv("TETHER_K8S_API_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("TETHER_K8S_TOKEN_FILE", str(token))
    cp = ControlPlaneProcess(registry_proc.port, tmp_path / "cp.log")
    try:
        await register(client, "web-a", "web-a", "shop")
        await register(client, "web-b", "web-b", "shop")
        await register(client, "web-c", "web-c", "shop")
        await register(client, "web-a-elsewhere", "web-a", "other")
        await asyncio.to_thread(cp.start)

        async def passing() -> set[str]:
            _, nodes = await client.health.service("web", passing=True)
            return {n["Service"]["ID"] for n in nodes}

        await until(passing, 20, "web-c drained", want={"web-a", "web-b", "web-a-elsewhere"})
        await until(api.watching.is_set, 20, "the watch to start")
        assert api.lists >= 2  # the 410 made it list again

        gone = pod("web-a", deleting=True)
        gone["metadata"]["resourceVersion"] = "12"
        await api.events.put({"type": "MODIFIED", "object": gone})
        await until(passing, 20, "web-a drained", want={"web-b", "web-a-elsewhere"})
        _, checks = await client.health.service("web")
        reasons = {
            c["Notes"]
            for n in checks
            if n["Service"]["ID"] == "web-a"
            for c in n["Checks"]
            if c["CheckID"].startswith("_service_maintenance")
        }
        assert reasons == {"pod shop/web-a terminating"}
        assert api.unauthorized == 0
    finally:
        await asyncio.to_thread(cp.stop)
        await api.events.put(None)  # ends the watch stream
        await runner.cleanup()
        await client.close()


async def test_a_list_past_its_bound_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """A pod list is read with a bound even when the server sends no Content-Length."""
    from controlplane import kube

    async def pods(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()  # chunked: no Content-Length
        await resp.prepare(request)
        for _ in range(8):
            await resp.write(b" " * 1024)
        await resp.write(b'{"items": []}')
        return resp

    app = web.Application()
    app.router.add_get("/api/v1/pods", pods)
    runner, port = await serve_app(app)
    client = kube.KubeClient(kube.KubeConfig(f"http://127.0.0.1:{port}"))
    try:
        assert (await client.list("/api/v1/pods"))["items"] == []
        monkeypatch.setattr(kube, "MAX_LIST", 4096)
        with pytest.raises(kube.KubeError, match="over 4096 bytes"):
            await client.list("/api/v1/pods")
    finally:
        await client.close()
        await runner.cleanup()
