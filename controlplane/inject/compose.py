"""docker compose sidecar injection: a sidecar service per app service, owning the
network namespace the app joins.

For each app service `A` (every service but the mesh's own, and those with a
`network_mode` of their own) the file gets `A-sidecar`, which runs `tether sidecar`
and takes over what concerns the network: `A`'s published ports, exposed ports,
networks (with `A` as an alias on each, so other services still reach it by its
name), hostname, DNS and extra hosts. `A` joins it (`network_mode:
"service:A-sidecar"`) and starts once the sidecar is healthy (`depends_on` with
`condition: service_healthy`); the sidecar depends only on the registry and the control
plane, so no start-order cycle can arise. Both restart on their own
(`restart: unless-stopped`): a restarted app re-joins the running sidecar's namespace,
and a sidecar process that dies is restarted inside its container by `tether
pod-sidecar`, so the namespace stays (a sidecar *container* restarted by hand comes back
in a new namespace: restart the app with it). The app gets `HTTP_PROXY` to its
sidecar and `NO_PROXY` for the loopback and the services outside the mesh. The
registry and the control plane are added when the file has none; the control plane
added runs the mesh CA (its root key in a 0600 file of the named volume
`tether-ca-keys`), so the sidecars get certificates and the hops between them are mTLS,
as under `tether up`. Each sidecar's bootstrap credential for its CSR is the registry
ACL token in `CONSUL_HTTP_TOKEN`, taken from the variable `TETHER_TOKEN_<SERVICE>`
(compose interpolation, e.g. from `.env`; empty: a registry without ACLs, whose CA signs
for the service the sidecar names).

A service whose port cannot be told (no `ports`, no `expose`, no `--port`) gets an
outbound-only sidecar (it calls the mesh; the mesh cannot call it) and a warning
naming the service and the flag to set.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from controlplane.inject.errors import InjectError

REGISTRY = "tether-registry"
CONTROLPLANE = "tether-controlplane"
SIDECAR_SUFFIX = "-sidecar"
CA_VOLUME = "tether-ca-keys"
# A control plane's environment naming a CA (controlplane/ca/spec.py); without one its
# CA is off and the sidecars speak plaintext.
CA_VARIABLES = (
    "TETHER_CA_KEY_DIR", "TETHER_CA_ENCRYPTION_KEY", "TETHER_CA_ENCRYPTION_KEY_FILE",
    "TETHER_CA_CERT_FILE",
)  # fmt: skip
OUTBOUND_PORT = 15001
INBOUND_PORT = 15006
ADMIN_PORT = 15000

# What belongs to a network namespace: it moves from the app to its sidecar.
NETWORK_KEYS = (
    "ports", "expose", "networks", "hostname", "domainname", "dns", "dns_search",
    "dns_opt", "extra_hosts", "mac_address", "links",
)  # fmt: skip


@dataclass(frozen=True)
class ComposeSpec:
    """How `tether inject` writes compose sidecars (its flags)."""

    image: str = "tether:0.1.0"
    ports: Mapping[str, int] = field(default_factory=dict)  # --port SERVICE=PORT
    drain_seconds: float = 5.0


@dataclass
class ComposeResult:
    document: dict[str, Any]
    notes: list[str]  # one line per service: what was done
    warnings: list[str]


def _healthcheck(url: str) -> dict[str, Any]:
    code = f"import urllib.request; urllib.request.urlopen('{url}', timeout=2)"
    return {
        "test": ["CMD", "python", "-c", code],
        "interval": "2s",
        "timeout": "3s",
        "retries": 30,
    }


def _container_port(entry: Any) -> int | None:
    """The container side of a `ports` or `expose` entry (short or long syntax)."""
    if isinstance(entry, dict):
        target = entry.get("target")
        return int(target) if isinstance(target, int | str) and str(target).isdigit() else None
    text = str(entry).split("/", 1)[0]  # "8080:80/tcp"
    target = text.rsplit(":", 1)[-1]
    first = target.split("-", 1)[0]  # a range: its first port
    return int(first) if first.isdigit() else None


def app_port(name: str, service: Mapping[str, Any], spec: ComposeSpec) -> int | None:
    if name in spec.ports:
        return spec.ports[name]
    for key in ("ports", "expose"):
        for entry in service.get(key) or ():
            port = _container_port(entry)
            if port:
                return port
    return None


def _env_names(env: Any) -> set[str]:
    if isinstance(env, dict):
        return {str(k) for k in env}
    if isinstance(env, list):
        return {str(e).split("=", 1)[0] for e in env}
    return set()


def _add_env(service: dict[str, Any], values: dict[str, str]) -> None:
    env = service.get("environment")
    have = {n.upper() for n in _env_names(env)}  # either spelling is the app's own choice
    new = {k: v for k, v in values.items() if k.upper() not in have}
    if isinstance(env, list):
        env.extend(f"{k}={v}" for k, v in new.items())
    elif isinstance(env, dict):
        env.update(new)
    else:
        service["environment"] = new


def token_variable(service: str) -> str:
    """The compose variable holding `service`'s registry ACL token (its bootstrap
    credential): `TETHER_TOKEN_` and the name in capitals, other characters as `_`."""
    return "TETHER_TOKEN_" + "".join(c if c.isalnum() else "_" for c in service.upper())


def _depends(service: dict[str, Any]) -> dict[str, Any]:
    deps = service.get("depends_on")
    if isinstance(deps, list):
        deps = {str(d): {"condition": "service_started"} for d in deps}
    elif not isinstance(deps, dict):
        deps = {}
    service["depends_on"] = deps
    return deps


def _with_alias(networks: Any, alias: str) -> dict[str, Any]:
    """`networks` in long syntax with `alias` on each (default: the default network)."""
    if isinstance(networks, list):
        networks = {str(n): None for n in networks}
    if not isinstance(networks, dict) or not networks:
        networks = {"default": None}
    out: dict[str, Any] = {}
    for net, conf in networks.items():
        conf = dict(conf) if isinstance(conf, dict) else {}
        aliases = list(conf.get("aliases") or [])
        if alias not in aliases:
            aliases.append(alias)
        conf["aliases"] = aliases
        out[str(net)] = conf
    return out


def is_mesh_service(name: str, service: Mapping[str, Any]) -> bool:
    """The registry, the control plane, a sidecar: the mesh's own services."""
    if name in (REGISTRY, CONTROLPLANE) or name.endswith(SIDECAR_SUFFIX):
        return True
    command = service.get("command")
    first = command[0] if isinstance(command, list) and command else str(command or "")
    return str(first).split(" ", 1)[0] in ("registry", "controlplane", "sidecar")


def mesh_services(spec: ComposeSpec) -> dict[str, dict[str, Any]]:
    """The registry and the control plane, as `docker-compose.yml` runs them."""
    return {
        REGISTRY: {
            "image": spec.image,
            "command": [
                "registry",
                "--host",
                "0.0.0.0",
                "--port",
                "8500",
                "--data-dir",
                "/data",
                "--node",
                "registry",
            ],
            "volumes": ["tether-registry-data:/data"],
            "restart": "unless-stopped",
            "healthcheck": _healthcheck("http://127.0.0.1:8500/v1/status/leader"),
        },
        CONTROLPLANE: {
            "image": spec.image,
            "command": ["controlplane", "--host", "0.0.0.0", "--port", "15010"],
            # The mesh CA: its root key in a 0600 file of a named volume. The push and
            # CSR signing are on the TLS port (15012), which sidecars find by GET /api/v1.
            "environment": {"CONSUL_HTTP_ADDR": f"{REGISTRY}:8500", "TETHER_CA_KEY_DIR": "/ca"},
            "volumes": [f"{CA_VOLUME}:/ca"],
            "depends_on": {REGISTRY: {"condition": "service_healthy"}},
            "restart": "unless-stopped",
            "healthcheck": _healthcheck("http://127.0.0.1:15010/api/v1/health"),
        },
    }


def inject_compose(doc: Mapping[str, Any], spec: ComposeSpec) -> ComposeResult:
    """`doc` (a compose file) with a sidecar beside every app service (a copy)."""
    services = doc.get("services")
    if not isinstance(services, dict) or not services:
        raise InjectError("services: a compose file needs at least one service")
    for name in spec.ports:
        if name not in services:
            raise InjectError(f"--port {name}=...: the file has no service {name!r}")
    out = copy.deepcopy(dict(doc))
    svcs: dict[str, Any] = out["services"]
    notes: list[str] = []
    warnings: list[str] = []

    apps: dict[str, int | None] = {}
    for name, service in services.items():
        if not isinstance(service, dict):
            raise InjectError(f"services.{name}: not a mapping")
        if is_mesh_service(str(name), service):
            notes.append(f"{name}: part of the mesh, left alone")
        elif f"{name}{SIDECAR_SUFFIX}" in services:
            notes.append(f"{name}: already has {name}{SIDECAR_SUFFIX}, left alone")
        elif "network_mode" in service:
            notes.append(f"{name}: has network_mode {service['network_mode']!r}, left alone")
        else:
            apps[str(name)] = app_port(str(name), service, spec)

    # Callers reach services outside the mesh (no port: outbound-only) directly.
    direct = sorted(n for n, p in apps.items() if p is None)
    no_proxy = ",".join(["localhost", "127.0.0.1", "::1", *direct])
    proxy = f"http://127.0.0.1:{OUTBOUND_PORT}"
    added_mesh = [n for n in (REGISTRY, CONTROLPLANE) if n not in svcs]
    for name, service in mesh_services(spec).items():
        if name in added_mesh:
            svcs[name] = service
    if added_mesh:
        volumes = out.get("volumes")
        if not isinstance(volumes, dict):
            volumes = {}
            out["volumes"] = volumes
        if REGISTRY in added_mesh:
            volumes.setdefault("tether-registry-data", None)
        if CONTROLPLANE in added_mesh:
            volumes.setdefault(CA_VOLUME, None)
        notes += [f"{n}: added" for n in added_mesh]
    if CONTROLPLANE not in added_mesh and not _names_ca(svcs[CONTROLPLANE]):
        warnings.append(
            f"{CONTROLPLANE}: its environment names no CA (TETHER_CA_KEY_DIR, ...), so "
            "its CA is off and the sidecars speak plaintext; see docs/identity.md"
        )

    for name, port in apps.items():
        app = svcs[name]
        sidecar_name = f"{name}{SIDECAR_SUFFIX}"
        # `tether pod-sidecar` restarts a sidecar that died inside its container, so the
        # network namespace the app joined stays.
        command = [
            "pod-sidecar", "--", "tether",
            "sidecar", "--service", name,
            "--app-port", str(port or INBOUND_PORT),
            "--inbound-host", "0.0.0.0", "--advertise-host", name,
            "--app-check-via", "inbound",
            "--controlplane", f"http://{CONTROLPLANE}:15010",
            "--drain-seconds", f"{spec.drain_seconds:g}",
        ]  # fmt: skip
        sidecar: dict[str, Any] = {
            "image": spec.image,
            "command": command,
            # The bootstrap credential of its CSR (empty: a registry without ACLs).
            "environment": {
                "CONSUL_HTTP_ADDR": f"{REGISTRY}:8500",
                "CONSUL_HTTP_TOKEN": f"${{{token_variable(name)}:-}}",
            },
            "restart": "unless-stopped",
            "stop_grace_period": f"{int(spec.drain_seconds) + 5}s",
            "healthcheck": _healthcheck(f"http://127.0.0.1:{ADMIN_PORT}/ready"),
            "depends_on": {
                REGISTRY: {"condition": "service_healthy"},
                CONTROLPLANE: {"condition": "service_healthy"},
            },
        }
        for key in NETWORK_KEYS:
            if key in app:
                sidecar[key] = app.pop(key)
        sidecar["networks"] = _with_alias(sidecar.get("networks"), name)
        if "profiles" in app:
            sidecar["profiles"] = copy.deepcopy(app["profiles"])
        svcs[sidecar_name] = sidecar
        app["network_mode"] = f"service:{sidecar_name}"
        _depends(app)[sidecar_name] = {"condition": "service_healthy"}
        _add_env(app, {"HTTP_PROXY": proxy, "http_proxy": proxy,
                       "NO_PROXY": no_proxy, "no_proxy": no_proxy})  # fmt: skip
        if port is None:
            notes.append(f"{name}: outbound-only sidecar {sidecar_name}")
            warnings.append(
                f"{name}: no known port (no ports or expose), so its sidecar is "
                f"outbound-only and the mesh cannot call it; set --port {name}=PORT"
            )
        else:
            notes.append(f"{name}: sidecar {sidecar_name} (app port {port})")
    return ComposeResult(out, notes, warnings)


def _names_ca(service: Any) -> bool:
    return isinstance(service, dict) and bool(
        _env_names(service.get("environment")) & set(CA_VARIABLES)
    )


def is_compose(doc: Any) -> bool:
    """A compose file: top-level `services` mapping, and not a Kubernetes object."""
    return isinstance(doc, dict) and isinstance(doc.get("services"), dict) and "kind" not in doc
