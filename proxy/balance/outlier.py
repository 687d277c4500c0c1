"""Outlier detection: take failing endpoints out of rotation, bring them back on probation.

Envoy's outlier detection, over any balancer: ejecting an endpoint sets its
`ejected_until`, which `Endpoint.available` (what every balancer and the locality layer
check at each pick) honours, so no balancer needs to know. The detector reads each
attempt's typed outcome (`observe`, from the exchange's end of an attempt, classified by
`classify`) and ejects:

- on consecutive failures: `consecutive5xx` (5xx responses, and connect failures,
  resets and timeouts, as Envoy's default), `consecutiveGatewayErrors` (502/503/504 and
  those local failures), `consecutiveConnectFailures`;
- every `interval` (`evaluate`, from the listener's sweep): by success rate (below mean -
  stdevFactor * stdev of the endpoints with `requestVolume` requests, given
  `minimumHosts` of them) and by failure percentage (at least `threshold` %).

An ejection lasts `baseEjectionTime * n` (n: how many times it was ejected lately, one
less after each interval spent healthy), capped at `maxEjectionTime`; at most
`maxEjectionPercent` of the endpoints are out at once (but one always may be). When the
time is up the endpoint is on probation: the first pick that lands on it (`picked`)
is its one trial request, during which it stays out of rotation; success brings it
back, failure ejects it again for longer.

All pure: `now` is an argument; state lives on `Endpoint.outlier`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from proxy.balance.base import Endpoint

if TYPE_CHECKING:
    from wire import resources as schema

# What an attempt's outcome means to the detector (`classify`).
IGNORE: Final = 0  # not the endpoint's doing (the client left, a local reply)
SUCCESS: Final = 1
ERROR_5XX: Final = 2  # a 5xx response other than a gateway error
GATEWAY: Final = 3  # 502, 503, 504 from the endpoint
CONNECT: Final = 4  # no connection
LOCAL: Final = 5  # reset or timeout: a local-origin failure

# Endpoint states.
HEALTHY: Final = 0
EJECTED: Final = 1
TRIAL: Final = 2  # back from ejection, its one trial request in flight
_INF = float("inf")

REASONS: Final = (
    "consecutive_5xx",
    "consecutive_gateway_errors",
    "consecutive_connect_failures",
    "success_rate",
    "failure_percentage",
)


@dataclass(frozen=True, slots=True)
class OutlierSpec:
    consecutive_5xx: int = 5
    consecutive_gateway: int = 0
    consecutive_connect: int = 0
    interval: float = 1.0
    base_ejection: float = 30.0
    max_ejection: float = 300.0
    max_ejection_percent: int = 10
    # Success rate: (minimum hosts, request volume, stdev factor); None: off.
    success_rate: tuple[int, int, float] | None = None
    # Failure percentage: (threshold, minimum hosts, request volume); None: off.
    failure_percentage: tuple[int, int, int] | None = None

    @classmethod
    def of(cls, p: schema.OutlierDetectionPolicy) -> OutlierSpec:
        sr = p.success_rate
        fp = p.failure_percentage
        return cls(
            p.consecutive_5xx,
            p.consecutive_gateway_errors,
            p.consecutive_connect_failures,
            p.interval,
            p.base_ejection_time,
            p.max_ejection_time,
            p.max_ejection_percent,
            (sr.minimum_hosts, sr.request_volume, sr.stdev_factor) if sr else None,
            (fp.threshold, fp.minimum_hosts, fp.request_volume) if fp else None,
        )


class EndpointHealth:
    """What the detector knows of one endpoint (kept on `Endpoint.outlier`)."""

    __slots__ = (
        "consecutive_5xx",
        "consecutive_connect",
        "consecutive_gateway",
        "ejections",
        "failures",
        "reason",
        "state",
        "successes",
        "times_ejected",
    )

    def __init__(self) -> None:
        self.state = HEALTHY
        self.consecutive_5xx = 0
        self.consecutive_gateway = 0
        self.consecutive_connect = 0
        self.successes = 0  # in the current interval
        self.failures = 0
        self.ejections = 0  # the multiplier of the next ejection's length, less 1
        self.times_ejected = 0  # in all
        self.reason = ""

    def __repr__(self) -> str:
        state = ("healthy", "ejected", "trial")[self.state]
        return f"<EndpointHealth {state} {self.reason} ejections={self.times_ejected}>"


def classify(kind: str, status: int) -> int:
    """An attempt's outcome (its kind's name and status, proxy/outcome.py) → what it
    means to the detector."""
    if kind == "Completed":
        if status < 500:
            return SUCCESS
        return GATEWAY if status in (502, 503, 504) else ERROR_5XX
    if kind == "ConnectFailure":
        return CONNECT
    if kind in ("Reset", "Timeout"):
        return LOCAL
    return IGNORE


def start_trial(ep: Endpoint, now: float) -> None:
    """A balancer picked `ep`: if its ejection is over, this request is its one trial,
    and it stays out of rotation until the trial's outcome (`observe`)."""
    h = ep.outlier
    if h is not None and h.state == EJECTED and now >= ep.ejected_until:
        h.state = TRIAL
        ep.ejected_until = _INF


def health(ep: Endpoint) -> EndpointHealth:
    h = ep.outlier
    if h is None:
        h = ep.outlier = EndpointHealth()
    assert isinstance(h, EndpointHealth)
    return h


class OutlierDetector:
    """One cluster's detector (one per destination service)."""

    __slots__ = ("ejections_total", "name", "next_eval", "spec")

    def __init__(self, spec: OutlierSpec, name: str = "") -> None:
        self.spec = spec
        self.name = name
        self.next_eval = 0.0
        # Ejections so far, by reason (bounded: REASONS).
        self.ejections_total: dict[str, int] = dict.fromkeys(REASONS, 0)

    # -- per attempt -----------------------------------------------------------------

    def picked(self, ep: Endpoint, now: float) -> None:
        start_trial(ep, now)

    def observe(self, ep: Endpoint, what: int, now: float, endpoints: Sequence[Endpoint]) -> bool:
        """An attempt to `ep` ended as `what` (`classify`); True when it ejected `ep`."""
        if what == IGNORE:
            h = ep.outlier
            if h is not None and h.state == TRIAL:
                # The trial told nothing: the next pick is a trial again.
                h.state = EJECTED
                ep.ejected_until = now
            return False
        h = health(ep)
        spec = self.spec
        if what == SUCCESS:
            h.successes += 1
            h.consecutive_5xx = h.consecutive_gateway = h.consecutive_connect = 0
            if h.state == TRIAL:
                h.state = HEALTHY
                h.reason = ""
                ep.ejected_until = 0.0
            return False
        h.failures += 1
        if h.state == TRIAL:
            return self._eject(ep, h, h.reason or "consecutive_5xx", now, endpoints, trial=True)
        if h.state != HEALTHY:
            return False
        h.consecutive_5xx += 1
        if what != ERROR_5XX:
            h.consecutive_gateway += 1
        if what == CONNECT:
            h.consecutive_connect += 1
        else:
            h.consecutive_connect = 0
        if spec.consecutive_5xx and h.consecutive_5xx >= spec.consecutive_5xx:
            return self._eject(ep, h, "consecutive_5xx", now, endpoints)
        if spec.consecutive_gateway and h.consecutive_gateway >= spec.consecutive_gateway:
            return self._eject(ep, h, "consecutive_gateway_errors", now, endpoints)
        if spec.consecutive_connect and h.consecutive_connect >= spec.consecutive_connect:
            return self._eject(ep, h, "consecutive_connect_failures", now, endpoints)
        return False

    def _eject(
        self,
        ep: Endpoint,
        h: EndpointHealth,
        reason: str,
        now: float,
        endpoints: Sequence[Endpoint],
        trial: bool = False,
    ) -> bool:
        if not trial and not self._may_eject(endpoints):
            return False
        spec = self.spec
        h.ejections += 1
        h.times_ejected += 1
        h.state = EJECTED
        h.reason = reason
        h.consecutive_5xx = h.consecutive_gateway = h.consecutive_connect = 0
        ep.ejected_until = now + min(spec.base_ejection * h.ejections, spec.max_ejection)
        self.ejections_total[reason] = self.ejections_total.get(reason, 0) + 1
        return True

    def _may_eject(self, endpoints: Sequence[Endpoint]) -> bool:
        pct = self.spec.max_ejection_percent
        if pct <= 0 or not endpoints:
            return False
        out = sum(1 for e in endpoints if e.outlier is not None and e.outlier.state != HEALTHY)
        return out < max(1, len(endpoints) * pct // 100)

    # -- every interval --------------------------------------------------------------

    def evaluate(self, endpoints: Sequence[Endpoint], now: float) -> list[Endpoint]:
        """Success-rate and failure-percentage ejection over the interval that ended;
        the interval's counts restart. Returns the endpoints ejected now."""
        if now < self.next_eval:
            return []
        self.next_eval = now + self.spec.interval
        spec = self.spec
        rows: list[tuple[Endpoint, EndpointHealth, int, float]] = []
        for ep in endpoints:
            h = ep.outlier
            if h is None:
                continue
            total = h.successes + h.failures
            if h.state == HEALTHY and total:
                rows.append((ep, h, total, h.successes / total))
            if h.state == HEALTHY and h.ejections and not h.failures:
                h.ejections -= 1  # a healthy interval shortens the next ejection
        ejected: list[Endpoint] = []
        sr = spec.success_rate
        if sr is not None:
            min_hosts, volume, factor = sr
            eligible = [r for r in rows if r[2] >= volume]
            if len(eligible) >= min_hosts:
                rates = [r[3] for r in eligible]
                mean = sum(rates) / len(rates)
                stdev = math.sqrt(sum((x - mean) ** 2 for x in rates) / len(rates))
                limit = mean - factor * stdev
                for ep, h, _, rate in eligible:
                    if rate < limit and self._eject(ep, h, "success_rate", now, endpoints):
                        ejected.append(ep)
        fp = spec.failure_percentage
        if fp is not None:
            threshold, min_hosts, volume = fp
            eligible = [r for r in rows if r[2] >= volume and r[1].state == HEALTHY]
            if len(eligible) >= min_hosts:
                for ep, h, _, rate in eligible:
                    if (1.0 - rate) * 100 >= threshold and self._eject(
                        ep, h, "failure_percentage", now, endpoints
                    ):
                        ejected.append(ep)
        for ep in endpoints:
            h = ep.outlier
            if h is not None:
                h.successes = h.failures = 0
        return ejected

    def describe(self, ep: Endpoint, now: float) -> dict[str, object]:
        return describe(ep, now)

    def __repr__(self) -> str:
        return f"<OutlierDetector {self.name} {self.spec}>"


def describe(ep: Endpoint, now: float) -> dict[str, object]:
    """What `/clusters` shows of an endpoint's outlier state."""
    h = ep.outlier
    if h is None or h.state == HEALTHY:
        return {"ejected": False}
    if h.state == TRIAL:
        return {"ejected": True, "reason": h.reason, "probation": "trial in flight"}
    left = max(0.0, ep.ejected_until - now)
    out: dict[str, object] = {"ejected": left > 0, "reason": h.reason}
    out["probation" if left <= 0 else "ejected_for"] = (
        "next request is the trial" if left <= 0 else round(left, 3)
    )
    return out
