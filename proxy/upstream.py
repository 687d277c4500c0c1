"""One pooled upstream connection: writes a request, parses its response into a downstream.

An `UpstreamConnection` carries one request at a time. While it does, `sink` is the
downstream connection that owns the exchange and `codec.sink` points at the same object,
so response events go straight from llhttp to the downstream without a hop through
here. Flow control is symmetric: when this socket's write buffer fills, the downstream
stops reading its client; when the downstream's fills, `pause()` stops reading here.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any, Final, Protocol, cast

from proxy.errors import BadMessageError
from proxy.heads import ResponseHead
from proxy.response_codec import ResponseCodec

if TYPE_CHECKING:
    from proxy.exchange import Exchange as HttpExchange
    from proxy.pool import Pool

# The downstream's pause reason for "the upstream socket's write buffer is full".
PAUSE_UPSTREAM: Final = 2
# Per-socket write buffer bounds: what one connection may hold in user space.
WRITE_HIGH: Final = 256 * 1024
WRITE_LOW: Final = 64 * 1024


class Exchange(Protocol):
    """What an upstream connection reports to the exchange whose request it carries
    (proxy/exchange.py): the response events (as its codec's sink), a switch to a
    tunnel, its loss; `flush` writes what they produced, `progress` counts activity."""

    progress: int

    def on_response_head(self, head: ResponseHead) -> None: ...

    def on_informational(self, head: ResponseHead) -> None: ...

    def on_response_body(self, data: bytes) -> None: ...

    def on_response_end(self, trailers: list[tuple[bytes, bytes]] | None) -> None: ...

    def on_upstream_switched(self, conn: UpstreamConnection, rest: bytes) -> None: ...

    def on_upstream_lost(self, conn: UpstreamConnection, reason: str, message: str) -> None: ...

    def flush(self) -> None: ...

    def set_pause(self, bit: int) -> None: ...

    def clear_pause(self, bit: int) -> None: ...


class _Unowned:
    """Sink of an idle connection's codec: an idle connection must receive nothing."""

    def on_response_head(self, head: ResponseHead) -> None:
        raise BadMessageError("response without a request", status=502)

    def on_informational(self, head: ResponseHead) -> None:
        raise BadMessageError("response without a request", status=502)

    def on_response_body(self, data: bytes) -> None:
        raise BadMessageError("response without a request", status=502)

    def on_response_end(self, trailers: Any) -> None:
        raise BadMessageError("response without a request", status=502)


UNOWNED: Final = _Unowned()


class _ExchangeType:
    """proxy.exchange.Exchange, imported on the first bind (it imports this module).
    An instance of exactly that class is called directly, as a compiled class (the
    `Exchange` protocol above goes through Python's method calls); any other sink
    (HTTP/2's bridge, tests' fakes) through the protocol."""

    def __init__(self) -> None:
        self.cls: type | None = None

    def get(self) -> type:
        cls = self.cls
        if cls is None:
            from proxy.exchange import Exchange as HttpExchange

            self.cls = cls = HttpExchange
        return cls


_EXCHANGE_TYPE: Final = _ExchangeType()


class UpstreamConnection(asyncio.Protocol):
    __slots__ = (
        "closed",
        "codec",
        "idle_since",
        "keep_alive",
        "native",
        "pool",
        "reading_paused",
        "requests",
        "sink",
        "transport",
    )

    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self.transport: Any = None
        self.codec = ResponseCodec(UNOWNED, pool.head_cache)
        self.sink: Exchange | None = None
        # `sink` when it is a proxy.exchange.Exchange (see _ExchangeType), else None.
        self.native: HttpExchange | None = None
        self.keep_alive = True
        self.closed = False
        self.requests = 0
        self.idle_since = 0.0
        self.reading_paused = False

    @property
    def reusable(self) -> bool:
        """Safe to carry another request: open, keep-alive, and its response fully read."""
        return not self.closed and self.keep_alive and self.codec.idle

    def bind(self, exchange: Exchange, head_request: bool) -> None:
        """Carry `exchange`'s request."""
        self.sink = exchange
        codec = self.codec
        codec.sink = exchange
        if type(exchange) is _EXCHANGE_TYPE.get():
            native = cast("HttpExchange", exchange)
            self.native = native
            codec.native = native
        else:
            self.native = codec.native = None
        codec.head_request = head_request
        self.requests += 1

    def unbind(self) -> None:
        self.sink = None
        self.native = None
        codec = self.codec
        codec.sink = UNOWNED
        codec.native = None
        if self.reading_paused:
            self.reading_paused = False
            if not self.closed:
                self.transport.resume_reading()

    def pause(self) -> None:
        if not self.reading_paused and not self.closed:
            self.reading_paused = True
            self.transport.pause_reading()

    def resume(self) -> None:
        if self.reading_paused and not self.closed:
            self.reading_paused = False
            self.transport.resume_reading()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.transport.close()
            self.pool.discard(self)

    def abort(self) -> None:
        if not self.closed:
            self.closed = True
            self.transport.abort()
            self.pool.discard(self)

    # asyncio.Protocol ---------------------------------------------------------------

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        transport.set_write_buffer_limits(WRITE_HIGH, WRITE_LOW)

    def data_received(self, data: bytes) -> None:
        exchange = self.sink
        if exchange is None:
            # Unsolicited bytes on an idle connection (e.g. a 408 before closing): the
            # connection's state is unknown, so it is never reused.
            self.abort()
            return
        native = self.native
        if native is not None:
            native.progress += 1
        else:
            exchange.progress += 1
        try:
            rest = self.codec.feed(data)
        except BadMessageError as e:
            self.abort()
            exchange.on_upstream_lost(self, e.reason, e.message)
            exchange.flush()
            return
        if rest is not None:
            exchange.on_upstream_switched(self, rest)
        elif native is not None:
            native.flush()
        else:
            exchange.flush()

    def eof_received(self) -> bool:
        return False  # half-closed upstream: close; connection_lost does the accounting

    def connection_lost(self, exc: Exception | None) -> None:
        was_closed = self.closed
        self.closed = True
        if not was_closed:
            self.pool.discard(self)
        exchange = self.sink
        if exchange is None:
            return
        if self.codec.feed_eof():
            exchange.flush()
            return
        if self.sink is exchange:
            message = str(exc) if exc else "connection closed before the response ended"
            exchange.on_upstream_lost(self, "upstream_reset", message)
            exchange.flush()

    def pause_writing(self) -> None:
        exchange = self.sink
        if exchange is not None:
            exchange.set_pause(PAUSE_UPSTREAM)

    def resume_writing(self) -> None:
        exchange = self.sink
        if exchange is not None:
            exchange.clear_pause(PAUSE_UPSTREAM)

    def __repr__(self) -> str:
        state = "closed" if self.closed else ("busy" if self.sink is not None else "idle")
        return f"<UpstreamConnection {self.pool.name} {state} requests={self.requests}>"
