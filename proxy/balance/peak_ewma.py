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
it is assumed typical: the cluster's average of all observations (the same time-weighted
EWMA, no peaks), or `default_rtt` (30 ms, Linkerd's default) before any. Its first
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
        # Keyed by the Endpoint itself (identity hash: Endpoint has eq=False).
        self._rtt: dict[Endpoint, _Rtt] = {}
        # The states of `_pool`, index for index, so a pick reads them without hashing.
        self._pool_rtt: tuple[_Rtt, ...] = ()
        # What an endpoint not heard from yet is assumed to cost (see the module doc).
        self._typical = _Rtt(default_rtt, 0.0)

    def update(self, endpoints: Sequence[Endpoint]) -> None:
        super().update(endpoints)
        old = self._rtt
        # A state made before the first observation is indistinguishable from none:
        # `observed` is False, and the first observation overwrites estimate and stamp.
        self._rtt = {ep: old.get(ep) or _Rtt(self.default_rtt, 0.0) for ep in self.endpoints}
        self._pool_rtt = tuple(self._state(ep, 0.0) for ep in self._pool)

    def _state(self, ep: Endpoint, now: float) -> _Rtt:
        st = self._rtt.get(ep)
        if st is None:
            st = self._rtt[ep] = _Rtt(self.default_rtt, now)
        return st

    def estimate(self, ep: Endpoint, now: float) -> float:
        """The RTT estimate (seconds) as a decision at `now` would read it."""
        st = self._rtt.get(ep)
        if st is None or not st.observed:
            return self._typical.estimate
        return st.current(now, self.decay)

    def cost(self, ep: Endpoint, now: float) -> float:
        st = self._rtt.get(ep)
        if st is None or not st.observed:
            if ep.active == 0:
                return 0.0
            est = self._typical.estimate
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
        if self._weighted or now < self._ramp_ends:
            return self._pick_weighted(now)
        pool = self._pool
        n = len(pool)
        if n < 2 or self.choice_count != 2:
            return self._pick_scan(now, rng)
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
        rtts = self._pool_rtt
        st = rtts[j]
        if st.observed:
            elapsed = now - st.stamp
            est = st.estimate * _exp(-elapsed / self.decay) if elapsed > 0 else st.estimate
            cost_b = (est if est > _FLOOR else _FLOOR) * (b.active + 1)
        elif b.active != 0:
            est = self._typical.estimate
            cost_b = (est if est > _FLOOR else _FLOOR) * (b.active + 1)
        else:
            cost_b = 0.0
        st = rtts[i]
        if st.observed:
            elapsed = now - st.stamp
            est = st.estimate * _exp(-elapsed / self.decay) if elapsed > 0 else st.estimate
            cost_a = (est if est > _FLOOR else _FLOOR) * (a.active + 1)
        elif a.active != 0:
            est = self._typical.estimate
            cost_a = (est if est > _FLOOR else _FLOOR) * (a.active + 1)
        else:
            cost_a = 0.0
        return b if cost_b < cost_a else a

    def on_end(self, ep: Endpoint, now: float, latency: float, ok: bool) -> None:
        if ep.active > 0:
            ep.active -= 1
        st = self._rtt.get(ep)
        if st is None:
            st = self._rtt[ep] = _Rtt(self.default_rtt, now)
        if not ok:
            latency = max(latency, self.estimate(ep, now))
        decay = self.decay
        typical = self._typical
        if not typical.observed:
            typical.observed = True
            typical.estimate = latency
        else:
            # exp(-max(elapsed, 0) / decay), without the max call: exp(-0.0) is 1.0.
            elapsed = now - typical.stamp
            w = _exp(-elapsed / decay) if elapsed > 0 else 1.0
            typical.estimate = typical.estimate * w + latency * (1.0 - w)
        typical.stamp = now
        if not st.observed:
            # The default is a prior for an endpoint never heard from, not a sample.
            st.observed = True
            st.estimate = latency
        elif latency > st.estimate:
            st.estimate = latency
        else:
            elapsed = now - st.stamp
            w = _exp(-elapsed / decay) if elapsed > 0 else 1.0
            st.estimate = st.estimate * w + latency * (1.0 - w)
        st.stamp = now

    def __repr__(self) -> str:
        return f"<PeakEwma endpoints={len(self.endpoints)} decay={self.decay}s>"
