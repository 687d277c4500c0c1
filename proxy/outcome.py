"""Outcomes: how one request ended, the single value everything after the end reads.

An exchange (proxy/exchange.py) ends exactly once, with one of these. Stats, the
balancer's tracker, and later outlier detection, retry budgets, spans and access-log
lines read the outcome, never the connection's fields. Each kind is its own type, so
a reader can `match` on it:

- `Completed(status)`: the upstream's response was relayed to its end (also `101`, and
  CONNECT's `200`); ok for the balancer when `status < 500`.
- `LocalReply(reason, status)`: the sidecar answered itself before any upstream
  response (routing, overflow, a bad request).
- `ConnectFailure(reason, status)`: no connection to the endpoint could be had
  (connect error or timeout, the pool closed).
- `Reset(reason, status)`: the upstream connection failed mid-exchange (closed, or sent
  a bad response); status 502, or 0 when the response was already cut short.
- `Timeout(which, ...)`: a timeout fired: `request` (no response head in time),
  `per_try` (an attempt's head not in time) or `idle` (no progress); 504, or 0 when
  the response was cut short.
- `ClientGone()`: the client closed or reset its connection first (status 0).

`grpc_status` is the gRPC status a gRPC caller received (-1 otherwise): the relayed
`grpc-status` trailer, or the code of the sidecar's own gRPC error.

`status` is what the client received (0: nothing complete); every kind but a
`Completed` below 500 counts as a failure (`ok` False).

Outcomes hold no per-request data beyond these fields, so the common ones are shared
instances (`completed(200)` allocates nothing after the first 200).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

TimeoutKind = Literal["request", "idle", "per_try"]


@dataclass(frozen=True, slots=True)
class Outcome:
    """Base of every outcome. `status` is what the client received (0: nothing complete);
    `reason` is the local-reply reason (`x-tether-error`), "" for a relayed response."""

    status: int = 0
    reason: str = ""
    # Whether the balancer (and later outlier detection) counts it as a success: a
    # field, not a property, as it is read once per request.
    ok: bool = field(default=False, init=False, repr=False, compare=False)
    # The gRPC status the caller received (grpc-status), -1 when not a gRPC call: what
    # retry policies read to retry on `unavailable`, `resource-exhausted`, ...
    grpc_status: int = field(default=-1, kw_only=True)

    @property
    def kind(self) -> str:
        return type(self).__name__


@dataclass(frozen=True, slots=True)
class Completed(Outcome):
    def __post_init__(self) -> None:
        object.__setattr__(self, "ok", 0 < self.status < 500)


@dataclass(frozen=True, slots=True)
class LocalReply(Outcome):
    pass


@dataclass(frozen=True, slots=True)
class ConnectFailure(Outcome):
    pass


@dataclass(frozen=True, slots=True)
class Reset(Outcome):
    pass


@dataclass(frozen=True, slots=True)
class Timeout(Outcome):
    which: TimeoutKind = "request"


@dataclass(frozen=True, slots=True)
class ClientGone(Outcome):
    pass


CLIENT_GONE = ClientGone()
_COMPLETED: dict[int, Completed] = {}
_LOCAL: dict[tuple[type[Outcome], str, int], Outcome] = {}


def completed(status: int) -> Completed:
    """The shared `Completed` outcome for `status`."""
    out = _COMPLETED.get(status)
    if out is None:
        out = _COMPLETED[status] = Completed(status)
    return out


def local(cls: type[Outcome], reason: str, status: int) -> Outcome:
    """The shared outcome of kind `cls` (LocalReply, ConnectFailure, Reset) for a reason."""
    key = (cls, reason, status)
    out = _LOCAL.get(key)
    if out is None:
        out = _LOCAL[key] = cls(status, reason)
    return out


def timeout(which: TimeoutKind, reason: str, status: int) -> Timeout:
    key = (Timeout, f"{reason}/{which}", status)
    out = _LOCAL.get(key)
    if out is None:
        out = _LOCAL[key] = Timeout(status, reason, which)
    assert isinstance(out, Timeout)
    return out


_GRPC: dict[tuple[Outcome, int], Outcome] = {}


def with_grpc(outcome: Outcome, grpc_status: int) -> Outcome:
    """The shared copy of `outcome` that says which gRPC status the caller received."""
    key = (outcome, grpc_status)
    out = _GRPC.get(key)
    if out is None:
        if len(_GRPC) > 4096:  # grpc-status is the peer's: bound what it can grow
            _GRPC.clear()
        out = _GRPC[key] = replace(outcome, grpc_status=grpc_status)
    return out
