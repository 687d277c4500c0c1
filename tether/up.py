"""`tether up`: a live local mesh: the registry, the demo apps, a sidecar each, a live view.

Everything runs as child processes of one `Launcher` (the mechanism `tether run`
shares): the registry first (8500 if free, else any free port; state in a temporary
directory), the control plane, then per instance its app and its sidecar. The app
listens on 127.0.0.1 with `HTTP_PROXY` pointing at its sidecar's outbound listener, so
`frontend` calls `http://orders/...` through the mesh. Once the callees are ready, the
policies of the demo are applied through the control plane's REST API (the
path `tether apply` takes: validated there, stored, pushed), then `frontend` starts.
The policies are the demo's own, shipped in the package (`tether/demo/policies/`).
Each server child is awaited by its "listening on" line, not by its port answering:
another process on that port must not pass for ours (the demo would register into
someone else's registry). Any child that exits before the mesh is ready stops
`tether up` with one line naming it and its reason; nothing has been written by then.
The view reads every sidecar's admin `/stats/prometheus` and `/config_dump` once a
second and the TrafficSplit of `orders` from the control plane, and shows where the
calls go: per instance (zone, version, share of its service), per version against the
split's weights, per zone as the caller's locality layer chose. Ctrl-C drains the
sidecars (they deregister while the registry is still up), stops the apps, then the
registry, and removes the state.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tether.launcher import Launcher, ProcessSpec
from tether.ports import free_port, port_is_free

ROOT = Path(__file__).resolve().parent.parent
DEMO_POLICIES = Path(__file__).resolve().parent / "demo" / "policies"
# What a server child prints once it listens (tether registry, tether controlplane).
LISTENING = r"listening on https?://\S+:(\d+)"


class UpError(Exception):
    """`tether up` cannot go on: one line naming the part, the cause and the fix."""


@dataclass
class Instance:
    """One demo instance: its app and the ports of its sidecar."""

    service: str
    name: str
    zone: str
    version: str
    app_port: int = 0
    outbound: int = 0
    inbound: int = 0
    admin: int = 0
    ingress: int = 0  # frontend's: where outside callers (curl, a browser) come in
    ready: bool = False
    inbound_total: float = 0.0
    inbound_errors: float = 0.0
    outbound_total: float = 0.0
    rate: float = 0.0
    history: deque[tuple[float, float]] = field(default_factory=lambda: deque(maxlen=10))
    policy_version: int = 0  # config version of the snapshot its sidecar runs (0: none)
    app_pid: int = 0
    app_health: str = ""  # the registry's check of the app: passing, critical, ...

    @property
    def recent(self) -> float:
        """Calls in over the history window (all of them before there is a window)."""
        if len(self.history) < 2:
            return self.inbound_total
        return self.inbound_total - self.history[0][1]

    def labels(self) -> dict[str, str]:
        """What a subset selector can match: the Meta its sidecar registers."""
        return {"version": self.version, "zone": self.zone, "instance": self.name}


@dataclass(frozen=True)
class SplitShare:
    """One subset of a TrafficSplit: its configured weight and the share it got."""

    name: str
    weight: int
    share: float  # of the service's recent calls in, 0..1 (0 when there were none)


def split_shares(
    instances: list[Instance], service: str, subsets: list[dict[str, Any]]
) -> list[SplitShare]:
    """The recent calls in of `service`, per subset of its split (selector ⊆ labels)."""
    mine = [i for i in instances if i.service == service]
    total = sum(i.recent for i in mine)
    out = []
    for sub in subsets:
        selector = sub.get("selector") or {}
        calls = sum(
            i.recent for i in mine if all(i.labels().get(k) == v for k, v in selector.items())
        )
        out.append(
            SplitShare(
                str(sub.get("name", "?")),
                int(sub.get("weight", 0)),
                calls / total if total else 0.0,
            )
        )
    return out


def zone_shares(instances: list[Instance], service: str) -> dict[str, float]:
    """The recent calls in of `service`, per zone (0..1 each)."""
    mine = [i for i in instances if i.service == service]
    total = sum(i.recent for i in mine)
    zones: dict[str, float] = {}
    for i in mine:
        zones[i.zone] = zones.get(i.zone, 0.0) + (i.recent / total if total else 0.0)
    return dict(sorted(zones.items()))


def describe_split(shares: list[SplitShare]) -> str:
    got = " · ".join(f"{s.name} {s.share:.0%}" for s in shares)
    want = " · ".join(f"{s.name} {s.weight}%" for s in shares)
    return f"{got}   (configured: {want})"


def describe_zones(zones: dict[str, float]) -> str:
    return " · ".join(f"{z or '-'} {share:.0%}" for z, share in zones.items())


# frontend → orders → inventory. orders runs v1 and v2 (the canary of
# tether/demo/policies/) in each of two zones, so the caller's zone preference and the
# split both show, and each version can fail over to the other zone.
DEMO: tuple[tuple[str, str, str, str], ...] = (
    ("frontend", "frontend-1", "zone-a", "v1"),
    ("orders", "orders-1", "zone-a", "v1"),
    ("orders", "orders-2", "zone-b", "v1"),
    ("orders", "orders-3", "zone-b", "v2"),
    ("orders", "orders-4", "zone-a", "v2"),
    ("inventory", "inventory-1", "zone-a", "v1"),
)
SPLIT_SERVICE = "orders"  # whose TrafficSplit the view compares with the traffic


@dataclass
class UpSpec:
    """How `tether up` runs (its flags)."""

    registry_port: int | None = None  # None: 8500 if free, else any free port
    rate: float = 2.0  # requests/s the frontend drives
    drain_seconds: float = 5.0
    view: bool | None = None  # None: a live view when stdout is a terminal
    check_interval: float = 2.0
    # A control plane too (15010 if free), so `tether apply -f tether/demo/policies/`
    # steers the demo's traffic (the v1/v2 canary of orders).
    controlplane: bool = True
    controlplane_port: int | None = None  # None: 15010 if free, else any free port
    # Applied through the control plane once the callees are ready (None: nothing).
    policies: Path | None = DEMO_POLICIES


def _chosen_port(name: str, given: int | None, preferred: int, flag: str) -> int:
    """The port to start a server child on: the one given (0: any), else `preferred` if
    free, else any. A given port already in use fails here, before anything starts."""
    if given is None:
        return preferred if port_is_free(preferred) else 0
    if given and not port_is_free(given):
        raise UpError(f"{name} cannot start: port {given} is in use; pass {flag} 0 (any free port)")
    return given


def parse_prometheus(text: str) -> list[tuple[str, dict[str, str], float]]:
    """Samples of Prometheus' text format: (name, labels, value)."""
    samples = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        head, _, value = line.rpartition(" ")
        name, labels = head, {}
        if "{" in head:
            name, _, rest = head.partition("{")
            for part in rest.rstrip("}").split('",'):
                k, _, v = part.partition("=")
                if k:
                    labels[k.strip()] = v.strip().strip('"')
        with contextlib.suppress(ValueError):
            samples.append((name.strip(), labels, float(value)))
    return samples


def request_counts(text: str) -> tuple[float, float, float]:
    """(inbound requests, inbound 5xx, outbound requests) from a sidecar's metrics."""
    inbound = errors = outbound = 0.0
    for name, labels, value in parse_prometheus(text):
        if not name.endswith("requests_total"):
            continue
        direction = labels.get("direction") or labels.get("listener") or ""
        if direction.startswith("in"):
            inbound += value
            if labels.get("status_class", "").startswith("5"):
                errors += value
        elif direction.startswith("out"):
            outbound += value
    return inbound, errors, outbound


class Mesh:
    """The running local mesh."""

    def __init__(self, spec: UpSpec, sink: Callable[[str, str], None]) -> None:
        self.spec = spec
        self.launcher = Launcher(sink)
        self.instances = [Instance(*row) for row in DEMO]
        self.registry_port = 0
        self.cp_port = 0
        self.data_dir = Path(tempfile.mkdtemp(prefix="tether-up-"))
        self.sink = sink
        self.policy_status = ""  # what applying the policies gave, for the view
        self.config_version = 0  # the control plane's, read with every poll
        self.split: list[dict[str, Any]] = []  # SPLIT_SERVICE's subsets, from the CP

    async def start(self, session: Any) -> None:
        """Start the registry, the control plane, every sidecar (and the callees' apps),
        apply the policies once the sidecars are registered, then start frontend's app,
        which drives the traffic: its first calls find their services and policies."""
        spec = self.spec
        py = sys.executable
        port = _chosen_port("registry", spec.registry_port, 8500, "--registry-port")
        await self.launcher.start(
            ProcessSpec(
                "registry",
                [py, "-m", "tether.cli", "registry", "--port", str(port),
                 "--data-dir", str(self.data_dir / "registry"), "--node", "local"],
                stop_timeout=5.0,
            )
        )  # fmt: skip
        self.registry_port = await self.listening("registry")
        registry_env = {"CONSUL_HTTP_ADDR": f"127.0.0.1:{self.registry_port}"}
        sidecar_extra: list[str] = []
        if spec.controlplane:
            port = _chosen_port(
                "controlplane", spec.controlplane_port, 15010, "--controlplane-port"
            )
            await self.launcher.start(
                ProcessSpec(
                    "controlplane",
                    # The push and CSR signing port (TLS): 15012 when free, else any;
                    # sidecars find it through GET /api/v1.
                    [
                        py,
                        "-m",
                        "tether.cli",
                        "controlplane",
                        "--port",
                        str(port),
                        "--tls-port",
                        str(15012 if port_is_free(15012) else 0),
                    ],
                    # The mesh CA, its root key in a 0600 file of this run's directory:
                    # every sidecar gets a certificate and the hops between them are mTLS.
                    env={**registry_env, "TETHER_CA_KEY_DIR": str(self.data_dir / "ca")},
                    stop_timeout=5.0,
                )
            )
            self.cp_port = await self.listening("controlplane")
            sidecar_extra = ["--controlplane", f"http://127.0.0.1:{self.cp_port}"]
        for inst in self.instances:
            inst.app_port, inst.outbound = free_port(), free_port()
            inst.inbound, inst.admin = free_port(), free_port()
            if inst.service == "frontend":
                inst.ingress = free_port()
                # Its sidecar now (registered when the policies are checked against the
                # registry), its app, which drives the traffic, once the policies are in.
                await self.start_sidecar(inst, sidecar_extra, registry_env)
            else:  # the app first: its sidecar then registers it passing at once
                await self.start_app(inst)
                await self.start_sidecar(inst, sidecar_extra, registry_env)
        await self.wait_ready(session, 30, apps=False)  # frontend's app is not started
        if self.cp_port and spec.policies is not None:
            await self.apply_policies(session, spec.policies)
        for inst in self.instances:
            if inst.service == "frontend":
                await self.start_app(inst)

    async def start_app(self, inst: Instance) -> None:
        """The demo app of `inst`, calling out through its sidecar (HTTP_PROXY)."""
        rate = self.spec.rate if inst.service == "frontend" else 0.0
        app = await self.launcher.start(
            ProcessSpec(
                inst.name,
                [sys.executable, "-m", f"tether.demo.{inst.service}",
                 "--port", str(inst.app_port), "--instance", inst.name, "--zone", inst.zone,
                 "--version", inst.version, "--rate", str(rate),
                 "--wait-for", f"http://127.0.0.1:{inst.admin}/ready"],
                env={
                    "HTTP_PROXY": f"http://127.0.0.1:{inst.outbound}",
                    "http_proxy": f"http://127.0.0.1:{inst.outbound}",
                    "NO_PROXY": "localhost,127.0.0.1",
                    "no_proxy": "localhost,127.0.0.1",
                },
                stop_timeout=5.0,
            )
        )  # fmt: skip
        inst.app_pid = app.pid

    async def start_sidecar(
        self, inst: Instance, extra: list[str], registry_env: dict[str, str]
    ) -> None:
        spec = self.spec
        await self.launcher.start(
            ProcessSpec(
                f"{inst.name}.sidecar",
                [sys.executable, "-m", "tether.cli", "sidecar", "--service", inst.service,
                 "--app-port", str(inst.app_port), "--app-health-path", "/health",
                 "--outbound-port", str(inst.outbound), "--inbound-port", str(inst.inbound),
                 "--admin-port", str(inst.admin), "--zone", inst.zone,
                 "--version", inst.version, "--meta", f"instance={inst.name}",
                 "--drain-seconds", str(spec.drain_seconds),
                 "--check-interval", str(spec.check_interval), *extra,
                 *(["--ingress-port", str(inst.ingress)] if inst.ingress else [])],
                env=registry_env,
                stop_timeout=spec.drain_seconds + 5.0,
            )
        )  # fmt: skip

    async def listening(self, name: str) -> int:
        """The port child `name` says it listens on; UpError if it exits first."""
        from tether.launcher import ChildExitedError

        try:
            m = await self.launcher.wait_for_line(name, LISTENING, 30)
        except ChildExitedError as exc:
            raise UpError(f"{name} did not start: {exc.reason}") from None
        except TimeoutError:
            raise UpError(f"{name} did not say it was listening within 30 s") from None
        return int(m.group(1))

    async def apply_policies(self, session: Any, path: Path) -> bool:
        """Apply the policy files under `path` as `tether apply -f` does: the control
        plane validates, stores and pushes them. A rejection is reported, not fatal."""
        import aiohttp

        from controlplane.operator import InputError, read_inputs

        url = f"http://127.0.0.1:{self.cp_port}/api/v1/apply"
        try:
            files = read_inputs([str(path)])
            body = {"files": [{"name": n, "text": t} for n, t in files]}
            async with session.post(url, json=body, timeout=aiohttp.ClientTimeout(30)) as resp:
                result = await resp.json(content_type=None)
                ok = resp.status == 200
        except (InputError, aiohttp.ClientError, OSError, ValueError, TimeoutError) as exc:
            self.policy_status = f"not applied: {type(exc).__name__}: {exc}"
            self.sink("policies", self.policy_status)
            return False
        if not ok or not isinstance(result, dict):
            message = result.get("message", result) if isinstance(result, dict) else result
            self.policy_status = f"rejected: {message}"
            self.sink("policies", self.policy_status)
            problems = result.get("problems") if isinstance(result, dict) else None
            for prob in problems if isinstance(problems, list) else ():
                where = ":".join(str(prob.get(k)) for k in ("file", "line") if prob.get(k))
                self.sink("policies", f"{where} {prob.get('path', '')}: {prob.get('message')}")
            return False
        for c in result.get("changes") or ():
            ns = f"{c['namespace']}/" if c.get("namespace") else ""
            self.sink("policies", f"{c['kind'].lower()} {ns}{c['name']} {c['action']}")
        for w in result.get("warnings") or ():
            self.sink("policies", f"warning: {w.get('message', w)}")
        n = len(result.get("changes") or ())
        self.config_version = int(result["version"])
        self.policy_status = f"{n} from {path.name} applied"
        self.sink("policies", f"applied {path}: config version {result['version']}")
        return True

    async def refresh_app_health(self, session: Any) -> None:
        """Each instance's app check as the registry sees it (the instance Meta names it)."""
        base = f"http://127.0.0.1:{self.registry_port}/v1/health/service"
        for service in sorted({i.service for i in self.instances}):
            try:
                async with session.get(f"{base}/{service}") as resp:
                    entries = await resp.json(content_type=None)
            except Exception:
                return  # the registry is away: keep what it said last
            status: dict[str, str] = {}
            for e in entries if isinstance(entries, list) else ():
                name = ((e.get("Service") or {}).get("Meta") or {}).get("instance", "")
                for check in e.get("Checks") or ():
                    if str(check.get("CheckID", "")).endswith(":app"):
                        status[name] = str(check.get("Status", ""))
            for i in self.instances:
                if i.service == service:
                    i.app_health = status.get(i.name, "")  # "": not registered

    async def refresh_version(self, session: Any) -> None:
        """The config version in force (moves with every `tether apply`)."""
        if not self.cp_port:
            return
        try:
            async with session.get(f"http://127.0.0.1:{self.cp_port}/api/v1/version") as resp:
                body = await resp.json(content_type=None)
            self.config_version = int(body["version"])
        except Exception:
            return  # the control plane is away: keep showing what it said last

    async def refresh_split(self, session: Any) -> None:
        """The configured subsets of SPLIT_SERVICE's TrafficSplit (empty: none)."""
        if not self.cp_port:
            return
        url = (
            f"http://127.0.0.1:{self.cp_port}/api/v1/resources/TrafficSplit/default/{SPLIT_SERVICE}"
        )
        try:
            async with session.get(url) as resp:
                if resp.status == 404:
                    self.split = []
                    return
                doc = await resp.json(content_type=None)
        except Exception:
            return  # the control plane is away: keep showing what it said last
        subsets = (doc.get("spec") or {}).get("subsets") if isinstance(doc, dict) else None
        if isinstance(subsets, list):
            self.split = [s for s in subsets if isinstance(s, dict)]

    async def poll(self, session: Any) -> None:
        """Refresh readiness and request counts of every sidecar (one round)."""

        async def one(inst: Instance) -> None:
            base = f"http://127.0.0.1:{inst.admin}"
            try:
                async with session.get(f"{base}/ready") as r:
                    inst.ready = r.status == 200
                async with session.get(f"{base}/stats/prometheus") as r:
                    text = await r.text()
                if self.cp_port:
                    async with session.get(f"{base}/config_dump") as r:
                        dump = await r.json(content_type=None)
                    inst.policy_version = int((dump.get("policy") or {}).get("version") or 0)
            except Exception:
                inst.ready = False
                return
            inst.inbound_total, inst.inbound_errors, inst.outbound_total = request_counts(text)
            now = time.monotonic()
            inst.history.append((now, inst.inbound_total))
            t0, n0 = inst.history[0]
            inst.rate = (inst.inbound_total - n0) / (now - t0) if now > t0 else 0.0

        await asyncio.gather(
            *(one(i) for i in self.instances),
            self.refresh_split(session),
            self.refresh_version(session),
            self.refresh_app_health(session),
        )

    async def wait_ready(self, session: Any, timeout: float, apps: bool = True) -> bool:
        """Until every sidecar is ready (registered, discovery up) and, with `apps`,
        the registry's check of every app passes (callers then find it healthy)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            await self.poll(session)
            if all(i.ready and (i.app_health == "passing" or not apps) for i in self.instances):
                return True
            await asyncio.sleep(0.2)
        return False

    def where_calls_go(self) -> list[str]:
        """Lines on where SPLIT_SERVICE's calls went lately: by version, by zone."""
        front = self.instances[0]
        hist = front.history
        window = f"last {hist[-1][0] - hist[0][0]:.0f} s" if len(hist) > 1 else "so far"
        lines = []
        if self.split:
            shares = split_shares(self.instances, SPLIT_SERVICE, self.split)
            lines.append(f"{SPLIT_SERVICE} split ({window}): {describe_split(shares)}")
        zones = describe_zones(zone_shares(self.instances, SPLIT_SERVICE))
        lines.append(f"{SPLIT_SERVICE} by zone ({front.name} is in {front.zone}): {zones}")
        return lines

    def describe_policies(self) -> str:
        applied = self.policy_status or "no policies applied at start"
        return f"{applied}; config version {self.config_version}"

    def listing(self) -> list[str]:
        lines = [f"registry     http://127.0.0.1:{self.registry_port}  (CONSUL_HTTP_ADDR)"]
        if self.cp_port:
            cp = f"http://127.0.0.1:{self.cp_port}"
            lines.append(f"controlplane {cp}  ({self.describe_policies()}; change with: "
                         f"tether apply -f FILE --controlplane {cp})")  # fmt: skip
            lines.append(f"dashboard    {cp}/ui/  (or: tether top --controlplane {cp})")
        for i in self.instances:
            lines.append(
                f"{i.name:<12} {i.service} {i.version} {i.zone}  app=127.0.0.1:{i.app_port} "
                f"outbound=127.0.0.1:{i.outbound} inbound=127.0.0.1:{i.inbound} "
                f"admin=127.0.0.1:{i.admin} pid={i.app_pid}"
            )
        front = self.instances[0]
        lines.append(f"try: curl http://127.0.0.1:{front.ingress}/   (frontend's ingress)")
        local = [i for i in self.instances if i.service == SPLIT_SERVICE and i.zone == front.zone]
        if local:
            pids = " ".join(str(i.app_pid) for i in local)
            lines.append(
                f"failover: kill {pids}   (the {SPLIT_SERVICE} apps in {front.zone}: their"
                f" checks fail and {front.name}'s calls move to the other zone)"
            )
        return lines

    async def stop(self) -> None:
        """Drain the sidecars, stop the apps, then the registry; remove the state."""
        sidecars = [f"{i.name}.sidecar" for i in self.instances]
        apps = [i.name for i in self.instances]
        try:
            # Sidecars deregister and drain while the apps and the registry still run.
            await self.launcher.stop_all(sidecars)
            await self.launcher.stop_all(apps)
            await self.launcher.aclose()
        finally:
            shutil.rmtree(self.data_dir, ignore_errors=True)


def render(mesh: Mesh, logs: deque[str]) -> Any:
    from rich import box
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    # Fits 80 columns: light borders, short headers. sidecar: up (ready) or down; app: the
    # registry's check of the app; config: the config version of the snapshot the
    # sidecar runs; in, out: calls in and out.
    table = Table(
        title=f"tether up: registry 127.0.0.1:{mesh.registry_port}",
        expand=False,
        box=box.SIMPLE_HEAD,
        padding=(0, 0, 0, 0),  # the box's column separator is the only gap
        show_edge=False,
    )
    cols = ("instance", "service", "zone", "sidecar", "app", "config", "in", "share", "/s",
            "5xx", "out")  # fmt: skip
    for col in cols:
        right = col in ("in", "share", "/s", "5xx", "out")
        table.add_column(col, justify="right" if right else "left", no_wrap=True)
    per_service: dict[str, float] = {}
    recent: dict[str, float] = {}
    for i in mesh.instances:
        per_service[i.service] = per_service.get(i.service, 0.0) + i.inbound_total
        recent[i.service] = recent.get(i.service, 0.0) + i.recent
    for i in mesh.instances:
        share = i.recent / recent[i.service] if recent[i.service] else 0.0
        table.add_row(
            i.name, f"{i.service} {i.version}", i.zone,
            Text("up", "green") if i.ready else Text("down", "red"),
            Text(i.app_health or "-", "green" if i.app_health == "passing" else "red"),
            str(i.policy_version) if i.policy_version else "-",
            f"{i.inbound_total:.0f}", f"{share:.0%}", f"{i.rate:.1f}",
            f"{i.inbound_errors:.0f}", f"{i.outbound_total:.0f}",
        )  # fmt: skip
    totals = "  ".join(f"{svc}: {n:.0f}" for svc, n in per_service.items())
    front = mesh.instances[0]
    policies = f"policies: {mesh.describe_policies()}\n" if mesh.cp_port else ""
    where = "".join(f"{line}\n" for line in mesh.where_calls_go())
    hint = Text(
        f"calls per service: {totals}\n{where}{policies}"
        f"try: curl http://127.0.0.1:{front.ingress}/   (Ctrl-C stops)"
    )
    tail = [Text(line, style="dim", no_wrap=True, overflow="ellipsis") for line in logs]
    return Group(table, hint, *tail)


async def run_up(spec: UpSpec) -> int:
    import aiohttp

    view = spec.view if spec.view is not None else sys.stdout.isatty()
    logs: deque[str] = deque(maxlen=8)

    def sink(name: str, line: str) -> None:
        if view:
            logs.append(f"{name:>20} | {line}")
        else:
            print(f"{name:>20} | {line}", flush=True)

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    mesh = Mesh(spec, sink)
    stopping = False
    started = False
    failed = asyncio.Event()  # a child exited before the mesh was ready
    failure = ""

    async def watch_exits() -> None:
        nonlocal failure
        from tether.launcher import ChildExitedError

        while True:
            child = await mesh.launcher.next_exit()
            if stopping:
                continue
            if not started:  # nothing may go on half-started: stop, and say who and why
                failure = f"{child.name} did not start: {ChildExitedError(child).reason}"
                failed.set()
            else:  # a crash, not our doing: say so where the user looks
                sink("tether up", f"{child.name} exited with status {child.returncode}")

    async def serve(session: Any) -> None:
        nonlocal started
        await mesh.start(session)
        ready = await mesh.wait_ready(session, 60)
        started = True
        print("\n".join(mesh.listing()), flush=True)
        print("tether up: ready" if ready else "tether up: not every sidecar is ready yet",
              flush=True)  # fmt: skip
        if view:
            from rich.live import Live

            with Live(render(mesh, logs), refresh_per_second=2, screen=False) as live:
                while True:
                    await mesh.poll(session)
                    live.update(render(mesh, logs))
                    await asyncio.sleep(1.0)
        last = 0.0
        while True:
            await asyncio.sleep(1.0)
            if time.monotonic() - last >= 10:
                last = time.monotonic()
                await mesh.poll(session)
                calls = ", ".join(f"{i.name}={i.inbound_total:.0f}" for i in mesh.instances)
                print(f"tether up: calls in: {calls}", flush=True)
                for line in mesh.where_calls_go():
                    print(f"tether up: {line}", flush=True)

    code = 0
    watcher = asyncio.ensure_future(watch_exits())
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
            # Ctrl-C is honoured at any point, during start-up too.
            main_task = asyncio.ensure_future(serve(session))
            stopper = asyncio.ensure_future(stop.wait())
            crashed = asyncio.ensure_future(failed.wait())
            await asyncio.wait({main_task, stopper, crashed}, return_when=asyncio.FIRST_COMPLETED)
            for t in (main_task, stopper, crashed):
                t.cancel()
            await asyncio.gather(stopper, crashed, return_exceptions=True)
            try:
                await main_task
            except asyncio.CancelledError:
                pass
            if failure:
                raise UpError(failure)
    except UpError as exc:
        print(f"tether up: {exc}", file=sys.stderr, flush=True)
        code = 1
    except Exception as exc:
        print(f"tether up: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        code = 1
    finally:
        stopping = True
        if mesh.launcher.children:
            print("tether up: draining and stopping everything ...", flush=True)
        # A second Ctrl-C must not cut the shutdown short and leave processes behind.
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, lambda: None)
        await mesh.stop()
        watcher.cancel()
        if mesh.launcher.children:
            print("tether up: stopped", flush=True)
    return code


def main(spec: UpSpec) -> None:
    import uvloop

    raise SystemExit(uvloop.run(run_up(spec)))
