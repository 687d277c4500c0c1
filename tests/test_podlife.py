"""The sidecar's part in a pod's life: `prestop` against a real registry, and
`pod-sidecar` restarting its sidecar and leaving once the app's processes are gone."""

from __future__ import annotations

import asyncio
import socket
import sys
from pathlib import Path
from typing import Any

from tests.polling import until
from tether.podlife import PodSidecar, other_container_pids, prestop


def fake_proc(root: Path, others: list[int]) -> Path:
    for pid, group in [("self", "0::/sidecar"), ("1", "0::/pause")] + [
        (str(p), "0::/../app") for p in others
    ]:
        (root / pid).mkdir(parents=True, exist_ok=True)
        (root / pid / "cgroup").write_text(group + "\n")
    return root


def test_other_container_pids(tmp_path: Path) -> None:
    proc = fake_proc(tmp_path, [42, 43])
    (proc / "44").mkdir()
    (proc / "44" / "cgroup").write_text("0::/sidecar\n")  # this container's own child
    assert sorted(other_container_pids(proc)) == [42, 43]


async def test_pod_sidecar_restarts_and_exits_with_the_app(tmp_path: Path) -> None:
    proc = fake_proc(tmp_path / "proc", [4242])
    runs = tmp_path / "runs"
    # Dies at its first start, then runs until stopped.
    script = (
        "import pathlib, sys, time; p = pathlib.Path(sys.argv[1]); "
        "n = len(p.read_text().split()) if p.exists() else 0; "
        "p.write_text('x ' * (n + 1)); sys.exit(3) if n == 0 else time.sleep(60)"
    )
    sidecar = PodSidecar(
        [sys.executable, "-c", script, str(runs)],
        restart_delay=0.05,
        poll=0.05,
        exit_with_app=True,
        proc=proc,
    )
    task = asyncio.ensure_future(sidecar.run())
    try:
        await until(
            lambda: runs.exists() and len(runs.read_text().split()) == 2, 15, "not restarted"
        )
        assert not task.done()  # the app still runs: the sidecar stays
        (proc / "4242" / "cgroup").unlink()
        (proc / "4242").rmdir()
        assert await asyncio.wait_for(task, 15) == 0
        child = sidecar.launcher.children["sidecar"]
        assert child.returncode == -15  # stopped by SIGTERM (a sidecar drains on it)
    finally:
        task.cancel()
        await sidecar.launcher.aclose(timeout=1)


async def test_prestop_takes_the_instance_out_and_waits_for_the_app(
    consul_client: Any, registry: Any
) -> None:
    await consul_client.agent.service.register(
        "orders", service_id="orders-10.0.0.7-15006", address="10.0.0.7", port=15006
    )
    app = socket.socket()
    app.bind(("127.0.0.1", 0))
    app.listen(8)
    port = app.getsockname()[1]
    loop = asyncio.get_running_loop()
    loop.call_later(0.5, app.close)  # the app stops a moment later
    code = await prestop("orders", "10.0.0.7", 15006, port, 30.0, "127.0.0.1", registry.port, None)
    assert code == 0
    assert app.fileno() == -1  # it returned once the app had stopped
    _, nodes = await consul_client.health.service("orders", passing=True)
    assert nodes == []  # in maintenance: out of every caller's discovery
    _, all_nodes = await consul_client.health.service("orders")
    checks = {c["CheckID"]: c["Status"] for n in all_nodes for c in n["Checks"]}
    assert checks["_service_maintenance:orders-10.0.0.7-15006"] == "critical"
