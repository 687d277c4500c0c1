"""`tether inject` on compose files: golden files for the voting app (with and without
build contexts), checked by the real `docker-compose config`, and the wiring the issue
asks for (the sidecar owns the namespace, the app joins it once it is healthy, no
start-order cycle, the mesh added, warnings for services without a port)."""

from __future__ import annotations

import copy
import http.client
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from controlplane.inject.compose import ComposeSpec, inject_compose, token_variable
from controlplane.inject.errors import InjectError
from tests.conftest import ROOT, run_tether, stop_group, wait_for_port
from tests.polling import poll
from tests.sidecar_harness import ProcessSet, Sidecar
from tether.ports import free_port

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


def test_injected_mesh_holds_the_ca_and_names_each_token() -> None:
    doc = yaml.safe_load((DATA / "voting-app.yml").read_text())
    result = inject_compose(doc, ComposeSpec())
    services = result.document["services"]
    cp = services["tether-controlplane"]
    assert cp["environment"]["TETHER_CA_KEY_DIR"] == "/ca"
    assert cp["volumes"] == ["tether-ca-keys:/ca"]
    assert "tether-ca-keys" in result.document["volumes"]
    env = services["vote-sidecar"]["environment"]
    assert env["CONSUL_HTTP_TOKEN"] == "${TETHER_TOKEN_VOTE:-}"
    assert token_variable("my-svc.v2") == "TETHER_TOKEN_MY_SVC_V2"
    assert not any("names no CA" in w for w in result.warnings)
    # A file with a control plane of its own, without a CA: left alone, and said.
    own = copy.deepcopy(doc)
    own["services"]["tether-controlplane"] = {"image": "tether:0.1.0", "command": ["controlplane"]}
    warned = inject_compose(own, ComposeSpec()).warnings
    assert any(w.startswith("tether-controlplane: its environment names no CA") for w in warned)


def test_injected_token_variable_reaches_the_sidecar(tmp_path: Path) -> None:
    done = run_tether("inject", "-f", str(DATA / "voting-app.yml"), env=dict(os.environ))
    assert done.returncode == 0, done.stderr
    (tmp_path / ".env").write_text("TETHER_TOKEN_VOTE=vote-token\n")
    services = compose_config(tmp_path, done.stdout)["services"]
    assert services["vote-sidecar"]["environment"]["CONSUL_HTTP_TOKEN"] == "vote-token"
    assert services["result-sidecar"]["environment"]["CONSUL_HTTP_TOKEN"] == ""


def _interpolated(value: str, variables: dict[str, str]) -> str:
    """`${VAR:-default}` as compose resolves it."""
    return re.sub(r"\$\{(\w+):-([^}]*)\}", lambda m: variables.get(m.group(1)) or m.group(2), value)


def _with(cmd: list[str], flag: str, value: str) -> list[str]:
    out = list(cmd)
    out[out.index(flag) + 1] = value
    return out


def test_injected_mesh_runs_mtls_between_its_sidecars(tmp_path: Path) -> None:
    """The injected file's own commands and environments, run as real processes on
    127.0.0.1: what compose gives each container (its own port space, the service
    names resolving) is mapped to ephemeral ports and the loopback. The control plane
    runs the CA, each sidecar gets a certificate with the file's credential, and the
    hop between two injected sidecars is mTLS."""
    done = run_tether("inject", "-f", str(DATA / "voting-app.yml"), env=dict(os.environ))
    assert done.returncode == 0, done.stderr
    services = yaml.safe_load(done.stdout)["services"]
    reg_port, cp_port = free_port(), free_port()
    addresses = {"tether-registry:8500": f"127.0.0.1:{reg_port}"}
    volumes = {"tether-ca-keys": tmp_path / "tether-ca-keys"}
    procs = ProcessSet(tmp_path, reg_port)

    def environment(service: dict[str, Any]) -> dict[str, str]:
        env = dict(os.environ)
        for k in ("CONSUL_HTTP_TOKEN", "TETHER_CA_KEY_DIR"):
            env.pop(k, None)
        for key, value in (service.get("environment") or {}).items():
            value = _interpolated(str(value), {})
            env[key] = addresses.get(value, value)
        for mount in service.get("volumes") or ():
            name, _, target = str(mount).partition(":")
            if name in volumes:  # the volume's mount point, here a directory of tmp
                env = {k: str(volumes[name]) if v == target else v for k, v in env.items()}
        return env

    def start(name: str, cmd: list[str], env: dict[str, str], port: int) -> None:
        log = (tmp_path / f"{name}.log").open("wb")
        proc = subprocess.Popen(
            [sys.executable, "-m", "tether.cli", *cmd],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        procs.closers.append(lambda: stop_group(proc))
        wait_for_port(port, timeout=30, proc=proc)

    try:
        reg = services["tether-registry"]
        cmd = _with(_with(reg["command"], "--host", "127.0.0.1"), "--port", str(reg_port))
        start("registry", _with(cmd, "--data-dir", str(tmp_path / "data")), environment(reg),
              reg_port)  # fmt: skip
        cp = services["tether-controlplane"]
        cmd = _with(_with(cp["command"], "--host", "127.0.0.1"), "--port", str(cp_port))
        start("controlplane", [*cmd, "--tls-port", "0"], environment(cp), cp_port)

        sidecars: dict[str, Sidecar] = {}
        for name in ("vote", "result"):
            svc = services[f"{name}-sidecar"]
            cmd = svc["command"]
            cmd = cmd[cmd.index("--") + 2 :]  # `tether sidecar ...`, as pod-sidecar runs it
            app = procs.app(name)
            for flag, value in (
                ("--app-port", str(app.port)),
                ("--inbound-host", "127.0.0.1"),
                ("--advertise-host", "127.0.0.1"),
                ("--controlplane", f"http://127.0.0.1:{cp_port}"),
            ):
                cmd = _with(cmd, flag, value)
            log = tmp_path / f"{name}-sidecar.log"
            with log.open("wb") as out:
                proc = subprocess.Popen(
                    [sys.executable, "-m", "tether.cli", *cmd, "--outbound-port", "0",
                     "--inbound-port", "0", "--admin-port", "0"],
                    cwd=ROOT, env=environment(svc), stdout=out, stderr=subprocess.STDOUT,
                    start_new_session=True,
                )  # fmt: skip
            sc = Sidecar(proc, log)
            procs.sidecars.append(sc)
            sc.wait_listening(timeout=60)
            assert "mtls=on" in sc.output(), sc.output()
            poll(sc.ready, 30, f"{name} sidecar ready")
            sidecars[name] = sc

        vote, result = sidecars["vote"], sidecars["result"]

        def through_mesh() -> tuple[int, dict[str, str], bytes] | None:
            status, headers, body = vote.call("http://result/x")
            return (status, headers, body) if status == 200 else None

        _, _, body = poll(through_mesh, 30, "vote -> result through the mesh")
        seen = json.loads(body)
        assert seen["name"] == "result"
        # The serving sidecar read the caller's identity from its certificate.
        assert seen["headers"]["x-tether-peer-identity"].endswith("/ns/default/dc/dc1/svc/vote")
        # The inbound port is strict: plaintext is refused, not served.
        conn = http.client.HTTPConnection("127.0.0.1", result.ports["inbound"], timeout=10)
        conn.request("GET", "/x")
        resp = conn.getresponse()
        assert resp.status == 400 and resp.getheader("x-tether-error") == "mtls_required"
        conn.close()
    finally:
        procs.close()
