"""Observability: the `stats` push message, the control plane's aggregation (edges,
services, quantiles, several replicas), `tether top`, and the sidecar's Prometheus
output checked against docs/metrics.md, over real processes."""

from __future__ import annotations

import asyncio
import json
import os
import re
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from controlplane.meshstats import STATS_PUBLISHER, Aggregate, Counts, MeshStats, render
from controlplane.push import PUSH_SERVER
from controlplane.server import ControlPlane, ControlPlaneSpec, RegistryAddress
from proxy.cluster import StaticDirectory
from proxy.policy import Policy
from proxy.policy_client import PolicyClient, push_url
from proxy.stats import ProxyStats
from registry.server import RegistryServer
from tests.conftest import ControlPlaneProcess, RegistryProcess, run_tether
from tests.polling import until
from tests.sidecar_harness import ROOT, ProcessSet, poll
from tests.test_cp_security import make_token
from wire import push as protocol

BUCKETS = len(protocol.LATENCY_BOUNDS) + 1


def row(dest: str, ok: int, bad: int = 0, listener: str = "outbound", subset: str = "") -> Any:
    buckets = [0] * BUCKETS
    buckets[4] = ok + bad  # (5 ms, 10 ms]
    return protocol.StatsRow(listener, dest, subset, (0, 0, ok, 0, 0, bad), tuple(buckets), 0.008)


def test_stats_message_round_trips_and_bad_reports_are_refused() -> None:
    msg = protocol.Stats(2.0, (row("orders.default", 9, 1, subset="v2"),))
    assert protocol.decode(protocol.encode(msg)) == msg
    good = json.loads(protocol.encode(msg))
    for change, error in [
        (lambda m: m["rows"][0].update(classes=[0, 0, -1, 0, 0, 0]), "classes must be 6"),
        (lambda m: m["rows"][0].update(buckets=[1]), f"buckets must be {BUCKETS}"),
        (lambda m: m["rows"][0].update(destination=""), "listener and destination"),
        (lambda m: m.update(seconds=0), "seconds must be a positive"),
        (lambda m: m.update(rows=[m["rows"][0]] * (protocol.MAX_STATS_ROWS + 1)), "more than 256"),
    ]:
        bad = json.loads(json.dumps(good))
        change(bad)
        with pytest.raises(protocol.PushProtocolError, match=error):
            protocol.decode(json.dumps(bad))


def test_proxy_stats_report_is_deltas_per_destination_and_subset() -> None:
    stats = ProxyStats(source="a.default", started=0.0)
    stats.destination("outbound", "b.default/v2").record(200, 0.003)
    stats.destination("outbound", "b.default/v2").record(503, 0.003)
    first = stats.report(2.0)
    assert first.seconds == 2.0  # since the start
    (r,) = first.rows
    assert (r.destination, r.subset, r.classes) == ("b.default", "v2", (0, 0, 1, 0, 0, 1))
    assert sum(r.buckets) == 2
    second = stats.report(4.0)
    assert second.rows == ()  # nothing new: an empty report


def test_quantiles_interpolate_within_buckets_as_prometheus_does() -> None:
    c = Counts()
    c.buckets[4] = 100  # all in (5 ms, 10 ms]
    assert c.quantile(0.5) == pytest.approx(0.0075)
    assert c.quantile(0.99) == pytest.approx(0.00995)
    c.buckets[-1] = 100  # half above 10 s: p99 is the last finite bound
    assert c.quantile(0.99) == pytest.approx(10.0)
    assert Counts().quantile(0.5) is None


def test_mesh_stats_aggregates_edges_and_expires_the_window() -> None:
    now = [100.0]
    mesh = MeshStats(window=10.0, clock=lambda: now[0])
    # Two frontend sidecars each report 2 s with 20 requests to orders; one 5xx.
    mesh.record(
        "default/frontend/1", "frontend.default", protocol.Stats(2.0, (row("orders.default", 20),))
    )
    mesh.record(
        "default/frontend/2",
        "frontend.default",
        protocol.Stats(2.0, (row("orders.default", 19, 1),)),
    )
    mesh.record(
        "default/orders/1",
        "orders.default",
        protocol.Stats(2.0, (row("app", 40, listener="inbound"),)),
    )
    out = render(mesh.aggregate())
    (edge,) = out["edges"]
    assert (edge["source"], edge["destination"]) == ("frontend.default", "orders.default")
    assert edge["rps"] == 20.0 and edge["requests"] == 40 and edge["sidecars"] == 2
    assert edge["success_rate"] == pytest.approx(39 / 40)
    services = {s["service"]: s for s in out["services"]}
    assert services["orders.default"]["rps"] == 20.0
    assert services["orders.default"]["sidecars"] == 1
    # frontend's sidecars reported (calls out only): the service is there, idle.
    assert services["frontend.default"]["requests"] == 0
    assert services["frontend.default"]["sidecars"] == 2
    # Another replica's aggregate, as read from the KV, adds up.
    other = Aggregate.from_dict(json.loads(json.dumps(mesh.aggregate().to_dict())))
    merged = mesh.aggregate()
    merged.merge(other)
    assert render(merged)["edges"][0]["rps"] == 40.0
    now[0] += 11  # past the window: nothing left
    assert render(mesh.aggregate()) == {"services": [], "edges": []}


# -- over real processes -----------------------------------------------------------------

pytestmark_e2e = pytest.mark.timeout(120)


def documented_metrics(access_log: bool = False, mtls: bool = False) -> dict[str, str]:
    """name -> type from the tables in docs/metrics.md (the exposed ones only; the mTLS
    ones only for a sidecar with mTLS, the access log's for one with --access-log)."""
    text = (ROOT / "docs" / "metrics.md").read_text()
    section = text.split("## The sidecar's metrics", 1)[1].split("Planned,", 1)[0]
    always, _, rest = section.partition("With mTLS (")
    with_tls, _, with_log = rest.partition("With `--access-log`")
    pattern = r"^\| `(tether_\w+)` \| (\w+) \|"
    found = dict(re.findall(pattern, always, re.M))
    if mtls:
        found.update(re.findall(pattern, with_tls, re.M))
    if access_log:
        found.update(re.findall(pattern, with_log, re.M))
    return found


def http_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return json.loads(resp.read())


@pytestmark_e2e
def test_stats_reach_the_control_plane_top_and_prometheus(
    registry_process: Callable[..., RegistryProcess], tmp_path: Path
) -> None:
    reg = registry_process()
    env = dict(os.environ, CONSUL_HTTP_ADDR=f"127.0.0.1:{reg.port}")
    cp = ControlPlaneProcess(reg.port, tmp_path / "cp.log")
    procs = ProcessSet(tmp_path, reg.port)
    try:
        cp.start()
        b_app = procs.app("b-v1")
        sb = procs.sidecar("b", b_app, "--version", "v1", "--controlplane", cp.url)
        sa = procs.sidecar("a", procs.app("a"), "--controlplane", cp.url)
        for _ in range(30):
            assert sa.call("http://b/who")[0] == 200
        # Egress to two addresses (the app answers on one; the other refuses), and a name
        # that is no service: none of them may become a label value of its own.
        status, headers, body = sa.call(f"http://127.0.0.1:{b_app.port}/who")
        assert "x-tether-error" not in headers, (status, headers, body)
        assert sa.call(f"http://127.0.0.2:{b_app.port}/who")[0] >= 500
        assert sa.call("http://nosuchservice/")[1]["x-tether-error"] == "unknown_service"

        def edge() -> dict[str, Any] | None:
            stats = http_json(f"{cp.url}/api/v1/stats")
            served = {s["service"]: s["requests"] for s in stats["services"]}
            if served.get("b.default", 0) < 30:  # b's own report, of what it handed its app
                return None
            for e in stats["edges"]:
                ends = (e["source"], e["destination"])
                if ends == ("a.default", "b.default") and e["requests"] >= 30:
                    return dict(e, services=stats["services"])
            return None

        got = poll(edge, 20, "a -> b in the control plane's stats", interval=0.2)
        assert got["rps"] > 0 and got["success_rate"] == 1.0
        assert 0 < got["p50_ms"] <= got["p99_ms"] < 10_000

        # The dashboard's service pages: the registry's instances of the mesh's services.
        def instances() -> dict[str, Any]:
            body = http_json(f"{cp.url}/api/v1/services")
            return {s["service"]: s["instances"] for s in body["services"]}

        assert sorted(instances()) == ["a", "b"]  # not the registry's own "consul"
        (inst,) = poll(lambda: [i for i in instances()["b"] if i["health"] == "passing"], 10, "b")
        assert (inst["version"], inst["namespace"]) == ("v1", "default")

        top = run_tether("top", "--once", "--controlplane", cp.url, env=env, timeout=30)
        assert top.returncode == 0, top.stderr
        lines = [line for line in top.stdout.splitlines() if "a.default" in line]
        assert any("b.default" in line and "100.0%" in line for line in lines), top.stdout

        _, text = sa.admin("/stats/prometheus")
        families = {f.name: f for f in text_string_to_metric_families(text)}
        # (No CA here: the sidecars speak plaintext, so no TLS families; with mTLS:
        # tests/test_observe_mtls.py.)
        assert {n: f.type for n, f in families.items()} == documented_metrics()
        values = {v for f in families.values() for s in f.samples for v in s.labels.values()}
        assert not [v for v in values if "127.0.0." in v or "nosuch" in v]
        requests = families["tether_requests"].samples
        assert any(
            s.labels == {
                "source": "a.default", "listener": "outbound", "destination": "b.default",
                "subset": "", "status_class": "2xx"} and s.value == 30
            for s in requests
        ), requests  # fmt: skip
        assert sum(s.value for s in requests if s.labels["destination"] == "egress") == 2
        replies = families["tether_local_replies"].samples
        assert any(s.labels["reason"] == "unknown_service" for s in replies), replies
        (connected,) = families["tether_controlplane_connected"].samples
        assert connected.value == 1
        # Plaintext between the sidecars: b cannot know the caller (an identity comes
        # only from an mTLS certificate, never from a header), so `unknown`.
        _, text = sb.admin("/stats/prometheus")
        b_requests = {f.name: f for f in text_string_to_metric_families(text)}["tether_requests"]
        inbound = [s for s in b_requests.samples if s.labels["listener"] == "inbound"]
        assert {s.labels["source"] for s in inbound if s.value} == {"unknown"}, inbound
        assert sum(s.value for s in inbound) >= 30
    finally:
        procs.close()
        cp.stop()


# -- the control plane's side, in process over a real registry --------------------------


async def stats_of(http: aiohttp.ClientSession, url: str, token: str | None = None) -> Any:
    headers = {"X-Tether-Token": token} if token else {}
    async with http.get(f"{url}/api/v1/stats", headers=headers) as resp:
        assert resp.status == 200, await resp.text()
        return await resp.json()


async def test_two_replicas_merge_their_sidecars_stats(registry: RegistryServer) -> None:
    cps = []
    for name in ("r1", "r2"):
        cp = ControlPlane(ControlPlaneSpec(port=0, registry=RegistryAddress(port=registry.port)))
        cp.app[PUSH_SERVER].replica = name
        cp.app[STATS_PUBLISHER].interval = 0.1
        await cp.start()
        cps.append(cp)
    clients = []
    for cp, service in zip(cps, ("frontend", "checkout"), strict=True):
        stats = ProxyStats(source=f"{service}.default")
        node = protocol.NodeIdentity(service, "default", f"{service}-1", "z1")
        client = PolicyClient(cp.url, node, Policy(StaticDirectory([])), stats=stats.report,
                              stats_interval=0.6)  # fmt: skip
        client.start()
        clients.append(client)
        for _ in range(12):  # what the outbound listener records per request
            stats.destination("outbound", "orders.default/v1").record(200, 0.004)
    try:
        async with aiohttp.ClientSession() as http:

            async def both() -> Any:
                body = await stats_of(http, cps[0].url)
                sources = {e["source"] for e in body["edges"] if e["requests"] == 12}
                return body if sources == {"frontend.default", "checkout.default"} else None

            body = await until(both, 15, "r1 shows its own sidecar's edge and r2's")
            assert body["replicas"] == ["r1", "r2"]
            assert {(e["destination"], e["subset"]) for e in body["edges"]} == {
                ("orders.default", "v1")
            }
            # r2 stops: its aggregate leaves the KV with it, and r1 counts its own only.
            await clients[1].aclose()
            await cps[1].aclose()

            async def alone() -> Any:
                body = await stats_of(http, cps[0].url)
                return body["replicas"] == ["r1"] and body

            body = await until(alone, 10, "r1 alone")
            assert {e["source"] for e in body["edges"]} == {"frontend.default"}
    finally:
        for client in clients:
            await client.aclose()
        for cp in cps:
            await cp.aclose()


async def test_reports_too_big_or_too_frequent_are_dropped(registry: RegistryServer) -> None:
    cp = ControlPlane(ControlPlaneSpec(port=0, registry=RegistryAddress(port=registry.port)))
    server = cp.app[PUSH_SERVER]
    await cp.start()
    report = json.loads(protocol.encode(protocol.Stats(1.0, (row("orders.default", 5),))))
    try:
        async with aiohttp.ClientSession() as http:
            async with http.ws_connect(push_url(cp.url), protocols=(protocol.SUBPROTOCOL,)) as ws:
                hello = protocol.Hello(protocol.NodeIdentity("frontend", "default", "f-1"))
                await ws.send_str(protocol.encode(hello))
                await ws.send_str(json.dumps(report))
                await ws.send_str(json.dumps(report))  # at once: over the rate
                padded = dict(report, padding="x" * protocol.MAX_STATS_BYTES)
                await ws.send_str(json.dumps(padded))  # over the size
                await until(lambda: asyncio.sleep(0, server.stats_dropped == 2), 10, "two dropped")
                assert server.stats.reports == 1
                # The connection stays: dropping a report is no reason to end it.
                assert not ws.closed
                body = await stats_of(http, cp.url)
                assert [e["requests"] for e in body["edges"]] == [5]
    finally:
        await cp.aclose()


async def test_dashboard_shell_is_open_and_its_data_needs_a_token(
    acl_cp: tuple[RegistryServer, ControlPlane],
) -> None:
    reg, cp = acl_cp
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{cp.url}/ui/") as resp:
            assert resp.status == 200 and "<svg" not in await resp.text()
            assert "default-src 'self'" in resp.headers["Content-Security-Policy"]
        async with http.get(f"{cp.url}/ui/app.js") as resp:
            assert resp.status == 200 and "X-Tether-Token" in await resp.text()
        async with http.get(f"{cp.url}/ui/../server.py") as resp:
            assert resp.status == 404
        registry = f"http://127.0.0.1:{reg.port}"
        for path in ("/api/v1/stats", "/api/v1/services"):
            async with http.get(f"{cp.url}{path}") as resp:
                assert resp.status == 401, path
        policy_reader = await make_token(
            http, registry, 'key_prefix "tether/v1/" { policy = "read" }'
        )
        viewer = await make_token(
            http, registry,
            'key_prefix "tether/push/stats/" { policy = "read" }\n'
            'service_prefix "" { policy = "read" }',
        )  # fmt: skip
        async with http.get(
            f"{cp.url}/api/v1/stats", headers={"X-Tether-Token": policy_reader}
        ) as resp:
            assert resp.status == 403
            assert "tether/push/stats/" in (await resp.json())["message"]
        body = await stats_of(http, cp.url, viewer)
        assert body["edges"] == [] and body["window"] == 10.0
        async with http.get(
            f"{cp.url}/api/v1/services", headers={"X-Tether-Token": viewer}
        ) as resp:
            assert resp.status == 200
            assert isinstance((await resp.json())["services"], list)
