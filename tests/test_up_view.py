"""What `tether up`'s live view computes: shares per subset and per zone, and the table."""

from __future__ import annotations

from collections import deque
from pathlib import Path
from typing import Any

import aiohttp
from rich.console import Console

from controlplane.server import ControlPlane, ControlPlaneSpec, RegistryAddress
from registry.server import RegistryServer
from tether.up import DEMO, ROOT, Instance, Mesh, UpSpec, render, split_shares, zone_shares

TS = (
    "apiVersion: tether.dev/v1alpha1\nkind: TrafficSplit\nmetadata: {{name: orders}}\nspec:\n"
    "  subsets:\n    - {{name: v1, selector: {{version: v1}}, weight: {v1}}}\n"
    "    - {{name: v2, selector: {{version: v2}}, weight: {v2}}}\n"
)
SUBSETS = [
    {"name": "v1", "selector": {"version": "v1"}, "weight": 90},
    {"name": "v2", "selector": {"version": "v2"}, "weight": 10},
]


def instances(calls: dict[str, tuple[float, float]]) -> list[Instance]:
    """DEMO's instances with (calls in at the start of the window, calls in now)."""
    out = []
    for row in DEMO:
        inst = Instance(*row)
        before, now = calls.get(inst.name, (0.0, 0.0))
        inst.history.extend([(0.0, before), (10.0, now)])
        inst.inbound_total = now
        out.append(inst)
    return out


def test_split_and_zone_shares_count_the_recent_window() -> None:
    # orders-1 (zone-a v1) got 85 of the last 100 calls, orders-4 (zone-a v2) 10,
    # orders-2 (zone-b v1) 5; what happened before the window does not count.
    insts = instances(
        {"orders-1": (500, 585), "orders-4": (0, 10), "orders-2": (900, 905), "orders-3": (7, 7)}
    )
    shares = {s.name: (s.weight, round(s.share, 2)) for s in split_shares(insts, "orders", SUBSETS)}
    assert shares == {"v1": (90, 0.9), "v2": (10, 0.1)}
    assert zone_shares(insts, "orders") == {"zone-a": 0.95, "zone-b": 0.05}
    # No calls yet: zeros, not a division by zero.
    idle = instances({})
    assert [s.share for s in split_shares(idle, "orders", SUBSETS)] == [0.0, 0.0]
    assert set(zone_shares(idle, "orders").values()) == {0.0}


def test_the_view_shows_zone_version_share_and_the_split() -> None:
    mesh = Mesh(UpSpec(), lambda name, line: None)
    try:
        mesh.instances = instances({"orders-1": (0, 90), "orders-4": (0, 10)})
        for i in mesh.instances:
            i.ready, i.app_health, i.policy_version = True, "passing", 3
        mesh.instances[1].app_health = "critical"  # orders-1's app died; its sidecar runs
        mesh.split = SUBSETS
        mesh.cp_port, mesh.config_version = 15010, 3
        mesh.policy_status = "6 from policies applied"
        console = Console(record=True, width=160)
        console.print(render(mesh, deque()))
        text = console.export_text()
    finally:
        mesh.data_dir.rmdir()
    assert "orders v2" in text and "zone-b" in text
    assert "orders split (last 10 s): v1 90% · v2 10%   (configured: v1 90% · v2 10%)" in text
    assert "orders by zone (frontend-1 is in zone-a): zone-a 100% · zone-b 0%" in text
    assert "policies: 6 from policies applied; config version 3" in text
    header = next(line for line in text.splitlines() if "instance" in line).split()
    assert header[:6] == ["instance", "service", "zone", "sidecar", "app", "config"]
    row = next(line for line in text.splitlines() if line.startswith("orders-1 ")).split()
    assert row[4:7] == ["up", "critical", "3"], row
    # The table fits an 80-column terminal whole (nothing cut to "…").
    narrow = Console(record=True, width=80)
    narrow.print(render(mesh, deque()))
    table = narrow.export_text().splitlines()[:9]
    assert not any("…" in line for line in table), table


async def test_policies_go_through_the_control_plane_api(
    registry: RegistryServer, tmp_path: Path
) -> None:
    reg = RegistryAddress("127.0.0.1", registry.port, "http", None)
    cp = ControlPlane(ControlPlaneSpec(port=0, registry=reg, watch_wait="5s"))
    await cp.start()
    lines: list[tuple[str, str]] = []
    mesh = Mesh(UpSpec(), lambda name, line: lines.append((name, line)))
    mesh.data_dir.rmdir()
    mesh.cp_port = int(cp.url.rpartition(":")[2])
    try:
        async with aiohttp.ClientSession() as session:
            assert await mesh.apply_policies(session, ROOT / "tether" / "demo" / "policies")
            assert ("policies", "trafficsplit default/orders created") in lines
            assert mesh.policy_status == "6 from policies applied"
            assert mesh.describe_policies().endswith("; config version 1")
            await mesh.refresh_split(session)
            assert [(s["name"], s["weight"]) for s in mesh.split] == [("v1", 90), ("v2", 10)]
            # An apply after start (as `tether apply` does): the view's version follows.
            ts = TS.format(v1=50, v2=50)
            async with session.post(
                f"{cp.url}/api/v1/apply", json={"files": [{"name": "ts.yaml", "text": ts}]}
            ) as resp:
                assert resp.status == 200 and (await resp.json())["version"] == 2
            await mesh.refresh_version(session)
            assert mesh.describe_policies().endswith("; config version 2")

            # A bad document: refused with where and why, the split in force unchanged.
            bad = tmp_path / "bad.yaml"
            bad.write_text(
                "apiVersion: tether.dev/v1alpha1\nkind: TrafficSplit\n"
                "metadata: {name: orders}\nspec:\n  subsets:\n"
                "    - {name: v1, selector: {version: v1}, weight: 50}\n"
            )
            lines.clear()
            assert not await mesh.apply_policies(session, bad)
            assert mesh.policy_status.startswith("rejected: ")
            assert any("bad.yaml:" in line and "spec.subsets" in line for _, line in lines), lines
            await mesh.refresh_split(session)
            assert [s["weight"] for s in mesh.split] == [50, 50]
            assert mesh.config_version == 2
    finally:
        await cp.aclose()


async def test_the_app_column_is_the_registry_check_of_the_app(
    registry: RegistryServer, consul_client: Any
) -> None:
    """A dead app behind a live sidecar shows as critical (the sidecar's readiness is its
    own column); an instance not registered shows nothing."""
    mesh = Mesh(UpSpec(), lambda name, line: None)
    mesh.data_dir.rmdir()
    mesh.registry_port = registry.port
    for name, status in (("orders-1", "critical"), ("orders-2", "passing")):
        assert await consul_client.agent.service.register(
            "orders",
            service_id=f"orders-{name}",
            meta={"instance": name},
            check={"CheckID": f"service:orders-{name}:app", "TTL": "60s", "Status": status},
        )
    async with aiohttp.ClientSession() as session:
        await mesh.refresh_app_health(session)
    health = {i.name: i.app_health for i in mesh.instances}
    assert (health["orders-1"], health["orders-2"], health["orders-3"]) == (
        "critical",
        "passing",
        "",
    )


def test_up_never_hands_out_a_port_twice() -> None:
    """Ports are chosen before the processes that bind them start: one `tether up` (or
    test, or benchmark) must not give two of them the same port (the kernel offers a
    closed probe's port again)."""
    from tether.ports import free_port

    ports = [free_port() for _ in range(300)]
    assert len(set(ports)) == len(ports)
