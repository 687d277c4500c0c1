"""An HTTP/2 stream carried to an HTTP/1.1 app: the inbound sidecar's bridge.

When an HTTP/2 stream reaches the inbound listener and the app speaks HTTP/1.1 only (its
protocol is `http`), the stream's `H2Exchange` takes an HTTP/1 connection from the
app's ordinary pool (proxy/pool.py) through an `H1Bridge`, which looks to the exchange
like one stream of an HTTP/2 upstream (`open_stream`, `send_data`, `send_trailers`,
`open_window`, `reset`) and to the HTTP/1 connection like its exchange (the response
codec's sink). It writes the request as HTTP/1.1 (chunked when its length is not known
up front, with the request's trailers in the last chunk) and turns the response head,
body and trailers back into HTTP/2 events, names lowercased (RFC 9113 8.2.2), hop-by-hop
fields already left out by the codec.

Back-pressure: request bytes open the client's stream window once written to the app's
socket, unless that socket's buffer is full (`set_pause`), in which case the window
waits; response bytes stop being read from the app while the client's stream has a
window's worth queued (`H2Link.queued`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from proxy import local_reply
from proxy.h2_link import STREAM_WINDOW, Fields, flush_touched
from proxy.heads import chunk_prefix, encode_last_chunk
from proxy.pool import PoolOverflowError

if TYPE_CHECKING:
    from proxy.h2_exchange import H2Exchange
    from proxy.heads import ResponseHead
    from proxy.pool import Pool
    from proxy.upstream import UpstreamConnection

# Not passed to an HTTP/1.1 app: `te` is hop-by-hop there (RFC 9110 7.6.1), and the
# framing is the bridge's.
_DROP_TO_H1 = frozenset({b"te", b"content-length", b"transfer-encoding", b"host"})
_BODY_METHODS = frozenset({b"POST", b"PUT", b"PATCH"})


class H1Bridge:
    """One HTTP/2 stream over one HTTP/1 connection (see the module's docstring)."""

    __slots__ = (
        "_credit",
        "chunked",
        "closed",
        "ex",
        "goaway",
        "h1pool",
        "paused",
        "up",
    )

    def __init__(self, ex: H2Exchange, h1pool: Pool) -> None:
        self.ex = ex
        self.h1pool = h1pool
        self.up: UpstreamConnection | None = None
        self.chunked = False
        self.paused = False  # the app's socket buffer is full
        self._credit = 0  # request bytes written while paused: the window they owe
        self.closed = False
        self.goaway = False

    # -- as the exchange's pool -----------------------------------------------------------

    def acquire(self, waiter: H2Exchange) -> H1Bridge | None:
        try:
            up = self.h1pool.acquire(self)
        except PoolOverflowError as e:
            from proxy.h2_pool import H2PoolOverflowError

            raise H2PoolOverflowError(str(e)) from e
        if up is None:
            return None
        self.up = up
        return self

    def cancel(self, waiter: H2Exchange) -> None:
        self.h1pool.cancel(self)

    def on_upstream_ready(self, conn: UpstreamConnection) -> None:
        self.up = conn
        self.ex.on_h2_ready(self)
        if self.ex.upstream is not self:
            self.h1pool.release(conn, self.ex.conn.front.clock())
        flush_touched()

    def on_upstream_failed(self, reason: str, message: str) -> None:
        self.ex.on_h2_failed(reason, message)
        flush_touched()

    # -- as the exchange's upstream stream ----------------------------------------------

    def open_stream(self, sink: object, headers: Fields, end: bool) -> int:
        up = self.up
        assert up is not None
        method = path = authority = b""
        fields: list[bytes] = []
        length: bytes | None = None
        for name, value in headers:
            if name[:1] == b":":
                if name == b":method":
                    method = value
                elif name == b":path":
                    path = value
                elif name == b":authority":
                    authority = value
            elif name == b"content-length":
                length = value
            elif name not in _DROP_TO_H1:
                fields.append(name + b": " + value + b"\r\n")
        if length is not None:
            framing = b"Content-Length: " + length + b"\r\n"
        elif end:
            framing = b"Content-Length: 0\r\n" if method in _BODY_METHODS else b""
        else:
            self.chunked = True
            framing = b"Transfer-Encoding: chunked\r\n"
        up.bind(self, method == b"HEAD")
        up.transport.write(
            b"".join(
                (method, b" ", path, b" HTTP/1.1\r\nHost: ", authority, b"\r\n", *fields),
            )
            + framing
            + b"\r\n"
        )
        return 1

    def send_data(self, sid: int, data: bytes, end: bool = False) -> None:
        up = self.up
        if up is None or up.closed:
            return
        out = []
        if data:
            if self.chunked:
                out += [chunk_prefix(len(data)), data, b"\r\n"]
            else:
                out.append(data)
        if end and self.chunked:
            out.append(b"0\r\n\r\n")
        if out:
            up.transport.writelines(out)
        self._written(len(data))

    def send_trailers(self, sid: int, headers: Fields) -> None:
        up = self.up
        if up is None or up.closed:
            return
        if self.chunked:
            up.transport.write(encode_last_chunk(headers))
        # With a Content-Length the request had no room for trailers: they are dropped.

    def _written(self, size: int) -> None:
        """Request bytes went to the app's socket: the client may send as much again."""
        if self.paused:
            self._credit += size
            return
        ex = self.ex
        ex.conn.open_window(ex.sid, size)
        ex.conn.touch()

    def open_window(self, sid: int, size: int) -> None:
        # Response bytes left for the client: read from the app again when room is back.
        up = self.up
        ex = self.ex
        if up is not None and up.reading_paused and ex.conn.queued(ex.sid) < STREAM_WINDOW:
            up.resume()

    def reset(self, sid: int, code: int = 0) -> None:
        """The stream was abandoned: the HTTP/1 connection's state is unknown."""
        up = self.up
        self.up = None
        if up is not None:
            up.unbind()
            up.abort()

    def touch(self) -> None:
        pass  # writes go to the socket at once

    def flush(self) -> None:
        ex = self.ex
        ex.conn.flush()
        flush_touched()

    def finished_receiving(self, sid: int) -> None:
        pass  # the connection went back to its pool with the response's end

    # -- as the HTTP/1 connection's exchange (its codec's sink) -------------------------

    @property
    def progress(self) -> int:
        return self.ex.progress

    @progress.setter
    def progress(self, value: int) -> None:
        self.ex.progress = value

    def on_informational(self, head: ResponseHead) -> None:
        pass  # 1xx are not relayed to HTTP/2 callers

    def on_response_head(self, head: ResponseHead) -> None:
        fields: Fields = [(b":status", b"%d" % head.status)]
        fields.extend((n.lower(), v) for n, v in head.headers)
        if head.content_length is not None and not head.chunked:
            fields.append((b"content-length", b"%d" % head.content_length))
        if not head.keep_alive and self.up is not None:
            self.up.keep_alive = False
        self.ex.on_response_head(fields, False)

    def on_response_body(self, data: bytes) -> None:
        ex = self.ex
        ex.on_response_data(data, False)
        up = self.up
        if up is not None and ex.conn.queued(ex.sid) >= STREAM_WINDOW:
            up.pause()

    def on_response_end(self, trailers: Fields | None) -> None:
        ex = self.ex
        up = self.up
        self.up = None
        if up is not None:
            if ex.req_done:
                self.h1pool.release(up, ex.conn.front.clock())
            else:
                up.unbind()
                up.close()
        if trailers:
            ex.on_response_trailers([(n.lower(), v) for n, v in trailers])
        else:
            ex.on_response_data(b"", True)

    def on_upstream_switched(self, conn: UpstreamConnection, rest: bytes) -> None:
        conn.abort()
        self.up = None
        self.ex.on_upstream_reset(-1, "the app switched protocols on an HTTP/2 stream")

    def on_upstream_lost(self, conn: UpstreamConnection, reason: str, message: str) -> None:
        self.up = None
        conn.unbind()
        self.ex.on_upstream_reset(-1, message or local_reply.UPSTREAM_RESET)

    def set_pause(self, bit: int) -> None:
        self.paused = True

    def clear_pause(self, bit: int) -> None:
        self.paused = False
        credit, self._credit = self._credit, 0
        if credit:
            self._written(credit)

    def __repr__(self) -> str:
        return f"<H1Bridge {self.h1pool.name} {self.up!r}>"
