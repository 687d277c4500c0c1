"""An HTTP/2 connection to an upstream (the remote sidecar, or an app that speaks h2c).

Many streams share one `H2UpstreamConnection`; each is opened by an exchange
(`open_stream`) whose upstream side is the stream's sink. The connection does not dial:
its pool (proxy/h2_pool.py) gives it a transport, plain TCP (h2c, prior knowledge) or
TLS that negotiated ALPN `h2`, and it behaves the same on either.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from h2.errors import ErrorCodes

from proxy.h2_link import Fields, H2Link, StreamSink

if TYPE_CHECKING:
    from proxy.h2_pool import H2Pool


class H2UpstreamConnection(H2Link):
    """One pooled HTTP/2 client connection."""

    def __init__(self, pool: H2Pool) -> None:
        super().__init__(server=False)
        self.pool = pool
        self.idle_since = 0.0
        self.streams_opened = 0

    @property
    def capacity(self) -> int:
        """How many more streams the peer lets us open now."""
        if self.closed or self.goaway:
            return 0
        # Our streams are those with a sink (h2's own count walks every stream).
        return self.h2.remote_settings.max_concurrent_streams - len(self.sinks)

    def open_stream(self, sink: StreamSink, headers: Fields, end: bool) -> int:
        sid: int = self.h2.get_next_available_stream_id()
        self.sinks[sid] = sink
        self.streams_opened += 1
        self.send_headers(sid, headers, end)
        self.flush()
        return sid

    def on_request(self, stream_id: int, headers: Fields, end: bool) -> None:
        # Server push is disabled in our SETTINGS; h2 refuses PUSH_PROMISE itself.
        self.h2.reset_stream(stream_id, ErrorCodes.REFUSED_STREAM)

    def stream_closed(self, stream_id: int) -> None:
        self.pool.stream_closed(self)

    def connection_gone(self) -> None:
        self.pool.connection_gone(self)

    def __repr__(self) -> str:
        state = " closed" if self.closed else (" goaway" if self.goaway else "")
        return f"<H2UpstreamConnection {self.pool.name} streams={len(self.sinks)}{state}>"
