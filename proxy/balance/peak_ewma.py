"""Peak-EWMA (Linkerd's default balancer): prefer the endpoint expected to answer soonest.

Per endpoint, an RTT estimate that jumps straight up to any slower observation (peak
sensitivity: a slowing endpoint is avoided at once) and otherwise moves toward faster
observations as an exponentially weighted average whose weight depends on the time
since the previous observation (`exp(-elapsed / decay)`). Between observations the
estimate, as read for a decision, decays toward zero with the same time constant, so an
endpoint that was avoided gets probed again and is found out when it has recovered.

The decay defaults to 3 s, not Linkerd's and Finagle's 10 s. Measured with the
conformance suite's simulation (three endpoints, 32 concurrent callers, one endpoint 50 ms
slower than the others for 10 s, then as fast): both send it 1.4% of the picks while it
is slow, but once it has recovered, 10 s gives it 10% of the picks (a fair share is 33%)
5 s later and 20% 16 s later, while 3 s gives it 20% after 5 s and a fair share after 11 s.

cost = estimate × (requests in flight + 1); picks are power-of-two-choices over that cost
(see p2c.py, also for weights). An endpoint not heard from yet costs nothing while
idle, so it gets one probe at once (Finagle does the same), and while that probe is out
it is assumed typical: the mean of the current estimates of the endpoints heard from
(worked out only while such a probe is out, so requests to known endpoints pay nothing
for it), or `default_rtt` (30 ms, Linkerd's default) before any. Its first
response's latency then becomes its estimate. (Linkerd's fixed 30 ms prior starves a new
endpoint for seconds in a cluster answering in 1 ms, and makes it a magnet in one
answering in 200 ms.)

Also different from tower's PeakEwma, on purpose: reading a cost does not write the
estimate (picks stay pure), and a failed request never lowers the estimate, so an
endpoint that fails fast does not attract traffic.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

from proxy.balance.base import Endpoint, PickContext
from proxy.balance.p2c import _DRAWS, P2cBalancer
from proxy.balance.slow_start import SlowStartPolicy

_FLOOR = 0.0001  # seconds
_exp = math.exp


class _Rtt:
    __slots__ = ("estimate", "observed", "stamp")

    def __init__(self, estimate: float, stamp: float) -> None:
        self.estimate = estimate  # seconds
        self.stamp = stamp  # monotonic time of the last observation (or first sight)
        self.observed = False

    def current(self, now: float, decay: float) -> float:
        elapsed = now - self.stamp
        if elapsed <= 0:
            return self.estimate
        return self.estimate * math.exp(-elapsed / decay)


class PeakEwma(P2cBalancer):
    name = "peak_ewma"

    def __init__(
        self,
        decay: float = 3.0,
        default_rtt: float = 0.030,
        slow_start: SlowStartPolicy | None = None,
    ) -> None:
        super().__init__(slow_start)
        self.decay = decay
        self.default_rtt = default_rtt

    def update(self, endpoints: Sequence[Endpoint]) -> None:
        super().update(endpoints)
        # Each endpoint's estimate lives on it (`Endpoint.lb_state`): an endpoint that
        # stays keeps what was learned of it. A state made before the first observation
        # is indistinguishable from none: `observed` is False, and the first observation
        # overwrites estimate and stamp.
        for ep in self.endpoints:
            if not isinstance(ep.lb_state, _Rtt):
                ep.lb_state = _Rtt(self.default_rtt, 0.0)

    def _state(self, ep: Endpoint, now: float) -> _Rtt:
        st = ep.lb_state
        if not isinstance(st, _Rtt):  # never updated into a peak-EWMA balancer
            st = ep.lb_state = _Rtt(self.default_rtt, now)
        return st

    def typical(self, now: float) -> float:
        """What an endpoint not heard from yet is assumed to take (see the module doc):
        the mean of the current estimates of the endpoints heard from, else the default.

        Computed when asked (only while a new endpoint's first probe is out), so that
        requests to known endpoints pay nothing for it."""
        seen = [
            ep.lb_state.current(now, self.decay)
            for ep in self._pool
            if isinstance(ep.lb_state, _Rtt) and ep.lb_state.observed
        ]
        return sum(seen) / len(seen) if seen else self.default_rtt

    def estimate(self, ep: Endpoint, now: float) -> float:
        """The RTT estimate (seconds) as a decision at `now` would read it."""
        st = ep.lb_state
        if not isinstance(st, _Rtt) or not st.observed:
            return self.typical(now)
        return st.current(now, self.decay)

    def cost(self, ep: Endpoint, now: float) -> float:
        st = ep.lb_state
        if not isinstance(st, _Rtt) or not st.observed:
            if ep.active == 0:
                return 0.0
            est = self.typical(now)
        else:
            elapsed = now - st.stamp
            est = st.estimate * _exp(-elapsed / self.decay) if elapsed > 0 else st.estimate
        # The floor (a loopback round trip) keeps an idle endpoint's decayed estimate
        # from reaching zero, where it would win every comparison until it answers.
        return (est if est > _FLOOR else _FLOOR) * (ep.active + 1)

    def pick(self, ctx: PickContext, now: float, rng: random.Random) -> Endpoint | None:
        # P2cBalancer.pick with its first draw, availability and `cost` inlined (same
        # draws, same arithmetic, same result): it is the default balancer's per-request
        # path, and the calls and hashing were two thirds of its cost.
        if now < self._draw_from:
            if self._weighted or now < self._ramp_ends:
                return self._pick_weighted(now)
            if len(self._pool) == 1:  # a one-instance service: nothing to compare
                a = self._pool[0]
                return a if a.healthy and not a.draining and now >= a.ejected_until else None
            return self._pick_scan(now, rng)
        pool = self._pool
        n = len(pool)
        # The first of P2cBalancer's draws, unrolled: the others only run when a drawn
        # endpoint is unavailable.
        rand = rng.random
        i = int(rand() * n)
        j = int(rand() * (n - 1))
        if j >= i:
            j += 1
        a = pool[i]
        b = pool[j]
        if a.healthy and not a.draining and now >= a.ejected_until:
            if not (b.healthy and not b.draining and now >= b.ejected_until):
                return a
        elif b.healthy and not b.draining and now >= b.ejected_until:
            return b
        else:
            return self._pick_drawn(now, rng, _DRAWS - 1)
        # Typed: the compiled build reads the state's fields directly (update() made one
        # for every endpoint of the pool).
        st: _Rtt = b.lb_state
        if st.observed:
            elapsed = now - st.stamp
            est = st.estimate * _exp(-elapsed / self.decay) if elapsed > 0 else st.estimate
            cost_b = (est if est > _FLOOR else _FLOOR) * (b.active + 1)
        elif b.active != 0:
            est = self.typical(now)
            cost_b = (est if est > _FLOOR else _FLOOR) * (b.active + 1)
        else:
            cost_b = 0.0
        st = a.lb_state
        if st.observed:
            elapsed = now - st.stamp
            est = st.estimate * _exp(-elapsed / self.decay) if elapsed > 0 else st.estimate
            cost_a = (est if est > _FLOOR else _FLOOR) * (a.active + 1)
        elif a.active != 0:
            est = self.typical(now)
            cost_a = (est if est > _FLOOR else _FLOOR) * (a.active + 1)
        else:
            cost_a = 0.0
        return b if cost_b < cost_a else a

    def on_end(self, ep: Endpoint, now: float, latency: float, ok: bool) -> None:
        if ep.active > 0:
            ep.active -= 1
        st = ep.lb_state
        if not isinstance(st, _Rtt):
            st = self._state(ep, now)
        if not ok:
            latency = max(latency, self.estimate(ep, now))
        if not st.observed:
            # The default is a prior for an endpoint never heard from, not a sample.
            st.observed = True
            st.estimate = latency
        elif latency > st.estimate:
            st.estimate = latency
        else:
            elapsed = now - st.stamp
            # exp(-max(elapsed, 0) / decay), without the max call: exp(-0.0) is 1.0.
            w = _exp(-elapsed / self.decay) if elapsed > 0 else 1.0
            st.estimate = st.estimate * w + latency * (1.0 - w)
        st.stamp = now

    def __repr__(self) -> str:
        return f"<PeakEwma endpoints={len(self.endpoints)} decay={self.decay}s>"
