"""Retry decisions: what may be sent again, when, and whether the destination can take it.

Everything here is pure: the clock (`now`, monotonic seconds) and the random source are
arguments, so tests replay decisions exactly without sleeping. The exchange
(proxy/exchange.py) asks, at the end of each failed attempt:

1. `RetrySpec.retriable(...)`: does the policy's `retryOn` cover this failure (read
   from the attempt's typed outcome kind and status, or its response head)?
2. `may_retry(...)`: is another attempt allowed (attempts left, the method idempotent
   or `retryNonIdempotent`, the body still replayable, the retry budget not spent)?
3. `backoff(...)`: how long to wait first (full jitter: uniform in [0, min(max,
   base * 2**(n - 1))], as AWS's "Exponential Backoff and Jitter" and Envoy do).

The budget (`RetryBudget`) bounds retries over a sliding window to `ratio` of the
requests seen plus `minPerSecond` (Linkerd's retry budget), so a destination that fails
everything sees at most that much extra load, never `attempts` times its load.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from wire import resources as schema

# retryOn conditions as bits (compiled once per snapshot; tested per failed attempt).
CONNECT_FAILURE: Final = 1
REFUSED_STREAM: Final = 2
RESET: Final = 4
STATUS_5XX: Final = 8
GATEWAY_ERROR: Final = 16
RETRIABLE_STATUS: Final = 32
RETRIABLE_HEADERS: Final = 64
_BITS: Final = {
    "connect-failure": CONNECT_FAILURE,
    "refused-stream": REFUSED_STREAM,
    "reset": RESET,
    "5xx": STATUS_5XX,
    "gateway-error": GATEWAY_ERROR,
    "retriable-status-codes": RETRIABLE_STATUS,
    "retriable-headers": RETRIABLE_HEADERS,
}
# gRPC conditions (Envoy's names): the call's grpc-status, read from a Trailers-Only
# response or from trailers that came before any message was relayed (HTTP/2 streams,
# proxy/h2_retry.py). Bits apart from the HTTP ones, so `retriable` never sees them.
GRPC_CANCELLED: Final = 128
GRPC_DEADLINE_EXCEEDED: Final = 256
GRPC_INTERNAL: Final = 512
GRPC_RESOURCE_EXHAUSTED: Final = 1024
GRPC_UNAVAILABLE: Final = 2048
GRPC_ANY: Final = (
    GRPC_CANCELLED
    | GRPC_DEADLINE_EXCEEDED
    | GRPC_INTERNAL
    | GRPC_RESOURCE_EXHAUSTED
    | GRPC_UNAVAILABLE
)
_BITS.update(
    {
        "cancelled": GRPC_CANCELLED,
        "deadline-exceeded": GRPC_DEADLINE_EXCEEDED,
        "internal": GRPC_INTERNAL,
        "resource-exhausted": GRPC_RESOURCE_EXHAUSTED,
        "unavailable": GRPC_UNAVAILABLE,
    }
)
# grpc-status codes (the gRPC protocol's) → their retryOn bit.
_GRPC_BITS: Final = {
    1: GRPC_CANCELLED,
    4: GRPC_DEADLINE_EXCEEDED,
    8: GRPC_RESOURCE_EXHAUSTED,
    13: GRPC_INTERNAL,
    14: GRPC_UNAVAILABLE,
}
# Why a retry was refused (or "" when it goes ahead): counted per destination.
NO_ATTEMPTS_LEFT: Final = "attempts"
NO_OTHER_ENDPOINT: Final = "no_other_endpoint"
NOT_IDEMPOTENT: Final = "not_idempotent"
NOT_REPLAYABLE: Final = "body_too_large"
BUDGET_EXHAUSTED: Final = "budget"
OVERFLOW: Final = "overflow"

# The backoff's random source (module-level: nothing allocated per retry).
RNG = random.Random()

IDEMPOTENT_METHODS: Final = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})

# Failure kinds an attempt can end with before its response head was relayed.
F_CONNECT: Final = 1  # no connection (refused, timed out): nothing reached the server
F_RESET: Final = 2  # the connection broke before a response head
F_TIMEOUT: Final = 3  # the per-try timeout fired before a response head
F_STATUS: Final = 4  # a response head with a status (and headers) the policy may retry
F_REFUSED: Final = 5  # the next hop said it did not process the request (see `remote`)
F_GRPC: Final = 6  # a gRPC call's grpc-status the policy may retry (`retriable_grpc`)

# Local-reply reasons of a remote sidecar (its `x-tether-error`) that say the request
# never reached its application (as HTTP/2's REFUSED_STREAM: safe to send again, for
# any method), and the one that says its application's connection broke mid-request.
_REFUSED_REASONS: Final = frozenset(
    {b"upstream_connect_error", b"upstream_connect_timeout", b"draining", b"overflow"}
)
_RESET_REASON: Final = b"upstream_reset"
_ERROR_HEADER: Final = b"x-tether-error"


@dataclass(frozen=True, slots=True)
class RetrySpec:
    """One retry policy, compiled from the schema's `RetryPolicy` (see proxy/cluster_spec.py)."""

    attempts: int = 2
    per_try_timeout: float = 0.0  # seconds; 0: none
    on: int = CONNECT_FAILURE | REFUSED_STREAM | RESET
    statuses: frozenset[int] = frozenset()
    headers: frozenset[bytes] = frozenset()  # lower-case names
    backoff_base: float = 0.025
    backoff_max: float = 0.25
    budget_ratio: float = 0.2
    budget_window: float = 10.0
    budget_min_per_second: int = 10
    non_idempotent: bool = False
    buffer_limit: int = 65536
    header_override: bool = False
    # Whether a status below 500 may be retried (retriable-status-codes or -headers):
    # otherwise the exchange looks no further at a response under 500.
    any_status: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "any_status", bool(self.on & (RETRIABLE_STATUS | RETRIABLE_HEADERS))
        )

    @classmethod
    def of(cls, p: schema.RetryPolicy) -> RetrySpec:
        on = 0
        for name in p.retry_on:
            on |= _BITS[name]
        return cls(
            attempts=p.attempts,
            per_try_timeout=float(p.per_try_timeout or 0.0),
            on=on,
            statuses=frozenset(p.retriable_status_codes),
            headers=frozenset(h.lower().encode("latin-1") for h in p.retriable_headers),
            backoff_base=p.backoff.base,
            backoff_max=p.backoff.max,
            budget_ratio=p.budget.ratio,
            budget_window=p.budget.window,
            budget_min_per_second=p.budget.min_per_second,
            non_idempotent=p.retry_non_idempotent,
            buffer_limit=p.buffer_limit,
            header_override=p.allow_header_override,
        )

    def retriable(
        self,
        failure: int,
        status: int = 0,
        header_names: frozenset[bytes] | None = None,
    ) -> bool:
        """Whether `retryOn` covers a failed attempt: `failure` is F_CONNECT, F_RESET,
        F_TIMEOUT or F_STATUS (then `status`, and the response's lower-case header
        names when `retriable-headers` is on)."""
        on = self.on
        if failure == F_CONNECT:
            # Nothing reached the server; gateway-error and 5xx include it, as Envoy's do.
            return bool(on & (CONNECT_FAILURE | GATEWAY_ERROR | STATUS_5XX))
        if failure == F_RESET:
            return bool(on & (RESET | GATEWAY_ERROR | STATUS_5XX))
        if failure == F_REFUSED:
            return bool(on & (REFUSED_STREAM | CONNECT_FAILURE))
        if failure == F_TIMEOUT:
            # A per-try timeout is a gateway error (Envoy: 5xx and gateway-error cover it).
            return bool(on & (GATEWAY_ERROR | STATUS_5XX))
        if status >= 500 and on & STATUS_5XX:
            return True
        if status in (502, 503, 504) and on & GATEWAY_ERROR:
            return True
        if on & RETRIABLE_STATUS and status in self.statuses:
            return True
        if on & RETRIABLE_HEADERS and header_names is not None:
            return not self.headers.isdisjoint(header_names)
        return False

    def retriable_grpc(self, code: int) -> bool:
        """Whether `retryOn` names the gRPC status `code` (cancelled, deadline-exceeded,
        internal, resource-exhausted, unavailable)."""
        return bool(self.on & _GRPC_BITS.get(code, 0))

    @property
    def reads_grpc(self) -> bool:
        """Whether `retryOn` names a gRPC status (then a gRPC response waits for its
        status before it is relayed, proxy/h2_retry.py)."""
        return bool(self.on & GRPC_ANY)

    @property
    def reads_headers(self) -> bool:
        return bool(self.on & RETRIABLE_HEADERS)

    def override(self, attempts: bytes | None, retry_on: bytes | None) -> RetrySpec:
        """The policy as a request's `x-tether-retry-attempts` / `x-tether-retry-on`
        headers change it (when `allowHeaderOverride`): attempts may only go down;
        unknown retryOn names are ignored. Invalid values leave the policy as is."""
        spec = self
        if attempts is not None and attempts.strip().isdigit():
            n = int(attempts)
            if 1 <= n < spec.attempts:
                spec = _replace(spec, attempts=n)
        if retry_on is not None:
            on = 0
            for part in retry_on.decode("latin-1").split(","):
                on |= _BITS.get(part.strip(), 0)
            if on:
                spec = _replace(spec, on=on)
        return spec


_RETRY_ATTEMPTS: Final = b"x-tether-retry-attempts"
_RETRY_ON: Final = b"x-tether-retry-on"


def overridden(spec: RetrySpec, headers: list[tuple[bytes, bytes]]) -> RetrySpec:
    """The policy as a request's x-tether-retry-* headers change it (allowHeaderOverride),
    for the HTTP/1 exchange and HTTP/2 streams alike."""
    attempts = on = None
    for name, value in headers:
        low = name.lower()
        if low == _RETRY_ATTEMPTS:
            attempts = value
        elif low == _RETRY_ON:
            on = value
    return spec.override(attempts, on) if attempts is not None or on is not None else spec


def remote(status: int, headers: list[tuple[bytes, bytes]]) -> int:
    """What a 502/503 from the next hop means when it is a remote sidecar's local reply:
    F_REFUSED (its app was never reached), F_RESET (its app's connection broke), or 0
    (an application's own error, or not a sidecar's)."""
    if status not in (502, 503):
        return 0
    for name, value in headers:
        if name.lower() == _ERROR_HEADER:
            if value in _REFUSED_REASONS:
                return F_REFUSED
            return F_RESET if value == _RESET_REASON else 0
    return 0


def _replace(spec: RetrySpec, **changes: object) -> RetrySpec:
    import dataclasses

    return dataclasses.replace(spec, **changes)  # type: ignore[arg-type]


def may_retry(
    spec: RetrySpec,
    attempt: int,
    method: bytes,
    replayable: bool,
    budget: RetryBudget,
    now: float,
    refused: bool = False,
) -> str:
    """ "" when attempt `attempt + 1` may go out, else why not (NO_ATTEMPTS_LEFT,
    NOT_IDEMPOTENT, NOT_REPLAYABLE, BUDGET_EXHAUSTED). A `refused` request (one that
    reached no application: a connect failure, a remote sidecar's refusal) may be sent
    again whatever its method. The budget is asked last, and charged by the caller
    (`budget.spend`) once the retry is decided."""
    if attempt >= spec.attempts:
        return NO_ATTEMPTS_LEFT
    if not (spec.non_idempotent or refused) and method not in IDEMPOTENT_METHODS:
        return NOT_IDEMPOTENT
    if not replayable:
        return NOT_REPLAYABLE
    if not budget.allows(now):
        return BUDGET_EXHAUSTED
    return ""


# The policy in force where none is configured (MeshConfig and ServiceDefaults without
# `retries`): 2 attempts for connect failures, refusals and resets of idempotent
# requests. `retries: {attempts: 1}` turns retries off.
DEFAULT = RetrySpec()


def backoff(spec: RetrySpec, retry: int, rng: random.Random) -> float:
    """Seconds to wait before retry number `retry` (1 for the first): full jitter."""
    cap = min(spec.backoff_max, spec.backoff_base * (1 << min(retry - 1, 30)))
    return rng.random() * cap


class RetryBudget:
    """Requests and retries over a sliding window, in `buckets` slices of it.

    A retry is allowed while retries in the window < ratio * requests in the window +
    minPerSecond * window. One per destination (service, or Route rule with its own
    retries), kept across snapshots while its settings stay the same.

    Every request is counted, so the count costs as little as it can: a request in the
    slice of the last one (nearly all) adds one to `_pending`, a plain counter, after
    one comparison with the slice's end. The counter goes into its slice's bucket when
    the slices move on or a decision reads the window (only after a failed attempt)."""

    __slots__ = (
        "_pending",
        "_requests",
        "_retries",
        "_size",
        "_start",
        "_until",
        "min_per_second",
        "ratio",
        "slice",
        "window",
    )

    def __init__(self, ratio: float, window: float, min_per_second: int, buckets: int = 10) -> None:
        self.ratio = ratio
        self.window = window
        self.min_per_second = min_per_second
        self.slice = window / buckets
        self._requests = [0] * buckets
        self._retries = [0] * buckets
        self._size = buckets
        self._start = 0  # the slice number bucket 0.. was last cleared at
        self._until = self.slice  # where the slice `_start` ends
        self._pending = 0  # requests of the slice `_start` not yet in its bucket

    @classmethod
    def of(cls, spec: RetrySpec) -> RetryBudget:
        return cls(spec.budget_ratio, spec.budget_window, spec.budget_min_per_second)

    def _index(self, now: float) -> int:
        size = self._size
        start = self._start
        pending = self._pending
        if pending:
            self._requests[start % size] += pending
            self._pending = 0
        n = int(now / self.slice)
        if n != start:
            # Clear the slices that went by since the last one written (all, after a
            # whole window of silence).
            gone = min(n - start, size) if n > start else size
            for k in range(1, gone + 1):
                i = (start + k) % size
                self._requests[i] = 0
                self._retries[i] = 0
            self._start = n
            self._until = (n + 1) * self.slice
        return n % size

    def request(self, now: float) -> None:
        """A request (its first attempt) went out: once per request, so the common
        case (the slice of the last one) is a comparison and an addition."""
        if now < self._until:
            self._pending += 1
        else:
            self._index(now)
            self._pending = 1

    def allows(self, now: float) -> bool:
        self._index(now)
        allowed = self.ratio * sum(self._requests) + self.min_per_second * self.window
        return sum(self._retries) < allowed

    def spend(self, now: float) -> None:
        """A retry went out."""
        self._retries[self._index(now)] += 1

    def counts(self, now: float) -> tuple[int, int]:
        """(requests, retries) in the window ending at `now`."""
        self._index(now)
        return sum(self._requests), sum(self._retries)

    def __repr__(self) -> str:
        return (
            f"<RetryBudget ratio={self.ratio} window={self.window}s "
            f"min={self.min_per_second}/s requests={sum(self._requests) + self._pending} "
            f"retries={sum(self._retries)}>"
        )
