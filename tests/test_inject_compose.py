"""`tether inject` on compose files: golden files for the voting app (with and without
build contexts), checked by the real `docker-compose config`, and the wiring the issue
asks for (the sidecar owns the namespace, the app joins it once it is healthy, no
start-order cycle, the mesh added, warnings for services without a port)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from controlplane.inject.compose import ComposeSpec, inject_compose
from controlplane.inject.errors import InjectError
from tests.conftest import run_tether

DATA = Path(__file__).parent / "data" / "inject" / "compose"
INPUTS = ["voting-app.yml", "voting-app.images.yml"]


def compose_config(tmp: Path, text: str) -> dict[str, Any]:
    """`docker-compose config` of `text` (with the build contexts it names made empty)."""
    exe = shutil.which("docker-compose")
    if exe is None:
        pytest.skip("docker-compose is not installed (make test-tools installs it with apt-get)")
    path = tmp / "docker-compose.yml"
    path.write_text(text)
    for service in yaml.safe_load(text)["services"].values():
        build = service.get("build")
        context = build.get("context") if isinstance(build, dict) else build
        if context:
            (tmp / context).mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        [exe, "-f", str(path), "--profile", "seed", "config"],
        cwd=tmp,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    config: dict[str, Any] = yaml.safe_load(done.stdout)
    return config


def start_order(services: dict[str, Any]) -> list[str]:
    """The order compose starts services in; fails on a cycle."""
    order: list[str] = []
    state: dict[str, str] = {}

    def visit(name: str, path: tuple[str, ...]) -> None:
        assert state.get(name) != "visiting", f"start-order cycle: {' -> '.join((*path, name))}"
        if state.get(name) == "done":
            return
        state[name] = "visiting"
        deps = services[name].get("depends_on") or {}
        mode = services[name].get("network_mode", "")
        joined = [mode.removeprefix("service:")] if mode.startswith("service:") else []
        for dep in [*deps, *joined]:
            visit(dep, (*path, name))
        state[name] = "done"
        order.append(name)

    for name in services:
        visit(name, ())
    return order


@pytest.mark.parametrize("name", INPUTS)
def test_voting_app_golden_and_valid(name: str, tmp_path: Path) -> None:
    source = (DATA / name).read_text()
    done = run_tether("inject", "-f", str(DATA / name), env=dict(os.environ))
    assert done.returncode == 0, done.stderr
    want = DATA / name.replace(".yml", ".injected.yml")
    if os.environ.get("TETHER_UPDATE_GOLDEN"):
        want.write_text(done.stdout)
    assert done.stdout == want.read_text()
    # Services without a port: a warning each, naming the service and the flag.
    for svc in ("worker", "redis", "db"):
        assert f"{svc}: no known port" in done.stderr and f"--port {svc}=PORT" in done.stderr
    before = yaml.safe_load(source)["services"]
    config = compose_config(tmp_path, done.stdout)
    services = config["services"]
    assert {"tether-registry", "tether-controlplane"} <= set(services)
    order = start_order(services)
    for app, original in before.items():
        sidecar = services[f"{app}-sidecar"]
        joined = services[app]
        assert joined["network_mode"] == f"service:{app}-sidecar"
        assert joined["depends_on"][f"{app}-sidecar"] == {"condition": "service_healthy"}
        assert order.index(f"{app}-sidecar") < order.index(app)
        # The sidecar depends on the mesh only: no cycle through the app.
        assert set(sidecar["depends_on"]) == {"tether-registry", "tether-controlplane"}
        for key in ("ports", "networks"):
            assert key not in joined
        if "ports" in original:
            assert len(sidecar["ports"]) == len(original["ports"])
        networks = original.get("networks") or ["default"]
        assert set(sidecar["networks"]) == set(networks)
        for net in sidecar["networks"].values():
            assert app in net["aliases"]  # callers still reach the app by its name
        env = joined["environment"]
        assert env["HTTP_PROXY"] == "http://127.0.0.1:15001"
        assert "localhost" in env["NO_PROXY"]
        cmd = sidecar["command"]
        assert cmd[:4] == ["pod-sidecar", "--", "tether", "sidecar"]
        assert cmd[cmd.index("--service") + 1] == app
        assert cmd[cmd.index("--advertise-host") + 1] == app
        assert sidecar["healthcheck"]["test"][0] == "CMD"
        assert sidecar.get("profiles") == original.get("profiles")
    vote = services["vote-sidecar"]["command"]
    assert vote[vote.index("--app-port") + 1] == "80"
    # Idempotent: the injected file injected again is the same file.
    again = run_tether("inject", "-f", "-", env=dict(os.environ), stdin=done.stdout)
    assert again.returncode == 0 and yaml.safe_load(again.stdout) == yaml.safe_load(done.stdout)


def test_port_flag_and_errors(tmp_path: Path) -> None:
    doc = yaml.safe_load((DATA / "voting-app.images.yml").read_text())
    result = inject_compose(doc, ComposeSpec(ports={"redis": 6379}))
    assert not any(w.startswith("redis:") for w in result.warnings)
    cmd = result.document["services"]["redis-sidecar"]["command"]
    assert cmd[cmd.index("--app-port") + 1] == "6379"
    # A service with a port is in the mesh: callers go to it through their sidecar.
    assert "redis" not in result.document["services"]["vote"]["environment"]["NO_PROXY"]
    with pytest.raises(InjectError, match="no service 'nope'"):
        inject_compose(doc, ComposeSpec(ports={"nope": 1}))
    done = run_tether("inject", "-f", "-", "--port", "redis", env=dict(os.environ), stdin="")
    assert done.returncode == 2 and "SERVICE=PORT" in done.stderr
    done = run_tether("inject", "-f", "-", env=dict(os.environ), stdin="just: text\n")
    assert done.returncode == 1 and "neither a Kubernetes object nor a compose file" in done.stderr
