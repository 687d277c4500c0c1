"""docker-compose.yml, Dockerfile and .dockerignore, checked without a Docker engine.

This machine (and the project's CI) has no Docker engine, so the compose file is never
run here. What can be checked without one is checked with the real parsers: the YAML
parses; every `tether` command line is accepted by the click command it names (the
sidecar's flags also build a valid `SidecarSpec`); every demo app's command line is
accepted by the demo's own argparse parser; the wiring between services is consistent
(namespaces, advertised addresses, ports, registry and control plane addresses,
depends_on, healthchecks); the topology is the one `tether up` runs; the Dockerfile
copies paths that exist; the policies job applies files that exist and validate.
"""

from __future__ import annotations

import json
import re
import shlex
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import click
import pytest
import yaml

from controlplane.operator import read_inputs
from controlplane.validation import decode_files
from proxy.registration import RegistrationSpec
from proxy.sidecar import SidecarSpec
from tether.cli import main
from tether.demo import server as demo_server
from tether.up import DEMO

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"


def load_compose() -> dict[str, Any]:
    with COMPOSE_FILE.open() as f:
        doc = yaml.safe_load(f)
    assert isinstance(doc, dict)
    return doc


COMPOSE = load_compose()
# The services `docker compose up` runs: profiles (a real Consul) aside.
SERVICES: dict[str, dict[str, Any]] = {
    n: s for n, s in COMPOSE["services"].items() if "profiles" not in s
}
TETHER_SERVICES = sorted(n for n, s in SERVICES.items() if "entrypoint" not in s)
APP_SERVICES = sorted(n for n, s in SERVICES.items() if "entrypoint" in s)
SIDECARS = sorted(n for n in TETHER_SERVICES if SERVICES[n]["command"][0] == "sidecar")


def default_of(value: str) -> str:
    """A value as compose interpolates it with its variables unset (`${VAR:-default}`)."""
    return re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", value)


def argv(service: str) -> list[str]:
    command = SERVICES[service]["command"]
    return shlex.split(command) if isinstance(command, str) else [str(a) for a in command]


def parse_tether(args: list[str]) -> tuple[str, click.Context]:
    """The subcommand's context, as `tether ARGS...` would build it (UsageError if not)."""
    ctx = main.make_context("tether", list(args), resilient_parsing=False)
    assert ctx.args == args[1:], "the group itself takes no options here"
    assert isinstance(main, click.Group)
    name, cmd, rest = main.resolve_command(ctx, list(args))
    assert name is not None and cmd is not None
    return name, cmd.make_context(name, rest, parent=ctx, resilient_parsing=False)


def parse_app(service: str, monkeypatch: pytest.MonkeyPatch) -> tuple[str, Any]:
    """(demo service, its parsed args) as `python -m tether.demo.<service>` parses them."""
    spec = SERVICES[service]
    assert spec["entrypoint"] == ["python", "-m"]
    module, *args = argv(service)
    prefix = "tether.demo."
    assert module.startswith(prefix), module
    demo = module.removeprefix(prefix)
    source = (ROOT / "tether" / "demo" / f"{demo}.py").read_text()
    assert 'if __name__ == "__main__":' in source and f'run("{demo}"' in source
    monkeypatch.setattr(sys, "argv", [module, *args])
    return demo, demo_server.parse_args(demo)


def sidecar_spec(service: str) -> SidecarSpec:
    name, ctx = parse_tether(argv(service))
    assert name == "sidecar"
    p = ctx.params
    return SidecarSpec(
        service=p["service"],
        app_port=p["app_port"],
        app_health_path=p["app_health_path"],
        outbound_port=p["outbound_port"],
        inbound_port=p["inbound_port"],
        admin_port=p["admin_port"],
        inbound_host=p["inbound_host"],
        advertise_host=p["advertise_host"],
        namespace=p["namespace"],
        zone=p["zone"],
        version=p["version_"],
        meta=p["meta"],
        controlplane=p["controlplane"],
        egress=p["egress"],
        opaque_ports=p["opaque_port"],
        drain_seconds=p["drain_seconds"],
        check_interval=p["check_interval"],
        app_check_via=p["app_check_via"],
        ingress_port=p["ingress_port"],
    )


def owner(sidecar: str) -> str:
    mode = SERVICES[sidecar]["network_mode"]
    assert mode.startswith("service:"), mode
    return str(mode.removeprefix("service:"))


def tether_params(service: str) -> dict[str, Any]:
    return dict(parse_tether(argv(service))[1].params)


def healthcheck_url(service: str) -> str:
    """The URL a `python -c "...urlopen('URL'...)"` healthcheck asks, its code compiled."""
    test = SERVICES[service]["healthcheck"]["test"]
    assert test[:3] == ["CMD", "python", "-c"], test
    code = test[3]
    compile(code, f"<healthcheck of {service}>", "exec")
    return str(code.split("urlopen('", 1)[1].split("'", 1)[0])


@pytest.mark.parametrize("service", TETHER_SERVICES)
def test_tether_command_lines_are_accepted_by_the_cli(service: str) -> None:
    name, ctx = parse_tether(argv(service))
    assert name in {"registry", "controlplane", "sidecar", "apply"}
    assert ctx.command.name == name
    with pytest.raises(click.UsageError):  # the parser used here does refuse bad input
        parse_tether([*argv(service), "--no-such-flag"])


@pytest.mark.parametrize("sidecar", SIDECARS)
def test_sidecar_shares_its_app_namespace_and_is_reachable(sidecar: str) -> None:
    spec = sidecar_spec(sidecar)  # raises ValueError on an invalid combination
    app = owner(sidecar)
    assert app in APP_SERVICES and "network_mode" not in SERVICES[app]
    # Listening on every address of the namespace, advertised under the name the
    # compose network's DNS gives the namespace's owner: other sidecars dial that.
    assert spec.inbound_host == "0.0.0.0"
    assert spec.advertised == app
    assert "ports" not in SERVICES[sidecar]  # a shared namespace publishes on its owner
    env = SERVICES[sidecar]["environment"]
    host, _, port = default_of(env["CONSUL_HTTP_ADDR"]).rpartition(":")
    assert host in SERVICES and SERVICES[host]["command"][0] == "registry"
    assert int(port) == tether_params(host)["port"]
    cp = urlsplit(spec.controlplane or "")
    cp_params = tether_params(str(cp.hostname))
    assert cp_params["host"] == "0.0.0.0" and cp.port == cp_params["port"]
    assert healthcheck_url(sidecar) == f"http://127.0.0.1:{spec.admin_port}/ready"
    assert SERVICES[sidecar]["depends_on"][app]["condition"] == "service_started"


@pytest.mark.parametrize("app", APP_SERVICES)
def test_demo_app_command_line_matches_its_sidecar(
    app: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    demo, args = parse_app(app, monkeypatch)
    sidecars = [s for s in SIDECARS if owner(s) == app]
    assert len(sidecars) == 1, f"{app} has no sidecar of its own"
    spec = sidecar_spec(sidecars[0])
    assert (spec.service, spec.app_port, spec.app_host) == (demo, args.port, "127.0.0.1")
    assert (spec.zone, spec.version, spec.meta["instance"]) == (args.zone, args.version, app)
    assert args.instance == app
    proxy = SERVICES[app]["environment"]["HTTP_PROXY"]
    assert proxy == f"http://127.0.0.1:{spec.outbound_port}"
    assert "127.0.0.1" in SERVICES[app]["environment"]["NO_PROXY"].split(",")
    assert healthcheck_url(app) == f"http://127.0.0.1:{args.port}/health"
    assert args.rate == (2.0 if demo == "frontend" else 0.0)  # only frontend drives traffic
    if args.rate:  # ... and only once its sidecar is ready (compose starts the app first)
        assert args.wait_for == f"http://127.0.0.1:{spec.admin_port}/ready"
    with pytest.raises(SystemExit):  # the demo parser does refuse bad input
        monkeypatch.setattr(sys, "argv", ["x", "--port", "not-a-port"])
        demo_server.parse_args(demo)


def test_topology_is_the_one_tether_up_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    running = set()
    for app in APP_SERVICES:
        demo, args = parse_app(app, monkeypatch)
        running.add((demo, args.instance, args.zone, args.version))
    assert running == set(DEMO)
    orders = [r for r in running if r[0] == "orders"]
    assert {z for _, _, z, _ in orders} == {"zone-a", "zone-b"}
    assert {v for _, _, _, v in orders} == {"v1", "v2"}


def test_depends_on_names_existing_services_with_sound_conditions() -> None:
    for name, spec in SERVICES.items():
        deps = spec.get("depends_on") or {}
        for dep, how in deps.items():
            assert dep in SERVICES and dep != name, f"{name} depends on {dep}"
            condition = how["condition"]
            if condition == "service_healthy":
                assert "healthcheck" in SERVICES[dep], f"{dep} has no healthcheck"
            elif condition == "service_completed_successfully":
                assert SERVICES[dep].get("restart") == "no", f"{dep} is not a one-shot job"
            else:
                assert condition == "service_started"
        mode = spec.get("network_mode")
        if mode is not None:
            assert mode.startswith("service:") and owner(name) in SERVICES

    # No cycles: compose could not start them.
    state: dict[str, str] = {}

    def visit(node: str, path: tuple[str, ...]) -> None:
        assert state.get(node) != "open", f"depends_on cycle: {' -> '.join((*path, node))}"
        if state.get(node) == "done":
            return
        state[node] = "open"
        for dep in SERVICES[node].get("depends_on") or {}:
            visit(dep, (*path, node))
        state[node] = "done"

    for name in SERVICES:
        visit(name, ())
    # frontend starts once its callees' sidecars are ready, as under `tether up`.
    frontend_deps = SERVICES["frontend-1"]["depends_on"]
    callees = [s for s in SIDECARS if sidecar_spec(s).service in ("orders", "inventory")]
    assert callees and all(frontend_deps[s]["condition"] == "service_healthy" for s in callees)


def test_registry_and_control_plane() -> None:
    reg = tether_params("registry")
    assert reg["host"] == "0.0.0.0" and str(reg["data_dir"]) == "/data"
    volumes = SERVICES["registry"]["volumes"]
    assert f"registry-data:{reg['data_dir']}" in volumes
    assert "registry-data" in COMPOSE["volumes"]  # a named volume
    assert healthcheck_url("registry") == f"http://127.0.0.1:{reg['port']}/v1/status/leader"
    cp = tether_params("controlplane")
    assert healthcheck_url("controlplane") == f"http://127.0.0.1:{cp['port']}/api/v1/health"
    host = default_of(SERVICES["controlplane"]["environment"]["CONSUL_HTTP_ADDR"])
    assert host == f"registry:{reg['port']}"
    # The mesh CA is on (so sidecars run mTLS), its key in a named volume.
    ca_dir = SERVICES["controlplane"]["environment"]["TETHER_CA_KEY_DIR"]
    assert f"ca-keys:{ca_dir}" in SERVICES["controlplane"]["volumes"]
    assert "ca-keys" in COMPOSE["volumes"]


def test_only_frontend_and_registry_publish_ports() -> None:
    published = {n for n, s in SERVICES.items() if s.get("ports")}
    assert published == {"frontend-1", "registry"}
    reg = tether_params("registry")
    assert SERVICES["registry"]["ports"] == [f"{reg['port']}:{reg['port']}"]
    # The app listens on 127.0.0.1 only, the inbound listener takes mTLS only: what is
    # published is its sidecar's ingress listener, on every address of the namespace.
    (frontend_port,) = SERVICES["frontend-1"]["ports"]
    (sidecar,) = [s for s in SIDECARS if owner(s) == "frontend-1"]
    spec = sidecar_spec(sidecar)
    assert spec.ingress_port is not None and spec.inbound_host == "0.0.0.0"
    assert frontend_port.split(":")[-1] == str(spec.ingress_port)


def test_policies_job_applies_files_that_exist_and_validate() -> None:
    job = SERVICES["policies"]
    params = tether_params("policies")
    assert argv("policies")[0] == "apply" and not params["dry_run"]
    assert urlsplit(params["cp_url"]).hostname == "controlplane"
    assert urlsplit(params["cp_url"]).port == tether_params("controlplane")["port"]
    assert job["depends_on"] == {"controlplane": {"condition": "service_healthy"}}
    assert job["restart"] == "no"
    mounts = {}
    for volume in job["volumes"]:
        source, target, *_ = volume.split(":")
        mounts[target] = ROOT / source
    (target,) = params["files"]
    host_path = mounts[target]
    assert host_path.is_dir() and host_path == ROOT / "tether" / "demo" / "policies"
    files = read_inputs([str(host_path)])
    assert len(files) >= 2
    checked = decode_files(files)
    assert not checked.errors, checked.problems
    kinds = {(d["kind"], d["metadata"]["name"]) for _, t in files for d in yaml.safe_load_all(t)}
    assert ("TrafficSplit", "orders") in kinds


def test_dockerfile_copies_what_exists_and_runs_tether_unprivileged() -> None:
    lines = []
    for raw in DOCKERFILE.read_text().replace("\\\n", " ").splitlines():
        if raw.strip() and not raw.lstrip().startswith("#"):
            lines.append(raw.strip())
    instructions = [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]
    assert instructions[0] == ("FROM", "python:3.11-slim")
    copied = set()
    for op, rest in instructions:
        if op in ("COPY", "ADD"):
            *sources, _dest = rest.split()
            for source in sources:
                assert (ROOT / source).exists(), f"{op} {source}: no such path"
                copied.add(source)
    with (ROOT / "pyproject.toml").open("rb") as f:
        import tomllib

        packages = tomllib.load(f)["tool"]["hatch"]["build"]["targets"]["wheel"]["packages"]
    assert set(packages) <= copied and {"pyproject.toml", "README.md"} <= copied
    users = [rest for op, rest in instructions if op == "USER"]
    # Numeric UID:GID (hadolint DL3066), not root, and the one the RUN step creates.
    assert users and re.fullmatch(r"[1-9]\d*:[1-9]\d*", users[-1]), users
    uid, gid = users[-1].split(":")
    (entrypoint,) = [rest for op, rest in instructions if op == "ENTRYPOINT"]
    assert json.loads(entrypoint) == ["tether"]
    run = " ".join(rest for op, rest in instructions if op == "RUN")
    assert "pip install ." in run and "mkdir /data" in run and "mkdir -m 0700 /ca" in run
    assert f"--uid {uid}" in run and f"--gid {gid}" in run and f"chown {uid}:{gid} /data" in run
    # Every service runs this image; one builds it, the others never pull it.
    builders = [name for name, spec in SERVICES.items() if "build" in spec]
    assert builders == ["registry"] and SERVICES["registry"]["build"] == "."
    for name, spec in SERVICES.items():
        assert spec["image"] == "tether:local", name
        if name not in builders:
            assert spec["pull_policy"] == "never", name


def test_dockerignore_keeps_local_state_out_and_the_sources_in() -> None:
    patterns = [
        line.strip()
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert {".git", ".venv"} <= set(patterns)
    copied = {"pyproject.toml", "README.md", "tether", "proxy", "registry", "controlplane"}
    assert not copied & set(patterns)


@pytest.mark.parametrize("sidecar", SIDECARS[:1])
def test_app_check_is_reachable_from_the_registry(sidecar: str) -> None:
    spec = sidecar_spec(sidecar)
    # The registration the sidecar builds (proxy/sidecar.py, Sidecar.start).
    check = RegistrationSpec(
        service=spec.service,
        address=spec.advertised,
        port=spec.inbound_port,
        app_port=spec.app_port,
        app_host=spec.app_host,
        app_health_path=spec.app_health_path,
        check_via=(spec.advertised, spec.inbound_port) if spec.app_check_via == "inbound" else None,
    ).app_check(None)
    target = check.get("HTTP") or f"tcp://{check['TCP']}"
    # The registry container runs the check; a loopback address there is not the app.
    assert urlsplit(target).hostname not in ("127.0.0.1", "localhost", "::1")


def test_consul_profile_puts_a_real_consul_in_the_registry_s_place(tmp_path: Path) -> None:
    """`--profile consul` with TETHER_REGISTRY_ADDR: every part's registry is Consul (as
    the real `docker-compose config` resolves it); without them, the embedded one."""
    import os
    import shutil
    import subprocess

    consul = COMPOSE["services"]["consul"]
    assert consul["profiles"] == ["consul"] and consul["image"].startswith("hashicorp/consul:")
    assert "-server" in consul["command"] and "-bootstrap-expect=1" in consul["command"]
    assert "-client=0.0.0.0" in consul["command"]
    exe = shutil.which("docker-compose")
    if exe is None:
        pytest.skip("docker-compose is not installed (make test-tools installs it)")

    def resolved(*args: str, **env: str) -> dict[str, Any]:
        done = subprocess.run(
            [exe, "-f", str(COMPOSE_FILE), *args, "config"],
            cwd=ROOT, env={**os.environ, **env}, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        services: dict[str, Any] = yaml.safe_load(done.stdout)["services"]
        return services

    users = [*SIDECARS, "controlplane"]
    default = resolved()
    assert default["consul"]["profiles"] == ["consul"]  # listed, started only with --profile
    assert {default[n]["environment"]["CONSUL_HTTP_ADDR"] for n in users} == {"registry:8500"}
    with_consul = resolved("--profile", "consul", TETHER_REGISTRY_ADDR="consul:8500")
    assert "consul" in with_consul
    assert {with_consul[n]["environment"]["CONSUL_HTTP_ADDR"] for n in users} == {"consul:8500"}
