"""A route rule's L7 filters, compiled once per snapshot: fault, rate limit, redirect,
rewrite and mirror decisions (pure: the clock and the random source are arguments).

The policy router (proxy/policy_router.py) asks a matched rule's `RuleFilters` in this
order, as DESIGN.md's life of a request lists them: the rate limit (over the limit: 429
`rate_limited` with Retry-After), the redirect (a local answer with Location), the fault
(abort: a local reply `fault_abort` with the configured status; delay: the request is
held, then routed), the rewrite (path by prefix or RE2 regex, Host), and the mirror draw
(proxy/mirror.py copies the request). Nothing here does I/O.
"""

from __future__ import annotations

import random
from collections import OrderedDict
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, field
from typing import Any

from proxy.routing import StringMatch


class TokenBuckets:
    """Token buckets by key (one key "" when not keyed), at most `max_keys` of them: the
    least recently used bucket is dropped first, so a flood of distinct keys cannot grow
    memory (a dropped key starts again with a full bucket)."""

    __slots__ = ("buckets", "burst", "max_keys", "rate")

    def __init__(self, requests: int, interval: float, burst: int, max_keys: int) -> None:
        self.rate = requests / interval  # tokens per second
        self.burst = float(burst)
        self.max_keys = max_keys
        # key -> [tokens, when they were counted]
        self.buckets: OrderedDict[str, list[float]] = OrderedDict()

    def take(self, key: str, now: float) -> float:
        """Take one token for `key`: 0.0 if there was one, else the seconds until there
        will be (what Retry-After says, rounded up)."""
        buckets = self.buckets
        b = buckets.get(key)
        if b is None:
            if len(buckets) >= self.max_keys:
                buckets.popitem(last=False)
            b = buckets[key] = [self.burst, now]
        else:
            buckets.move_to_end(key)
            elapsed = now - b[1]
            if elapsed > 0:
                b[0] = min(self.burst, b[0] + elapsed * self.rate)
                b[1] = now
        if b[0] >= 1.0:
            b[0] -= 1.0
            return 0.0
        return (1.0 - b[0]) / self.rate

    def __len__(self) -> int:
        return len(self.buckets)

    def __repr__(self) -> str:
        return f"<TokenBuckets {self.rate:g}/s burst={self.burst:g} keys={len(self.buckets)}>"


class BucketStore:
    """Rate-limit buckets by rule and spec across snapshots: a snapshot being compiled
    takes (`get`) the live bucket of an unchanged rule, or a new one; `commit` makes what
    it took the live set once it applies (buckets of changed rules go), `discard` drops
    what a failed one took."""

    __slots__ = ("live", "staged")

    def __init__(self) -> None:
        self.live: dict[Hashable, TokenBuckets] = {}
        self.staged: dict[Hashable, TokenBuckets] = {}

    def get(self, key: Hashable, make: Callable[[], TokenBuckets]) -> TokenBuckets:
        # Not `or`: a TokenBuckets with no keys yet is falsy (it has a length).
        tb = self.staged.get(key)
        if tb is None:
            tb = self.live.get(key)
        if tb is None:
            tb = make()
        self.staged[key] = tb
        return tb

    def commit(self) -> None:
        self.live, self.staged = self.staged, {}

    def discard(self) -> None:
        self.staged = {}

    def __repr__(self) -> str:
        return f"<BucketStore live={len(self.live)}>"


@dataclass(frozen=True, slots=True)
class RateLimit:
    """A rule's rate limit: its buckets (kept across snapshots while the spec is the
    same, see `compile_rate_limit`), where it runs and what keys a bucket."""

    buckets: TokenBuckets
    at: str  # "outbound" | "inbound"
    key: str  # "none" | "caller" | "header"
    header: str = ""  # lower case, for key "header"

    def check(self, headers: Mapping[str, str], caller: str | None, now: float) -> float:
        """0.0: let it through; else seconds to wait (answer 429)."""
        if self.key == "header":
            k = headers.get(self.header, "")
        elif self.key == "caller":
            k = caller or ""
        else:
            k = ""
        return self.buckets.take(k, now)


@dataclass(frozen=True, slots=True)
class Fault:
    """Delay and/or abort a share of the requests whose headers match."""

    headers: tuple[tuple[str, StringMatch], ...] = ()
    delay: float = 0.0
    delay_fraction: float = 0.0
    abort_status: int = 0
    abort_fraction: float = 0.0

    def applies(self, headers: Mapping[str, str]) -> bool:
        for name, cond in self.headers:  # noqa: SIM110
            if not cond.test(headers.get(name)):
                return False
        return True

    def draw(self, headers: Mapping[str, str], rng: random.Random) -> tuple[int, float]:
        """(status to abort with or 0, seconds to delay or 0.0) for one request. An abort
        wins over a delay (Envoy: the delay, then the abort; here the abort answers at
        once, so a test of the abort does not wait)."""
        if not self.applies(headers):
            return 0, 0.0
        if self.abort_status and rng.random() * 100.0 < self.abort_fraction:
            return self.abort_status, 0.0
        if self.delay and rng.random() * 100.0 < self.delay_fraction:
            return 0, self.delay
        return 0, 0.0


@dataclass(frozen=True, slots=True)
class Rewrite:
    """Path rewrite (the matched prefix replaced, or an RE2 regex substituted over the
    path) and Host rewrite. The query is kept as it was."""

    prefix: str | None = None  # the rule's matched prefix
    replacement: str = ""
    pattern: Any = None  # compiled RE2
    substitution: str = ""
    host: str | None = None

    def path(self, target: str) -> str | None:
        """The rewritten request target, or None when the path does not change."""
        path, q, query = target.partition("?")
        if self.prefix is not None:
            if not path.startswith(self.prefix):
                return None
            new = self.replacement + path[len(self.prefix) :]
            if not new.startswith("/"):
                new = "/" + new
            # "/api" + "/v1" rewritten to "/" gives "//v1": fold the doubled slash.
            if self.replacement.endswith("/") and new.startswith("/", len(self.replacement)):
                new = self.replacement + new[len(self.replacement) + 1 :]
        elif self.pattern is not None:
            new = self.pattern.sub(self.substitution, path)
            if not new.startswith("/"):
                new = "/" + new
        else:
            return None
        return new + q + query


@dataclass(frozen=True, slots=True)
class Redirect:
    """A redirect answer: the request's URL with the configured parts replaced."""

    status: int
    scheme: str | None = None
    host: str | None = None
    port: int | None = None
    path: str | None = None

    def location(self, host: str, target: str) -> str:
        scheme = self.scheme or "http"
        h = self.host or host
        if self.port is not None:
            h = f"{h.rpartition(':')[0] if _has_port(h) else h}:{self.port}"
        return f"{scheme}://{h}{self.path if self.path is not None else target}"


def _has_port(host: str) -> bool:
    _, colon, tail = host.rpartition(":")
    return bool(colon) and tail.isdigit() and "]" not in tail


@dataclass(frozen=True, slots=True)
class Mirror:
    """Where a copy goes and how often: a service (and subset) of the rule's namespace."""

    service: str
    namespace: str
    subset: str | None
    fraction: float  # percent
    max_body: int

    def draw(self, rng: random.Random) -> bool:
        return self.fraction >= 100.0 or rng.random() * 100.0 < self.fraction


@dataclass(frozen=True, slots=True)
class RuleFilters:
    """Everything but routing that a matched rule does, compiled; None fields are off."""

    fault: Fault | None = None
    rate_limit: RateLimit | None = None
    redirect: Redirect | None = None
    rewrite: Rewrite | None = None
    mirror: Mirror | None = None
    # Lower-case names of the request headers these filters read.
    header_names: frozenset[str] = field(default_factory=frozenset)

    @property
    def outbound_limit(self) -> RateLimit | None:
        rl = self.rate_limit
        return rl if rl is not None and rl.at == "outbound" else None


def describe(filters: RuleFilters | None) -> dict[str, Any]:
    """The filters as plain data (for /config_dump and `tether explain`)."""
    if filters is None:
        return {}
    out: dict[str, Any] = {}
    if filters.fault is not None:
        f = filters.fault
        out["fault"] = {
            "delay": f.delay,
            "delayPercentage": f.delay_fraction,
            "abortStatus": f.abort_status,
            "abortPercentage": f.abort_fraction,
            "headers": [n for n, _ in f.headers],
        }
    if filters.rate_limit is not None:
        rl = filters.rate_limit
        out["rateLimit"] = {
            "at": rl.at,
            "key": rl.key,
            "perSecond": rl.buckets.rate,
            "burst": rl.buckets.burst,
        }
    if filters.redirect is not None:
        out["redirect"] = {"status": filters.redirect.status}
    if filters.rewrite is not None:
        out["rewrite"] = {"host": filters.rewrite.host, "prefix": filters.rewrite.replacement}
    if filters.mirror is not None:
        m = filters.mirror
        out["mirror"] = {"service": m.service, "subset": m.subset, "percentage": m.fraction}
    return out
