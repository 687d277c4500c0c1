"""The balancer contract: pick one endpoint of a cluster for a request.

Decisions are pure: the clock (`now`, seconds, monotonic) and the random source are
arguments, so tests replay them exactly. The proxy calls `update` when membership or
weights change, `pick` per request, and `on_start` / `on_end` around each request so
load-aware balancers (least-request, peak-EWMA) see latency and in-flight counts; the
proxy calls those two on the picking balancer's `tracker` (itself unless it delegates).
"""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass(eq=False)
class Endpoint:
    """One upstream instance (Envoy's "endpoint", Linkerd's "endpoint" target)."""

    id: str
    host: str
    port: int
    weight: int = 1
    zone: str = ""
    meta: Mapping[str, str] = field(default_factory=dict)
    healthy: bool = True
    draining: bool = False
    # Monotonic time until which outlier detection keeps it out of rotation.
    ejected_until: float = 0.0
    # Monotonic time it joined the cluster (slow start ramps its weight from here).
    added_at: float = 0.0
    # Requests in flight to it, maintained by the proxy through on_start/on_end.
    active: int = 0
    # What a load-aware balancer learned of it (peak-EWMA's RTT estimate). Kept on the
    # endpoint, like `active`, so it survives membership updates, costs no lookup per
    # request, and every balancer instance over the endpoint reads the same.
    lb_state: Any = field(default=None, repr=False)
    # What outlier detection knows of it (balance/outlier.py's EndpointHealth), kept
    # here for the same reasons.
    outlier: Any = field(default=None, repr=False)
    # The registry's word on its health; `healthy` is it and, where the destination has
    # an active health check, `check`'s verdict too (proxy/health_check.py's `apply`).
    registry_healthy: bool = True
    check: Any = field(default=None, repr=False)

    def available(self, now: float) -> bool:
        return self.healthy and not self.draining and now >= self.ejected_until

    def __repr__(self) -> str:
        state = "up" if self.healthy else "down"
        if self.draining:
            state = "draining"
        return f"<Endpoint {self.id} {self.host}:{self.port} w={self.weight} {state}>"


@dataclass
class PickContext:
    """What a request offers a balancer: the inputs of consistent hashing.

    Only the hashing balancers (ring hash, Maglev) look at it. `hash_key`, when set,
    is used as is; otherwise the balancer's hash policies read the request through
    `header` (case-insensitive name -> value, None when absent; the `cookie` header
    is parsed from it), `path` (for query parameters) and `source_ip`.
    """

    hash_key: bytes | None = None
    source_ip: str = ""
    header: Callable[[str], str | None] | None = None
    path: str = ""


class Balancer(ABC):
    """Picks an endpoint; reports None when no endpoint is available."""

    name = "base"
    # Whether `pick` reads its PickContext (the hashing balancers): when False the proxy
    # can pass one shared empty context instead of building one per request.
    uses_context = False

    # Whether on_start / on_end read and write only the endpoint (and this instance's
    # configuration), so that any instance of the class built alike may record any
    # endpoint's outcome. True of every balancer here: load state lives on Endpoint.
    endpoint_tracking = True

    def __init__(self) -> None:
        self.endpoints: Sequence[Endpoint] = ()
        # The balancer whose on_start / on_end the proxy calls around a request this one
        # picked: itself, unless it is a layer that can hand them straight to an inner
        # balancer (the locality layer does: one call per request instead of two).
        self.tracker: Balancer = self

    def update(self, endpoints: Sequence[Endpoint]) -> None:
        """Replace the membership (the same Endpoint objects keep their state)."""
        self.endpoints = tuple(endpoints)

    @abstractmethod
    def pick(self, ctx: PickContext, now: float, rng: random.Random) -> Endpoint | None: ...

    def rotation(self) -> object:
        """Where a rotating balancer stands, for `rewind` (None: nothing to restore).

        A retry's or hedge's picks (an endpoint the request has not tried) are put back
        with it, so they take no turn from first attempts: a round robin whose retries
        re-pick past the endpoint they avoid would otherwise leave its rotation on that
        endpoint, and send it most first attempts (a slow instance, every one hedged)."""
        return None

    def rewind(self, mark: object) -> None:  # noqa: B027 (a hook: most balancers have none)
        """Back to `rotation()`'s mark."""

    def on_start(self, ep: Endpoint, now: float) -> None:
        ep.active += 1

    def on_end(self, ep: Endpoint, now: float, latency: float, ok: bool) -> None:
        if ep.active > 0:
            ep.active -= 1

    def __repr__(self) -> str:
        return f"<{type(self).__name__} endpoints={len(self.endpoints)}>"
