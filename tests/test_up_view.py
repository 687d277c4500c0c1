"""What `tether up`'s live view computes: shares per subset and per zone, and the table."""

from __future__ import annotations

from collections import deque
from pathlib import Path

import aiohttp
from rich.console import Console

from controlplane.server import ControlPlane, ControlPlaneSpec, RegistryAddress
from registry.server import RegistryServer
from tether.up import DEMO, ROOT, Instance, Mesh, UpSpec, render, split_shares, zone_shares

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
        mesh.split = SUBSETS
        mesh.policy_status = "6 from policies applied (config version 1)"
        console = Console(record=True, width=160)
        console.print(render(mesh, deque()))
        text = console.export_text()
    finally:
        mesh.data_dir.rmdir()
    assert "orders v2" in text and "zone-b" in text
    assert "orders split (last 10 s): v1 90% · v2 10%   (configured: v1 90% · v2 10%)" in text
    assert "orders by zone (frontend-1 is in zone-a): zone-a 100% · zone-b 0%" in text
    assert "policies: 6 from policies applied" in text


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
            assert mesh.policy_status.endswith("applied (config version 1)")
            await mesh.refresh_split(session)
            assert [(s["name"], s["weight"]) for s in mesh.split] == [("v1", 90), ("v2", 10)]

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
            assert [s["weight"] for s in mesh.split] == [90, 10]
    finally:
        await cp.aclose()


def test_up_never_hands_out_a_port_twice() -> None:
    """Ports are chosen before the processes that bind them start: one `tether up` (or
    test, or benchmark) must not give two of them the same port (the kernel offers a
    closed probe's port again)."""
    from tether.ports import free_port

    ports = [free_port() for _ in range(300)]
    assert len(set(ports)) == len(ports)
