"""The exchange's vocabulary: its states and state table, what its connection does after
it, why reading pauses, and the interfaces it acts through (`Downstream`, `Server`).

The constants are plain integers (compared on every event), shared by the exchange
(proxy/exchange.py), its attempts (proxy/attempts.py) and the HTTP/1 connection
(proxy/downstream.py), which implements `Downstream` (and its ProxyServer `Server`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final, Protocol

from proxy.forwarding import Forwarder

if TYPE_CHECKING:
    from collections.abc import Callable

    from proxy.access_log import ListenerAccessLog
    from proxy.exchange import Exchange
    from proxy.forwarding import ResponseMemo
    from proxy.heads import RequestHead
    from proxy.route_result import Peer, RouteResult
    from proxy.stats import ProxyStats
    from proxy.trace_context import ListenerTracing

ROUTING: Final = 0  # the head is in; waiting for the router's answer
CONNECTING: Final = 1  # routed to a pool; waiting for a connection
DIALING: Final = 2  # CONNECT: the tunnel's connection is being dialled
SENDING: Final = 3  # an upstream connection carries the request; no response head yet
RESPONDING: Final = 4  # the response head went to the client; its body follows
SWITCHING: Final = 5  # 101 relayed; the upstream connection becomes a tunnel
ENDED: Final = 6
STATE_NAMES: Final = (
    "routing",
    "connecting",
    "dialing",
    "sending",
    "responding",
    "switching",
    "ended",
)

# What the connection does once the exchange ended (`after`).
KEEP: Final = 0  # ready for the next request
CLOSE: Final = 1  # write what is pending, then close
ABORT: Final = 2  # the response was cut short: reset, so the client cannot take it as whole
TUNNEL: Final = 3  # splice the client with `tunnel` (transport, bytes it sent first)
GONE: Final = 4  # the client left: nothing to do
SERVE: Final = 5  # CONNECT to a mesh name answered: serve what follows as new requests

# Why reading from the client is paused (bits; reading resumes when none is left).
PAUSE_BACKLOG: Final = 1  # pipelined requests wait behind the one in flight
PAUSE_CONNECTING: Final = 4  # no upstream connection yet; body pieces would pile up
PAUSE_SWITCHING: Final = 8  # Upgrade/CONNECT: bytes after the head wait for the tunnel

# Deadlines: idle (renewed by progress), request (from the request's end to the response).
T_IDLE: Final = 0
T_REQUEST: Final = 1

# The state table as data: event -> the states it is valid in (anything else raises,
# except in ENDED, where the events in `LATE` are dropped).
TABLE: Final[dict[str, frozenset[int]]] = {
    "request_body": frozenset({ROUTING, CONNECTING, DIALING, SENDING, RESPONDING}),
    "request_end": frozenset({ROUTING, CONNECTING, DIALING, SENDING, RESPONDING}),
    "routed": frozenset({ROUTING}),
    "upstream_ready": frozenset({CONNECTING}),
    "upstream_failed": frozenset({CONNECTING}),
    "tunnel_ready": frozenset({DIALING}),
    "tunnel_failed": frozenset({DIALING}),
    "informational": frozenset({SENDING}),
    "response_head": frozenset({SENDING}),
    "response_body": frozenset({RESPONDING}),
    "response_end": frozenset({RESPONDING, SWITCHING}),
    "upstream_switched": frozenset({SWITCHING}),
    "upstream_lost": frozenset({SENDING, RESPONDING, SWITCHING}),
    "deadline": frozenset({ROUTING, CONNECTING, DIALING, SENDING, RESPONDING, SWITCHING}),
    "client_gone": frozenset({ROUTING, CONNECTING, DIALING, SENDING, RESPONDING, SWITCHING}),
    "bad_request": frozenset({ROUTING, CONNECTING, DIALING, SENDING, RESPONDING, SWITCHING}),
    "last_request": frozenset({ROUTING, CONNECTING, DIALING, SENDING, RESPONDING, SWITCHING}),
}
# Events that may arrive after the end and are dropped (their resources given back):
# all but the response events, which come only from the upstream bound to the exchange.
LATE: Final = frozenset(TABLE) - {
    "informational",
    "response_head",
    "response_body",
    "response_end",
}


class TimerHandle(Protocol):
    def cancel(self) -> None: ...


class Rerouter(Protocol):
    def retry_route(
        self, head: RequestHead, peer: Peer, previous: RouteResult, tried: list[Any]
    ) -> RouteResult:
        """Where a retry goes: another endpoint of `previous`'s cluster where one is
        available (not in `tried`), else `previous`."""


class Timeouts(Protocol):
    """Seconds (proxy/downstream.py's TimeoutPolicy)."""

    @property
    def idle(self) -> float: ...
    @property
    def request(self) -> float: ...


class Server(Forwarder, Protocol):
    """What an exchange reads of its listener (proxy/downstream.py's ProxyServer)."""

    @property
    def router(self) -> Rerouter: ...
    def call_later(self, delay: float, callback: Callable[[], None]) -> TimerHandle:
        """Per-try timeouts and retry backoff (only requests with a retry policy)."""

    @property
    def timeouts(self) -> Timeouts: ...
    @property
    def stats(self) -> ProxyStats: ...
    @property
    def draining(self) -> bool: ...
    # Tracing (proxy/tracing.py) and the access log (proxy/access_log.py): None when off.
    @property
    def tracer(self) -> ListenerTracing | None: ...
    @property
    def access_log(self) -> ListenerAccessLog | None: ...
    def clock(self) -> float: ...


class Downstream(Protocol):
    """What an exchange needs of the connection that carries it (its actions)."""

    @property
    def server(self) -> Server: ...
    @property
    def peer(self) -> Peer: ...
    @property
    def memo(self) -> ResponseMemo: ...

    # Bytes waiting for flush(): to the client, and to the upstream connection.
    wbuf: list[bytes]
    ubuf: list[bytes]

    def flush(self) -> None: ...
    def set_pause(self, bit: int) -> None: ...
    def clear_pause(self, bit: int) -> None: ...
    def dial(self, exchange: Exchange, host: str, port: int) -> None:
        """CONNECT: dial host:port, then call on_tunnel_ready / on_tunnel_failed."""

    def exchange_done(self, exchange: Exchange, now: float) -> None:
        """The exchange ended (`exchange.after` says what the connection does next)."""
