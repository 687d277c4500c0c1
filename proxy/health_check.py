"""Active health checks: the caller's sidecar probes the instances of the services it calls.

A destination's `healthCheck` (ServiceDefaults, else MeshConfig) starts one
`ClusterChecker` per destination the first time this sidecar routes a request to it
(`HealthChecks.watch`, from the outbound router when a (cluster, spec) pair is first
seen): every `interval` (jittered by up to 10%, so sidecars started together do not
probe in step) it sends `GET <path>` to each endpoint of the cluster, over the very
connection a request would use (the mesh's mTLS and the caller's own identity, so a
strict inbound sidecar accepts the probe and forwards it to its app). A probe is bounded
in time (`timeout`, connect included) and in size (the status line within
`MAX_STATUS_LINE` bytes; nothing else is read), and at most `MAX_CONCURRENT` probes of
the whole sidecar are in flight at once.

The verdict is combined with the registry's (as Envoy combines EDS health with active
checks): an endpoint is used only while both say healthy. `Endpoint.registry_healthy` is
the registry's word (set by `Cluster.set_endpoints`), `Endpoint.check` this module's
`EndpointCheck`, and `Endpoint.healthy` (what every balancer reads at each pick) their
conjunction, recomputed by `apply` whenever either changes. A new endpoint counts as
healthy until probes say otherwise (the registry already runs the app's own check):
`unhealthyThreshold` consecutive failures take it out, then `healthyThreshold`
consecutive successes bring it back. A 2xx answer is a success (Consul's HTTP check
reads the same); any other status, a refused or failed connection, a TLS identity that
is not the destination's, or no status line within `timeout` is a failure.

`EndpointCheck.record` and `next_delay` are pure (the clock and random source are
arguments); `probe` and `ClusterChecker` are the I/O around them.
"""

from __future__ import annotations

import asyncio
import random
import ssl as ssl_module
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from proxy.balance.base import Endpoint

if TYPE_CHECKING:
    from proxy.cluster import Cluster, ServiceDirectory
    from proxy.tls import UpstreamTLS
    from wire import resources as schema

# Probes of the whole sidecar in flight at once.
MAX_CONCURRENT = 8
# The longest status line a probe reads (the rest of the answer is never read).
MAX_STATUS_LINE = 1024
# The interval is jittered by up to this share either way.
JITTER = 0.1
USER_AGENT = "tether-health-check"


@dataclass(frozen=True, slots=True)
class HealthCheckSpec:
    path: str
    interval: float = 5.0
    timeout: float = 1.0
    unhealthy_threshold: int = 2
    healthy_threshold: int = 2

    @classmethod
    def of(cls, p: schema.HealthCheckPolicy) -> HealthCheckSpec:
        return cls(p.path, p.interval, p.timeout, p.unhealthy_threshold, p.healthy_threshold)


class EndpointCheck:
    """What the active check knows of one endpoint (kept on `Endpoint.check`)."""

    __slots__ = ("checked_at", "failures", "healthy", "last_error", "probes", "successes")

    def __init__(self) -> None:
        self.healthy = True
        self.successes = 0  # consecutive
        self.failures = 0  # consecutive
        self.probes = 0  # in all
        self.last_error = ""
        self.checked_at = -1.0

    def record(self, error: str | None, spec: HealthCheckSpec, now: float) -> bool:
        """One probe's result (None: success, else why it failed); True when the verdict
        changed."""
        self.probes += 1
        self.checked_at = now
        if error is None:
            self.successes += 1
            self.failures = 0
            if not self.healthy and self.successes >= spec.healthy_threshold:
                self.healthy = True
                return True
            return False
        self.last_error = error
        self.failures += 1
        self.successes = 0
        if self.healthy and self.failures >= spec.unhealthy_threshold:
            self.healthy = False
            return True
        return False

    def __repr__(self) -> str:
        state = "healthy" if self.healthy else "failing"
        return f"<EndpointCheck {state} ok={self.successes} failed={self.failures}>"


def next_delay(interval: float, rng: random.Random) -> float:
    """The wait before the next round: `interval` give or take up to JITTER of it."""
    return interval * (1.0 - JITTER + 2.0 * JITTER * rng.random())


def apply(ep: Endpoint) -> None:
    """Recompute the endpoint's health: the registry's word and the check's, both."""
    check = ep.check
    ep.healthy = ep.registry_healthy and (check is None or check.healthy)


def status_of(line: bytes) -> int:
    """The status of an HTTP/1.x status line, or 0 if it is not one."""
    parts = line.rstrip(b"\r\n").split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or len(parts[1]) != 3:
        return 0
    code = parts[1]
    return int(code) if code.isdigit() else 0


def describe(ep: Endpoint, now: float) -> dict[str, object] | None:
    """What `/clusters` shows of an endpoint's active check (None: not checked)."""
    c = ep.check
    if c is None:
        return None
    out: dict[str, object] = {
        "healthy": c.healthy,
        "consecutive_successes": c.successes,
        "consecutive_failures": c.failures,
        "probes": c.probes,
    }
    if c.checked_at >= 0:
        out["last_probe_ago"] = round(max(0.0, now - c.checked_at), 3)
    if c.last_error:
        out["last_error"] = c.last_error
    return out


async def probe(
    host: str,
    port: int,
    spec: HealthCheckSpec,
    authority: str,
    tls: UpstreamTLS | None,
    ssl: ssl_module.SSLContext | None = None,
) -> str | None:
    """One probe: None if the endpoint answered `spec.path` with a 2xx, else why not."""
    ctx = tls.context if tls is not None else ssl
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(spec.timeout):
            reader, writer = await asyncio.open_connection(
                host,
                port,
                ssl=ctx,
                # A mesh peer is checked by its SPIFFE ID, not a host name (as pools do).
                server_hostname="" if tls is not None else None,
                limit=MAX_STATUS_LINE,
            )
            if tls is not None:
                refused = tls.check(writer.transport)
                if refused is not None:
                    return f"tls: {refused}"
            writer.write(
                b"GET %s HTTP/1.1\r\nHost: %s\r\nUser-Agent: %s\r\nConnection: close\r\n\r\n"
                % (spec.path.encode("ascii"), authority.encode("ascii"), USER_AGENT.encode())
            )
            line = await reader.readuntil(b"\r\n")
    except TimeoutError:
        return f"no answer within {spec.timeout}s"
    except asyncio.LimitOverrunError:
        return f"status line over {MAX_STATUS_LINE} bytes"
    except asyncio.IncompleteReadError:
        return "connection closed before a status line"
    except (OSError, ssl_module.SSLError) as exc:
        return f"connect: {exc.__class__.__name__}: {exc}"
    finally:
        if writer is not None:
            writer.transport.abort()  # never reused: the probe read only the status line
    status = status_of(line)
    if status == 0:
        return "not an HTTP/1.x status line"
    return None if 200 <= status < 300 else f"status {status}"


Prober = Callable[[Endpoint, "HealthCheckSpec"], Any]  # an awaitable of str | None


class ClusterChecker:
    """Probes one destination's endpoints every (jittered) interval."""

    def __init__(
        self,
        namespace: str,
        service: str,
        spec: HealthCheckSpec,
        directory: ServiceDirectory,
        prober: Prober,
        limit: asyncio.Semaphore,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self.namespace = namespace
        self.service = service
        self.name = f"{service}.{namespace}"
        self.spec = spec
        self.directory = directory
        self.prober = prober
        self.limit = limit
        self.clock = clock
        self.rng = rng or random.Random()
        self.successes = 0
        self.failures = 0
        self.task: asyncio.Task[None] | None = None

    def endpoints(self) -> tuple[Endpoint, ...]:
        cluster: Cluster | None = self.directory.lookup(self.namespace, self.service)
        return cluster.endpoints if cluster is not None else ()

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            await self.check_once()
            await asyncio.sleep(next_delay(self.spec.interval, self.rng))

    async def check_once(self) -> None:
        """One round: every endpoint probed (within the sidecar's concurrency bound)."""
        eps = self.endpoints()
        if eps:
            await asyncio.gather(*(self._check(ep) for ep in eps))

    async def _check(self, ep: Endpoint) -> None:
        spec = self.spec
        async with self.limit:
            error = await self.prober(ep, spec)
        if error is None:
            self.successes += 1
        else:
            self.failures += 1
        check = ep.check
        if check is None:
            check = ep.check = EndpointCheck()
        now = self.clock()
        if check.record(error, spec, now):
            apply(ep)
            if ep.healthy:
                ep.added_at = now  # back to health: a slow-start window ramps it

    def stop(self) -> None:
        """Stop probing and hand the endpoints back to the registry's word alone."""
        if self.task is not None:
            self.task.cancel()
            self.task = None
        for ep in self.endpoints():
            if ep.check is not None:
                ep.check = None
                apply(ep)

    def __repr__(self) -> str:
        return f"<ClusterChecker {self.name} every {self.spec.interval}s {self.spec.path}>"


class HealthChecks:
    """The sidecar's checkers, one per destination with a `healthCheck` it routes to."""

    def __init__(
        self,
        directory: ServiceDirectory,
        tls_for: Callable[[str, str], UpstreamTLS | None],
        ssl: ssl_module.SSLContext | None = None,
    ) -> None:
        self.directory = directory
        self.tls_for = tls_for
        self.ssl = ssl
        self.checkers: dict[tuple[str, str], ClusterChecker] = {}
        self._limit: asyncio.Semaphore | None = None

    def watch(self, namespace: str, service: str, spec: HealthCheckSpec | None) -> None:
        """Called when a request to the destination meets a new spec: start, change or
        stop its checker."""
        key = (namespace, service)
        checker = self.checkers.get(key)
        if spec is None:
            if checker is not None:
                del self.checkers[key]
                checker.stop()
            return
        if checker is not None:
            checker.spec = spec  # the next round uses it
            return
        if self._limit is None:
            self._limit = asyncio.Semaphore(MAX_CONCURRENT)
        tls = self.tls_for(namespace, service)
        ssl = self.ssl

        async def prober(ep: Endpoint, s: HealthCheckSpec) -> str | None:
            return await probe(ep.host, ep.port, s, service, tls, ssl)

        checker = ClusterChecker(namespace, service, spec, self.directory, prober, self._limit)
        self.checkers[key] = checker
        checker.start()

    def metrics(self) -> list[str]:
        """Probes by result and endpoints held out, per destination (label sets bounded
        by the destinations with a check)."""
        out = [
            "# HELP tether_health_check_probes_total Active health-check probes, by result.",
            "# TYPE tether_health_check_probes_total counter",
        ]
        failing = [
            "# HELP tether_health_check_failing Endpoints the active check holds out now.",
            "# TYPE tether_health_check_failing gauge",
        ]
        for (ns, svc), c in sorted(self.checkers.items()):
            dest = f'destination="{svc}.{ns}"'
            out.append(f'tether_health_check_probes_total{{{dest},result="success"}} {c.successes}')
            out.append(f'tether_health_check_probes_total{{{dest},result="failure"}} {c.failures}')
            n = sum(1 for e in c.endpoints() if e.check is not None and not e.check.healthy)
            failing.append(f"tether_health_check_failing{{{dest}}} {n}")
        return out + failing

    def close(self) -> None:
        for checker in self.checkers.values():
            if checker.task is not None:
                checker.task.cancel()
        self.checkers.clear()

    def __repr__(self) -> str:
        return f"<HealthChecks {sorted(self.checkers)}>"
