"""Circuit breakers: resource limits per destination service and per Route rule.

As Envoy's circuit breakers these are limits, not a state machine: a request that would
take a service (or a rule) past `maxActiveRequests` is answered 503 `overflow` at once,
and a retry that would pass `maxActiveRetries` is not made (the attempt's failure
stands). `maxConnections` and `maxPendingRequests` bound each instance's connection pool
(proxy/pool.py's `PoolPolicy`), whose overflow is the same 503 `overflow`. A rule's
limits apply on top of its destination's (validation refuses a rule limit above the
service's), so one hot route cannot take its whole service's share: something none of
Envoy, Linkerd, Consul or Kuma offers per route.

`Breaker` is the runtime counter set: one per service (and per rule with its own
limits), kept across snapshots by `Breakers` while the limits stay the same. Each
overflow is counted (`overflows`), shown in `/clusters` and `/stats/prometheus`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from wire import resources as schema


@dataclass(frozen=True, slots=True)
class CircuitBreakerSpec:
    max_connections: int = 1024
    max_pending_requests: int = 1024
    max_active_requests: int = 1024
    max_active_retries: int = 3

    @classmethod
    def of(cls, p: schema.CircuitBreakerPolicy) -> CircuitBreakerSpec:
        return cls(
            p.max_connections,
            p.max_pending_requests,
            p.max_active_requests,
            p.max_active_retries,
        )


class Breaker:
    """In-flight requests and retries of one service or rule, against its limits."""

    __slots__ = ("active", "key", "name", "overflows", "retries", "retry_overflows", "spec")

    def __init__(self, spec: CircuitBreakerSpec, name: str = "", key: tuple[str, ...] = ()) -> None:
        self.spec = spec
        self.name = name
        self.key = key  # (namespace, service) or (namespace, service, rule)
        self.active = 0
        self.retries = 0
        self.overflows = 0  # requests refused with 503 overflow
        self.retry_overflows = 0  # retries not made

    def admit(self) -> bool:
        """Take one request slot; False (and counted) when the limit is reached."""
        if self.active >= self.spec.max_active_requests:
            self.overflows += 1
            return False
        self.active += 1
        return True

    def done(self) -> None:
        if self.active > 0:
            self.active -= 1

    def admit_retry(self) -> bool:
        if self.retries >= self.spec.max_active_retries:
            self.retry_overflows += 1
            return False
        self.retries += 1
        return True

    def retry_done(self) -> None:
        if self.retries > 0:
            self.retries -= 1

    def snapshot(self) -> dict[str, int]:
        s = self.spec
        return {
            "active_requests": self.active,
            "active_retries": self.retries,
            "max_active_requests": s.max_active_requests,
            "max_active_retries": s.max_active_retries,
            "overflows": self.overflows,
            "retry_overflows": self.retry_overflows,
        }

    def __repr__(self) -> str:
        s = self.spec
        return (
            f"<Breaker {self.name} requests={self.active}/{s.max_active_requests} "
            f"retries={self.retries}/{s.max_active_retries} overflows={self.overflows}>"
        )


class Breakers:
    """The breakers by owner (a service, or a rule), kept across snapshots: the same
    owner keeps its `Breaker` (its in-flight counts go on) whatever its limits become."""

    def __init__(self) -> None:
        self._by_key: dict[tuple[str, ...], Breaker] = {}

    def get(self, key: tuple[str, ...], spec: CircuitBreakerSpec) -> Breaker:
        b = self._by_key.get(key)
        if b is None:
            b = self._by_key[key] = Breaker(spec, "/".join(key), key)
        else:
            # New limits apply to the same counters: requests in flight end on this one.
            b.spec = spec
        return b

    def all(self) -> list[Breaker]:
        return list(self._by_key.values())
