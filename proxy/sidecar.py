"""The sidecar: listeners, discovery, registration and admin wired together, and its shutdown.

`Sidecar.start` brings the parts up in dependency order: the registry client and the
directory (so the first request can resolve names), the outbound and inbound listeners
(their real ports are known only once bound: port 0 works for every one), the
registration at the inbound address, then the admin listener. `Sidecar.drain` is the
SIGTERM path: not ready, deregistered, a short grace while callers' discovery catches
up, then the inbound listener stops accepting and finishes its requests before the
outbound one does (the app may still be calling out on behalf of those requests), all
within `drain_seconds`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Literal
from urllib.parse import urlsplit

from proxy.balance import build_balancer
from proxy.build_info import BUILD
from proxy.discovery import ConsulDirectory
from proxy.egress import EgressGuard
from proxy.identity_bootstrap import bootstrap_identity, control_plane_check
from proxy.registration import Registration, RegistrationSpec

log = logging.getLogger("tether.sidecar")


@dataclass
class SidecarSpec:
    """Every `tether sidecar` flag, validated."""

    service: str
    app_port: int
    app_health_path: str | None = None
    app_host: str = "127.0.0.1"
    outbound_port: int = 15001
    inbound_port: int = 15006
    admin_port: int = 15000
    inbound_host: str = "127.0.0.1"
    advertise_host: str | None = None  # what callers dial; default: inbound_host
    namespace: str = "default"
    zone: str = ""
    version: str = ""
    meta: Mapping[str, str] = field(default_factory=dict)
    controlplane: str | None = None
    egress: Literal["allow", "deny"] = "allow"
    # Egress to the mesh's own control surfaces (this sidecar's admin and inbound
    # listeners, the control plane, the registry; proxy/egress.py): denied unless an
    # operator allows it.
    egress_to_control: Literal["allow", "deny"] = "deny"
    opaque_ports: tuple[int, ...] = ()
    # What the app speaks: http (HTTP/1.1), or http2/grpc (h2c from the inbound sidecar).
    app_protocol: str = "http"
    drain_seconds: float = 15.0
    # How long after deregistering the inbound listener keeps accepting, so callers
    # whose discovery has not yet seen the removal are not refused.
    deregister_grace: float = 1.0
    check_interval: float = 5.0
    # Seconds between the stats reports sent to the control plane.
    stats_interval: float = 2.0
    # "inbound": the registry checks the app through the inbound listener (it runs in
    # another network namespace and cannot reach the app's 127.0.0.1).
    app_check_via: Literal["app", "inbound"] = "app"
    # A plaintext listener for callers outside the mesh (proxy/ingress.py), bound on
    # inbound_host; None: none.
    ingress_port: int | None = None
    # SCHED_BATCH once listening (proxy.listener.settle_process); False keeps the
    # kernel's normal policy, for hosts where wake-up latency matters more than CPU.
    sched_batch: bool = True
    registry_host: str = "127.0.0.1"
    registry_port: int = 8500
    registry_scheme: str = "http"
    registry_token: str | None = None
    # PEM roots to trust the control plane's TLS port with at bootstrap (default: the
    # bundle its plain port serves, trusted on first use).
    ca_file: str | None = None
    # A Kubernetes service-account token file for the CSR (TETHER_IDENTITY_TOKEN).
    identity_token_file: str | None = None
    # The access log (proxy/access_log.py): a path, "-" for standard output, or None;
    # the share of requests logged, and the status classes logged (empty: all).
    access_log: str | None = None
    access_log_sample: float = 1.0
    access_log_status: str = ""

    def __post_init__(self) -> None:
        errors = []
        if not 0.0 <= self.access_log_sample <= 1.0:
            errors.append(f"--access-log-sample: {self.access_log_sample} is not within 0..1")
        if self.access_log_status:
            from proxy.access_log import parse_status_classes

            try:
                parse_status_classes(self.access_log_status)
            except ValueError as e:
                errors.append(str(e))
        if not self.service or "." in self.service or "/" in self.service:
            errors.append(f"--service: {self.service!r} must be a single DNS label")
        if self.ingress_port is not None and not 0 <= self.ingress_port < 65536:
            errors.append(f"--ingress-port: {self.ingress_port} is not a valid port")
        for name in ("app_port", "outbound_port", "inbound_port", "admin_port"):
            port = getattr(self, name)
            if not 0 <= port < 65536 or (name == "app_port" and port == 0):
                errors.append(f"--{name.replace('_', '-')}: {port} is not a valid port")
        for p in self.opaque_ports:
            if not 0 < p < 65536:
                errors.append(f"--opaque-port: {p} is not a valid port")
        if self.egress not in ("allow", "deny"):
            errors.append(f"--egress: {self.egress!r} must be allow or deny")
        if self.egress_to_control not in ("allow", "deny"):
            errors.append(f"egress_to_control: {self.egress_to_control!r} must be allow or deny")
        if self.app_protocol not in ("http", "http2", "grpc"):
            errors.append(f"--app-protocol: {self.app_protocol!r} must be http, http2 or grpc")
        if self.drain_seconds < 0:
            errors.append("--drain-seconds: must not be negative")
        if not self.namespace or "." in self.namespace:
            errors.append(f"--namespace: {self.namespace!r} must be a single DNS label")
        if errors:
            raise ValueError("; ".join(errors))

    @property
    def advertised(self) -> str:
        if self.advertise_host:
            return self.advertise_host
        if self.inbound_host in ("0.0.0.0", "::", ""):
            try:
                return socket.gethostbyname(socket.gethostname())
            except OSError:  # a host name that does not resolve: say so via --advertise-host
                return "127.0.0.1"
        return self.inbound_host


def _protocol_of(defaults: Any) -> str | None:
    return getattr(defaults, "protocol", None)


def _fixed_target(host: str, port: int) -> Callable[[], tuple[str, int] | None]:
    return lambda: (host, port)


class Sidecar:
    """One sidecar process's parts; `run` serves until SIGTERM/SIGINT, then drains."""

    def __init__(self, spec: SidecarSpec) -> None:
        self.spec = spec
        self.client: Any = None
        self.directory: ConsulDirectory | None = None
        self.registration: Registration | None = None
        self.outbound: Any = None
        self.inbound: Any = None
        self.admin: Any = None
        self.stats: Any = None
        self.opaque: dict[int, Any] = {}  # app port -> its raw TCP listener
        self.ingress: Any = None
        # The plaintext health-check listener (proxy/expose.py), with mTLS and a
        # registry that checks the app from outside.
        self.expose: Any = None
        self.policy: Any = None
        self.policy_client: Any = None
        self.authz: Any = None  # proxy/authz.InboundAuthz with a control plane
        self.egress_guard = EgressGuard()
        self.tracing: Any = None  # proxy.tracing.Tracing when OTEL_TRACES_EXPORTER is set
        self.access_log: Any = None  # proxy.access_log.AccessLog with --access-log
        # proxy.otel_metrics.OtelMetrics when OTEL_METRICS_EXPORTER=otlp.
        self.otel_metrics: Any = None
        # The mesh identity (proxy/identity.py) and its TLS (proxy/tls.py): set when a
        # control plane with a CA issued this sidecar a certificate; None is plaintext.
        self.identity: Any = None
        self.mesh_tls: Any = None
        self._renewer: asyncio.Task[None] | None = None
        # Why this sidecar has no identity (said once at start), None with mTLS.
        self.plaintext_reason: str | None = None
        self.state = "PRE_INITIALIZING"
        self.started_at = time.time()

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        from proxy.registry_client import consul_aio

        spec = self.spec
        self.client = consul_aio().Consul(
            host=spec.registry_host,
            port=spec.registry_port,
            scheme=spec.registry_scheme,
            token=spec.registry_token,
            # Every watched service holds one blocking query open.
            connections_limit=600,
        )
        # Peak-EWMA by default, under the locality layer when this sidecar has a zone.
        zone = spec.zone
        self.directory = ConsulDirectory(
            self.client, balancer_factory=lambda: build_balancer(None, zone)
        )
        self.directory.start()
        await self._start_identity()
        await self._start_listeners()
        self._start_observability()
        self.registration = Registration(
            self.client,
            RegistrationSpec(
                service=spec.service,
                instance_id=self.instance_id,
                address=spec.advertised,
                port=self.inbound.port,
                app_port=spec.app_port,
                app_host=spec.app_host,
                app_health_path=spec.app_health_path,
                namespace=spec.namespace,
                zone=spec.zone,
                version=spec.version,
                protocol=spec.app_protocol,
                meta=self._meta(),
                check_interval=spec.check_interval,
                check_via=self._check_via(),
            ),
        )
        self.registration.start()
        from proxy.admin import AdminServer

        self.admin = AdminServer(self, "127.0.0.1", spec.admin_port)
        await self.admin.start()
        if spec.egress_to_control == "deny":
            self.egress_guard.protect_local("this sidecar's admin listener", self.admin.port)
        self.state = "STARTING"

    def _check_via(self) -> tuple[str, int] | None:
        spec = self.spec
        if spec.app_check_via != "inbound":
            return None
        port = self.expose.port if self.expose is not None else self.inbound.port
        return (spec.advertised, port)

    async def _start_identity(self) -> None:
        """A certificate from the control plane's CA, before any listener opens: with one,
        every hop to and from other sidecars is mTLS (proxy/identity_bootstrap.py)."""
        spec = self.spec
        got = await bootstrap_identity(
            spec.controlplane,
            spec.service,
            spec.namespace,
            token=spec.registry_token,
            ca_file=spec.ca_file,
            identity_token_file=spec.identity_token_file,
        )
        self.plaintext_reason = got.plaintext_reason
        if got.tls is None:
            return
        self.identity = got.identity
        self.mesh_tls = got.tls
        log.info("mesh identity %s (mTLS on)", got.tls.identity)
        self._renewer = asyncio.get_running_loop().create_task(got.identity.run())

    async def _start_listeners(self) -> None:
        from proxy.listener import start_expose, start_inbound, start_outbound, start_tcp_proxy
        from proxy.stats import ProxyStats

        spec = self.spec
        assert self.directory is not None
        self.stats = ProxyStats(source=f"{spec.service}.{spec.namespace}")
        if self.mesh_tls is not None:
            from proxy import tls_stats

            mesh_tls = self.mesh_tls
            self.stats.cert_expiry = lambda: tls_stats.expiry(mesh_tls)
        # With a control plane, the inbound listener enforces the service's intentions
        # (proxy/authz.py), compiled from each snapshot the policy applies.
        if spec.controlplane:
            from proxy.authz import InboundAuthz

            self.authz = InboundAuthz(spec.namespace, spec.service)
        # Inbound first: its port names the instance (registration, control plane).
        self.inbound = await start_inbound(
            spec.app_port,
            stats=self.stats,
            host=spec.inbound_host,
            port=spec.inbound_port,
            app_host=spec.app_host,
            app_protocol=spec.app_protocol,
            mesh_tls=self.mesh_tls,
            authz=self.authz,
        )
        await self._guard_control_surfaces()
        if spec.controlplane:
            self.outbound = await self._start_policy_outbound()
        else:
            self.outbound = await start_outbound(
                self.directory,
                stats=self.stats,
                host="127.0.0.1",
                port=spec.outbound_port,
                namespace=spec.namespace,
                egress=spec.egress,
                egress_guard=self.egress_guard,
            )
        if self.mesh_tls is not None and spec.app_check_via == "inbound" and spec.app_health_path:
            # The registry has no mesh certificate: its check gets a door of its own.
            self.expose = await start_expose(
                spec.app_health_path,
                spec.app_port,
                stats=self.stats,
                host=spec.inbound_host,
                app_host=spec.app_host,
            )
        if spec.ingress_port is not None:
            self.ingress = await self._start_ingress()
        # An opaque app port is exposed to the mesh as raw TCP on a port of its own,
        # advertised in Meta `opaque_ports` as "APP_PORT:LISTEN_PORT,...".
        for app_port in spec.opaque_ports:
            server = await start_tcp_proxy(
                _fixed_target(spec.app_host, app_port), host=spec.inbound_host, port=0
            )
            self.opaque[app_port] = server

    def _start_observability(self, env: Mapping[str, str] = os.environ) -> None:
        """Tracing (only when the environment asks for an exporter: otherwise the SDK is
        never imported) and the access log, on every HTTP listener."""
        spec = self.spec
        servers = [
            (name, getattr(self, name).proxy)
            for name in ("outbound", "inbound", "ingress")
            if getattr(self, name) is not None
        ]
        from proxy.trace_context import tracing_requested

        if tracing_requested(env):
            from proxy.tracing import from_env

            self.tracing = from_env(
                env, service=spec.service, namespace=spec.namespace, zone=spec.zone,
                mesh=self.policy,
            )  # fmt: skip
            if self.tracing is not None:
                for name, server in servers:
                    server.tracer = self.tracing.for_listener(name)
                log.info("tracing on: %r", self.tracing)
        if spec.access_log:
            from proxy.access_log import AccessLog, parse_status_classes

            self.access_log = AccessLog(
                spec.access_log,
                source=f"{spec.service}.{spec.namespace}",
                sample=spec.access_log_sample,
                statuses=parse_status_classes(spec.access_log_status),
            )
            self.access_log.start()
            for name, server in servers:
                server.access_log = self.access_log.for_listener(name)
        # Metrics over OTLP: the same families as /stats/prometheus (the SDK's metrics
        # imported only when asked for).
        if otel_metrics_requested(env):
            from proxy import otel_metrics

            self.otel_metrics = otel_metrics.from_env(
                env, self.prometheus, asyncio.get_running_loop(),
                service=spec.service, namespace=spec.namespace, zone=spec.zone,
            )  # fmt: skip
            log.info("metrics over OTLP: %r", self.otel_metrics)

    async def _start_ingress(self) -> Any:
        """The listener for callers outside the mesh, to this sidecar's own service."""
        from proxy.dispatch import OutboundRouter
        from proxy.downstream import TimeoutPolicy
        from proxy.listener import start_ingress
        from proxy.pool import PoolPolicy

        spec = self.spec
        assert self.directory is not None and spec.ingress_port is not None
        pool_policy = PoolPolicy(connect_timeout=TimeoutPolicy().connect)
        inner: OutboundRouter
        if self.policy is not None:
            from proxy.policy_router import PolicyRouter

            inner = PolicyRouter(
                self.directory,
                self.stats,
                self.policy,
                namespace=spec.namespace,
                egress="deny",
                pool_policy=pool_policy,
                egress_guard=self.egress_guard,
                mesh_tls=self.mesh_tls,
            )
        else:
            inner = OutboundRouter(
                self.directory,
                self.stats,
                namespace=spec.namespace,
                egress="deny",
                pool_policy=pool_policy,
                egress_guard=self.egress_guard,
                mesh_tls=self.mesh_tls,
            )
        return await start_ingress(
            inner,
            spec.service,
            spec.namespace,
            stats=self.stats,
            host=spec.inbound_host,
            port=spec.ingress_port,
        )

    async def _guard_control_surfaces(self) -> None:
        """What the app may not reach as egress (the admin port is added once bound)."""
        spec = self.spec
        if spec.egress_to_control != "deny":
            return
        guard = self.egress_guard
        guard.protect_local("this sidecar's inbound listener", self.inbound.port)
        guard.protect_local("this sidecar's admin listener", spec.admin_port)
        await guard.protect("the registry", spec.registry_host, spec.registry_port)
        if spec.controlplane:
            url = urlsplit(spec.controlplane)
            if url.hostname:
                port = url.port or (443 if url.scheme in ("https", "wss") else 80)
                await guard.protect("the control plane", url.hostname, port)

    async def _start_policy_outbound(self) -> Any:
        """The outbound listener with the control plane's routing step, and its client."""
        from proxy.policy import Policy
        from proxy.policy_client import PolicyClient
        from proxy.policy_router import start_policy_outbound
        from wire import push as protocol

        spec = self.spec
        assert self.directory is not None and spec.controlplane
        zone = spec.zone
        policy = Policy(
            self.directory,
            namespace=spec.namespace,
            zone=zone,
            balancer_factory=lambda: build_balancer(None, zone),
        )
        node = protocol.NodeIdentity(
            service=spec.service,
            namespace=spec.namespace,
            instance=self.instance_id,
            zone=spec.zone,
        )
        push_url = self.identity.push_url if self.identity is not None else None
        mesh_tls = self.mesh_tls
        self.policy_client = PolicyClient(
            push_url or spec.controlplane,
            node,
            policy,
            token=spec.registry_token,
            stats=self.stats.report,
            stats_interval=spec.stats_interval,
            on_bundle=self.identity.on_bundle if self.identity is not None else None,
            tls=(lambda: mesh_tls.client) if push_url and mesh_tls is not None else None,
            check_server=control_plane_check if push_url else None,
        )
        policy.interest = self.policy_client.want
        policy.on_applied.append(self._follow_mtls_mode)
        policy.inbound_authz = self.authz
        self.policy = policy
        # The app's own protocol may come from policy (ServiceDefaults of this service):
        # HTTP/2 callers then reach it over h2c (proxy/h2_downstream.py).
        self.policy_client.want(spec.service, spec.namespace)
        self.inbound.proxy.app_protocol = lambda: _protocol_of(
            policy.defaults(spec.namespace, spec.service)
        )
        # The Route's `at: inbound` rate limits for this sidecar's own service.
        from proxy.dispatch import InboundRouter
        from proxy.inbound_limits import InboundLimits

        router = self.inbound.router
        if isinstance(router, InboundRouter):
            router.limits = InboundLimits(policy, spec.namespace, spec.service)
        listener = await start_policy_outbound(
            self.directory,
            policy,
            stats=self.stats,
            host="127.0.0.1",
            port=spec.outbound_port,
            namespace=spec.namespace,
            egress=spec.egress,
            egress_guard=self.egress_guard,
            mesh_tls=self.mesh_tls,
        )
        self.policy_client.start()
        return listener

    def _follow_mtls_mode(self) -> None:
        """The inbound port's mTLS mode from the policy in force (strict by default)."""
        from wire.resources import effective_mtls_mode

        server: Any = getattr(self.inbound, "server", None)
        if self.mesh_tls is None or not hasattr(server, "mode"):
            return
        policy, spec = self.policy, self.spec
        defaults = policy.defaults(spec.namespace, spec.service)
        mode = effective_mtls_mode(
            policy.mesh.mtls if policy.mesh is not None else None,
            defaults.mtls if defaults is not None else None,
            spec.namespace,
        )
        if server.mode != mode:
            log.info("inbound mTLS mode: %s", mode)
            server.mode = mode

    @property
    def instance_id(self) -> str:
        return f"{self.spec.service}-{self.spec.advertised}-{self.inbound.port}"

    def _meta(self) -> dict[str, str]:
        meta = dict(self.spec.meta)
        if self.opaque:
            meta["opaque_ports"] = ",".join(f"{a}:{s.port}" for a, s in self.opaque.items())
        return meta

    def ports(self) -> dict[str, int]:
        ports = {
            "outbound": self.outbound.port if self.outbound else 0,
            "inbound": self.inbound.port if self.inbound else 0,
            "admin": self.admin.port if self.admin else 0,
        }
        if self.ingress is not None:
            ports["ingress"] = self.ingress.port
        if self.expose is not None:
            ports["check"] = self.expose.port
        return ports

    async def drain(self) -> None:
        """The SIGTERM path; returns once everything in flight finished or the deadline."""
        deadline = time.monotonic() + self.spec.drain_seconds
        self.state = "DRAINING"
        if self.registration is not None:
            await self.registration.deregister(timeout=min(3.0, self.spec.drain_seconds))
        grace = min(self.spec.deregister_grace, max(0.0, deadline - time.monotonic()))
        if grace > 0:
            await asyncio.sleep(grace)
        if self.inbound is not None:
            await self.inbound.drain(max(0.0, deadline - time.monotonic()))
        if self.ingress is not None:
            await self.ingress.drain(max(0.0, deadline - time.monotonic()))
        for server in self.opaque.values():
            await server.aclose()  # stops accepting; spliced connections run on
        if self.outbound is not None:
            await self.outbound.drain(max(0.0, deadline - time.monotonic()))

    async def aclose(self) -> None:
        if self._renewer is not None:
            self._renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renewer
        parts = (self.policy_client, self.admin, self.ingress, self.inbound, self.expose,
                 *self.opaque.values(), self.outbound, self.directory)  # fmt: skip
        for part in parts:
            if part is not None:
                with contextlib.suppress(Exception):
                    await part.aclose()
        if self.registration is not None and self.registration.registered:
            await self.registration.deregister()
        if self.client is not None:
            with contextlib.suppress(Exception):
                await self.client.close()
        # Last: the requests drained above are logged and their spans exported.
        if self.access_log is not None:
            await self.access_log.aclose()
        if self.tracing is not None:
            await asyncio.to_thread(self.tracing.shutdown)
        if self.otel_metrics is not None:
            # Its last export takes a snapshot on this loop: it must still run.
            await asyncio.to_thread(self.otel_metrics.shutdown)

    async def run(self) -> None:
        """Serve until SIGTERM or SIGINT; drain; a second signal skips the wait."""
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        try:
            await self.start()
            from proxy.listener import settle_process

            settle_process(batch=self.spec.sched_batch)
            ports = self.ports()
            reg = self.registration
            ingress = (
                f" ingress={self.spec.inbound_host}:{ports['ingress']}" if self.ingress else ""
            )
            print(
                f"tether sidecar {self.spec.service}: listening "
                f"outbound=127.0.0.1:{ports['outbound']} "
                f"inbound={self.spec.inbound_host}:{ports['inbound']} "
                f"admin=127.0.0.1:{ports['admin']} "
                f"id={reg.spec.instance_id if reg else '-'} pid={os.getpid()}{ingress} "
                f"mtls={'on' if self.mesh_tls is not None else 'off'} build={BUILD.name}",
                flush=True,
            )
            if not BUILD.compiled:  # and why (proxy/build_info.py)
                print(f"tether sidecar {self.spec.service}: {BUILD.line()}", flush=True)
            if self.plaintext_reason:
                print(
                    f"tether sidecar {self.spec.service}: plaintext between sidecars "
                    f"({self.plaintext_reason})",
                    flush=True,
                )
            await stop.wait()
            stop.clear()
            log.info("draining (up to %ss)", self.spec.drain_seconds)
            drain = asyncio.ensure_future(self.drain())
            hurry = asyncio.ensure_future(stop.wait())
            await asyncio.wait({drain, hurry}, return_when=asyncio.FIRST_COMPLETED)
            for t in (drain, hurry):
                t.cancel()
            await asyncio.gather(drain, hurry, return_exceptions=True)
        finally:
            await self.aclose()

    # -- what the admin listener shows (proxy.admin.AdminSource) -----------------------

    def readiness(self) -> tuple[bool, str]:
        if self.state == "DRAINING":
            return False, "DRAINING"
        reg, d = self.registration, self.directory
        if reg is not None and reg.registered and d is not None and d.up:
            self.state = "LIVE"
            return True, "LIVE"
        return False, self.state

    def clusters(self) -> list[dict[str, Any]]:
        return self.directory.describe() if self.directory is not None else []

    def config_dump(self) -> dict[str, Any]:
        spec = asdict(self.spec)
        spec.pop("registry_token", None)  # a secret: never shown
        spec["meta"] = dict(self.spec.meta)
        return {
            "service": self.spec.service,
            "namespace": self.spec.namespace,
            "state": self.readiness()[1],
            "pid": os.getpid(),
            "uptime_seconds": round(time.time() - self.started_at, 3),
            "listeners": self.ports(),
            "spec": spec,
            "registration": self.registration.describe() if self.registration else None,
            "opaque_ports": {str(a): s.port for a, s in self.opaque.items()},
            "policy": self.policy.describe() if self.policy is not None else None,
            "controlplane": self.policy_client.describe() if self.policy_client else None,
            "mirrors": self._mirror_counts(),
            "identity": self.identity.describe() if self.identity is not None else None,
            "authorization": self.authz.describe() if self.authz is not None else None,
            "registry": f"{self.spec.registry_scheme}://{self.spec.registry_host}:"
            f"{self.spec.registry_port}",
            "clusters": [{k: v for k, v in c.items() if k != "endpoints"} for c in self.clusters()],
        }

    def _mirror_counts(self) -> dict[str, int] | None:
        """Request copies to shadows (proxy/mirror.py): sent, failed, and not sent."""
        if self.policy is None or self.outbound is None:
            return None
        from proxy.policy_router import PolicyRouter

        router = self.outbound.router
        return dict(router.mirrors.counts) if isinstance(router, PolicyRouter) else None

    def prometheus(self) -> str:
        from proxy.stats import render_config_metrics

        if self.stats is None:
            return ""
        pc = self.policy_client
        config = render_config_metrics(
            self.policy.version if self.policy is not None else 0,
            bool(pc and pc.connected),
            pc.acks if pc else 0,
            pc.nacks if pc else 0,
            pc.last_result if pc else "none",
        )
        rendered: str = self.stats.render_prometheus()
        if self.access_log is not None:
            config += self.access_log.render_prometheus()
        if self.mesh_tls is not None:
            config += self._tls_metrics()
        return rendered + config

    def _tls_metrics(self) -> str:
        """Handshakes, the leaf's expiry, the bundle (proxy/tls_stats.py); with the
        inbound port's plaintext connections when it sorts TLS from plaintext."""
        from proxy import tls_stats

        server = getattr(self.inbound, "server", None) if self.inbound is not None else None
        served = getattr(server, "plaintext_served", None)
        refused = getattr(server, "plaintext_refused", None)
        plaintext = (served, refused) if served is not None and refused is not None else None
        return tls_stats.render(self.mesh_tls, plaintext)

    def __repr__(self) -> str:
        return f"<Sidecar {self.spec.service} {self.state} ports={self.ports()}>"


def otel_metrics_requested(env: Mapping[str, str]) -> bool:
    """Whether `OTEL_METRICS_EXPORTER` asks for OTLP over HTTP/protobuf. Other exporters
    (or protocols) get one warning each and are not used: metrics stay at
    /stats/prometheus."""
    names = [n.strip().lower() for n in env.get("OTEL_METRICS_EXPORTER", "").split(",")]
    names = [n for n in names if n and n != "none"]
    others = [n for n in names if n != "otlp"]
    if others:
        log.warning(
            "OTEL_METRICS_EXPORTER=%s: only otlp is supported; %s ignored "
            "(metrics stay at /stats/prometheus)",
            ",".join(names),
            ",".join(others),
        )
    if "otlp" not in names:
        return False
    protocol = (
        env.get("OTEL_EXPORTER_OTLP_METRICS_PROTOCOL")
        or env.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        or "http/protobuf"
    ).strip()
    if protocol != "http/protobuf":
        log.warning(
            "OTEL_EXPORTER_OTLP_PROTOCOL=%s: only http/protobuf is supported; "
            "metrics are not exported over OTLP",
            protocol,
        )
        return False
    return True
