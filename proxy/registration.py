"""Registration: the sidecar's instance in the registry, its checks, and its removal.

The instance is service `NAME` at the sidecar's inbound address (callers reach the app
only through its sidecar), with Tags `[version]` and Meta `{namespace, zone, version,
app_port, protocol}` plus the operator's `--meta`. It carries two checks: one the
registry runs against the app (HTTP on the health path, or TCP on the app port), and
a TTL check this sidecar keeps passing, so an instance whose sidecar died turns
critical and leaves rotation even when its app is still up.

Everything goes through `consul.aio` (`/v1/agent/service/register`,
`/v1/agent/check/pass/:id`, `/v1/agent/service/deregister/:id`), so it works the same
against the embedded registry and a real Consul agent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from proxy.backoff import BackoffPolicy

log = logging.getLogger("tether.registration")


def _go_duration(seconds: float) -> str:
    return f"{int(seconds * 1000)}ms" if seconds < 1 or seconds % 1 else f"{int(seconds)}s"


@dataclass
class RegistrationSpec:
    """What is registered: the instance, where it is reached, and how it is checked."""

    service: str
    address: str  # the sidecar's inbound listener, as callers reach it
    port: int
    app_port: int
    app_host: str = "127.0.0.1"
    app_health_path: str | None = None
    # Where the registry runs the app check. None: the app itself (the registry shares
    # its host); (advertised address, inbound port): through the inbound listener, for
    # a registry in another network namespace (containers), as callers reach the app.
    check_via: tuple[str, int] | None = None
    namespace: str = "default"
    zone: str = ""
    version: str = ""
    protocol: str = "http"
    meta: Mapping[str, str] = field(default_factory=dict)
    weight: int = 1
    instance_id: str = ""  # default: NAME-ADDRESS-PORT
    check_interval: float = 5.0
    check_timeout: float = 2.0
    ttl: float = 10.0
    # Consul's floor is one minute; a dead sidecar's instance is removed after it.
    deregister_critical_after: float = 60.0

    def __post_init__(self) -> None:
        if not self.instance_id:
            self.instance_id = f"{self.service}-{self.address}-{self.port}"

    @property
    def app_check_id(self) -> str:
        return f"service:{self.instance_id}:app"

    @property
    def ttl_check_id(self) -> str:
        return f"service:{self.instance_id}:sidecar"

    def service_meta(self) -> dict[str, str]:
        meta = dict(self.meta)
        # The sidecar's own keys win: discovery and routing depend on them.
        meta.update(
            {
                "namespace": self.namespace,
                "zone": self.zone,
                "version": self.version,
                "app_port": str(self.app_port),
                "protocol": self.protocol,
            }
        )
        return meta

    def app_check(self, status: str | None) -> dict[str, Any]:
        check: dict[str, Any] = {
            "CheckID": self.app_check_id,
            "Interval": _go_duration(self.check_interval),
            "Timeout": _go_duration(self.check_timeout),
        }
        host, port = self.check_via or (self.app_host, self.app_port)
        if self.app_health_path:
            path = "/" + self.app_health_path.lstrip("/")
            check["Name"] = f"app HTTP {path}"
            check["HTTP"] = f"http://{host}:{port}{path}"
        else:
            check["Name"] = f"app TCP {self.app_port}"
            check["TCP"] = f"{host}:{port}"
        if status:
            check["Status"] = status
        return check

    def ttl_check(self) -> dict[str, Any]:
        return {
            "CheckID": self.ttl_check_id,
            "Name": "sidecar alive",
            "TTL": _go_duration(self.ttl),
            "Status": "passing",
            "DeregisterCriticalServiceAfter": _go_duration(self.deregister_critical_after),
        }

    def payload(self, app_status: str | None = None) -> dict[str, Any]:
        """The `/v1/agent/service/register` body, as Consul documents it."""
        return {
            "Name": self.service,
            "ID": self.instance_id,
            "Address": self.address,
            "Port": self.port,
            "Tags": [self.version] if self.version else [],
            "Meta": self.service_meta(),
            "Weights": {"Passing": self.weight, "Warning": 1},
            "Checks": [self.app_check(app_status), self.ttl_check()],
        }


async def probe_app(spec: RegistrationSpec, timeout: float = 2.0) -> bool:
    """Whether the app answers its health check now (so it can start out passing)."""
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(spec.app_host, spec.app_port)
            try:
                if not spec.app_health_path:
                    return True
                path = "/" + spec.app_health_path.lstrip("/")
                writer.write(
                    f"GET {path} HTTP/1.1\r\nHost: {spec.app_host}:{spec.app_port}\r\n"
                    "User-Agent: tether-sidecar\r\nConnection: close\r\n\r\n".encode("latin-1")
                )
                line = await reader.readline()
                parts = line.split()
                # Consul's rule: 2xx passes (429 warns, anything else is critical).
                return len(parts) >= 2 and parts[1][:1] == b"2" and len(parts[1]) == 3
            finally:
                writer.close()
                with contextlib.suppress(Exception):
                    await writer.wait_closed()
    except (OSError, TimeoutError, ValueError):
        return False


class Registration:
    """Keeps one instance registered and its TTL check passing until `deregister`."""

    def __init__(
        self,
        client: Any,
        spec: RegistrationSpec,
        *,
        backoff: BackoffPolicy | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.client = client
        self.spec = spec
        self.backoff = backoff or BackoffPolicy(base=0.2, cap=5.0)
        self.rng = rng or random.Random()
        self.registered = False
        self.deregistered = False
        self.last_error: str | None = None
        self.registrations = 0  # how many times it was (re-)registered
        self.app_status: str | None = None  # the registry's app check, as last read
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Register in the background (retrying until the registry answers), then heartbeat."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name=f"registration:{self.spec.instance_id}"
            )

    async def wait_registered(self, timeout: float) -> bool:
        async with asyncio.timeout(timeout):
            while not self.registered:
                await asyncio.sleep(0.02)
        return True

    async def register_once(self) -> None:
        spec = self.spec
        # A sidecar that just saw its app healthy registers it as passing, so callers
        # can use it at once instead of after the registry's first check interval.
        healthy = await probe_app(spec)
        payload = spec.payload("passing" if healthy else None)
        ok = await self.client.agent.service.register(
            spec.service,
            service_id=payload["ID"],
            address=payload["Address"],
            port=payload["Port"],
            tags=payload["Tags"],
            meta=payload["Meta"],
            weights=payload["Weights"],
            check=payload["Checks"][0],
            extra_checks=payload["Checks"][1:],
            replace_existing_checks=True,
        )
        if not ok:
            raise RuntimeError("registry refused the registration")
        self.registrations += 1
        self.registered = True
        self.last_error = None
        log.info("registered %s at %s:%d", spec.instance_id, spec.address, spec.port)

    async def _run(self) -> None:
        attempt = 0
        heartbeat = max(0.2, self.spec.ttl / 3)
        while not self.deregistered:
            try:
                async with asyncio.timeout(10):
                    if not self.registered:
                        await self.register_once()
                    elif not await self.client.agent.check.ttl_pass(
                        self.spec.ttl_check_id, "sidecar running"
                    ):
                        # 404: the registry lost the instance (restarted without its
                        # data, or reaped it while we were cut off). Register again.
                        log.warning("registry forgot %s; registering again", self.spec.instance_id)
                        await self.register_once()
                    else:
                        await self._note_app_check()
                attempt = 0
                await asyncio.sleep(heartbeat)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.last_error = f"{type(exc).__name__}: {exc}"
                if attempt == 0:
                    log.warning("registration of %s: %s", self.spec.instance_id, self.last_error)
                await asyncio.sleep(self.backoff.delay(attempt, self.rng))
                attempt += 1

    async def _note_app_check(self) -> None:
        """Log when the registry's check of the app turns critical (and back): callers
        are steered away from this instance then, and the app's own log may say nothing."""
        check_id = self.spec.app_check_id
        checks = await self.client.agent.checks(filter_expr=f'CheckID == "{check_id}"')
        check = (checks or {}).get(check_id) or {}
        status = check.get("Status")
        if status == self.app_status or status is None:
            return
        if status == "critical":
            output = " ".join(str(check.get("Output") or "").split())[:200]
            log.warning("app check of %s turned critical: %s", self.spec.instance_id, output)
        elif self.app_status == "critical":
            log.info("app check of %s is %s again", self.spec.instance_id, status)
        self.app_status = status

    async def deregister(self, timeout: float = 3.0) -> bool:
        """Stop the heartbeat and remove the instance (and its checks) from the registry."""
        self.deregistered = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if not self.registered:
            return False
        self.registered = False
        try:
            async with asyncio.timeout(timeout):
                await self.client.agent.service.deregister(self.spec.instance_id)
        except Exception as exc:
            # The TTL check expires and DeregisterCriticalServiceAfter reaps it instead.
            log.warning("deregistering %s failed: %s", self.spec.instance_id, exc)
            return False
        log.info("deregistered %s", self.spec.instance_id)
        return True

    def describe(self) -> dict[str, Any]:
        return {
            "id": self.spec.instance_id,
            "registered": self.registered,
            "registrations": self.registrations,
            "last_error": self.last_error,
            "payload": self.spec.payload(),
        }

    def __repr__(self) -> str:
        state = "registered" if self.registered else "unregistered"
        return f"<Registration {self.spec.instance_id} {state}>"
