"""One HTTP/2 connection's socket side: the `h2` state machine, its writes, and flow control.

`H2Link` is the asyncio protocol both ends share (proxy/h2_downstream.py serves clients,
proxy/h2_upstream.py dials upstreams). All framing, HPACK and the protocol's rules are
the `h2` library's (sans-IO); this module only moves bytes and events:

- Received events go to the stream's `StreamSink` (`sinks[stream_id]`).
- Sending: `send_data` queues a stream's body and `_pump` frames only what the peer's
  flow-control windows (stream and connection) and the socket's write buffer allow;
  the rest waits per stream until a WINDOW_UPDATE or `resume_writing`. Each sent piece
  is reported to its sink (`on_sent`), so the exchange opens the *other* side's window
  by exactly that much: a stream's bytes in flight through the sidecar never exceed
  the stream window it advertised (`STREAM_WINDOW`), whatever the reader's speed.
- Receiving: the connection-level window is reopened as soon as bytes arrive (memory
  stays bounded by the per-stream windows times the concurrent streams), the stream
  window only when its bytes were passed on (`open_window`). So a slow reader stalls
  its own stream and nothing else.
- A protocol error from `h2` (malformed frame, HPACK bomb, flow-control violation)
  sends GOAWAY with `h2`'s error code and closes the connection; every stream on it
  hears `on_reset`, and nothing of the bad frame is forwarded.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections import deque
from typing import Any, Protocol

from h2 import __version__ as h2_version
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    Event,
    RemoteSettingsChanged,
    RequestReceived,
    ResponseReceived,
    StreamEnded,
    StreamReset,
    TrailersReceived,
    WindowUpdated,
)
from h2.exceptions import FlowControlError, ProtocolError, StreamClosedError
from h2.settings import SettingCodes
from hyperframe.frame import Frame, GoAwayFrame

Fields = list[tuple[bytes, bytes]]

# What each side advertises. The stream window bounds the bytes of one stream held in
# the sidecar; the connection window is large so that one stalled stream (which holds
# at most its stream window) leaves room for the others.
STREAM_WINDOW = 256 * 1024
CONNECTION_WINDOW = 16 * 1024 * 1024
MAX_CONCURRENT_STREAMS = 128
MAX_HEADER_LIST_SIZE = 64 * 1024  # as the HTTP/1 listener's head limit
MAX_FRAME_SIZE = 16384
# Connection-level credit is returned in batches of at least this much.
_CONN_CREDIT_BATCH = CONNECTION_WINDOW // 4
WRITE_HIGH = 256 * 1024
WRITE_LOW = 64 * 1024


# Links written to while another link's events were handled: flushed, one write each,
# when that handling ends (`flush_touched`), so a read that moves many streams' bytes
# costs one write per connection, not one per frame.
_TOUCHED: list[H2Link] = []


def flush_touched() -> None:
    while _TOUCHED:
        link = _TOUCHED.pop()
        link.touched = False
        link.flush()


# Graceful GOAWAY. `h2` (up to 4.4 at least, python-hyper/h2 issue #1181, open) moves its
# whole state machine to CLOSED at any GOAWAY, sent or received, and has no public way
# to keep the streams a graceful one covers. A NO_ERROR GOAWAY from a peer (another
# sidecar draining, a gRPC server stopping) would cut every stream in flight. The one
# way in is `H2Connection._receive_goaway_frame(frame)`, a private method: it is
# replaced below only on `h2` releases where that method was checked to exist with that
# signature and to return (frames, events), the releases in `H2_VERIFIED` (the tests
# in tests/test_h2.py run against the installed one). On any other release the
# sidecar keeps `h2`'s own behaviour (streams cut at a peer's GOAWAY), says so once in
# its log, and `GRACEFUL_GOAWAY` is False. Sending is public API: the graceful GOAWAY
# the sidecar writes itself is a `hyperframe` frame (`H2Link.send_goaway`).
H2_VERIFIED: tuple[tuple[int, int], tuple[int, int]] = ((4, 1), (4, 4))


def goaway_support(version: str, cls: type, verified: tuple[Any, Any] = H2_VERIFIED) -> str:
    """ "" when the override of `cls._receive_goaway_frame` fits `h2` `version`, else why
    not (a pure check: the version and the class are arguments)."""
    parts = version.split(".")
    try:
        release = (int(parts[0]), int(parts[1]))
    except (IndexError, ValueError):
        return f"h2 {version!r}: not a release number"
    low, high = verified
    if not low <= release <= high:
        return f"h2 {version} is not among the releases verified ({low} to {high})"
    method = getattr(cls, "_receive_goaway_frame", None)
    if method is None:
        return f"h2 {version} has no _receive_goaway_frame"
    try:
        params = list(inspect.signature(method).parameters)
    except (TypeError, ValueError):
        return f"h2 {version}: _receive_goaway_frame has no readable signature"
    if params != ["self", "frame"]:
        return f"h2 {version}: _receive_goaway_frame takes {params}, not (self, frame)"
    return ""


GOAWAY_SUPPORT = goaway_support(h2_version, H2Connection)
GRACEFUL_GOAWAY = not GOAWAY_SUPPORT
if GOAWAY_SUPPORT:
    logging.getLogger(__name__).warning(
        "%s: a peer's graceful GOAWAY ends the HTTP/2 streams in flight", GOAWAY_SUPPORT
    )


class GracefulH2Connection(H2Connection):
    """`h2`'s connection, except that a graceful GOAWAY (NO_ERROR, RFC 9113 6.8) lets the
    streams it covers finish (where `GRACEFUL_GOAWAY`: see above). New streams are
    refused by `H2Link` itself (`goaway`)."""


def _receive_goaway_frame(
    self: H2Connection, frame: GoAwayFrame
) -> tuple[list[Frame], list[Event]]:
    if frame.error_code:
        return H2Connection._receive_goaway_frame(self, frame)
    event = ConnectionTerminated()
    event.error_code = ErrorCodes.NO_ERROR
    event.last_stream_id = frame.last_stream_id
    event.additional_data = frame.additional_data or None
    return [], [event]


if GRACEFUL_GOAWAY:
    setattr(GracefulH2Connection, "_receive_goaway_frame", _receive_goaway_frame)  # noqa: B010


def _after_close(e: ProtocolError) -> bool:
    """A frame that arrived after the peer's GOAWAY in the same read (h2 closes its state
    machine at GOAWAY and refuses anything after it, as "... in state CLOSED")."""
    return "in state ConnectionState.CLOSED" in str(e)


class StreamSink(Protocol):
    """What hears one stream's events (the exchange's downstream or upstream side)."""

    def on_headers(self, headers: Fields, end: bool) -> None: ...

    def on_data(self, data: bytes, end: bool) -> None: ...

    def on_trailers(self, headers: Fields) -> None: ...

    def on_end(self) -> None: ...

    def on_reset(self, code: int, message: str) -> None: ...

    def on_sent(self, size: int) -> None:
        """`size` bytes of this stream's queued body went into DATA frames."""


class _Out:
    """A stream's body waiting for flow-control window, and how it ends."""

    __slots__ = ("chunks", "end", "size", "trailers")

    def __init__(self) -> None:
        self.chunks: deque[bytes] = deque()
        self.size = 0
        self.end = False
        self.trailers: Fields | None = None


def settings(*, server: bool) -> dict[SettingCodes | int, int]:
    """The SETTINGS this sidecar sends: its limits (RFC 9113 6.5.2)."""
    out: dict[SettingCodes | int, int] = {
        SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
        SettingCodes.MAX_HEADER_LIST_SIZE: MAX_HEADER_LIST_SIZE,
        SettingCodes.MAX_FRAME_SIZE: MAX_FRAME_SIZE,
        SettingCodes.MAX_CONCURRENT_STREAMS: MAX_CONCURRENT_STREAMS,
    }
    if not server:
        out[SettingCodes.ENABLE_PUSH] = 0
    return out


class H2Link(asyncio.Protocol):
    """An HTTP/2 connection's protocol object; subclasses say what new streams mean."""

    def __init__(self, *, server: bool) -> None:
        # Inbound fields are validated (RFC 9113 8.2); outbound ones were validated on
        # their way in (or are the sidecar's own), so they are not checked twice: that
        # check was a fifth of a hop's CPU.
        config = H2Configuration(
            client_side=not server,
            header_encoding=None,
            validate_inbound_headers=True,
            normalize_inbound_headers=True,
            validate_outbound_headers=False,
            normalize_outbound_headers=False,
        )
        self.h2: H2Connection = GracefulH2Connection(config)
        # Until our SETTINGS are acknowledged h2 applies the protocol's defaults; the
        # header-list limit holds from the first byte.
        self.h2.decoder.max_header_list_size = MAX_HEADER_LIST_SIZE
        self.server_side = server
        self.transport: Any = None
        self.sinks: dict[int, StreamSink] = {}
        self._out: dict[int, _Out] = {}
        self._write_blocked = False
        self._conn_credit = 0
        self.closed = False
        self.goaway = False  # the peer or we sent GOAWAY: no new streams
        self.peer_goaway = False
        self.progress = 0  # bumped on every read; the sweep renews idle deadlines by it
        self.touched = False

    # -- asyncio.Protocol ---------------------------------------------------------------

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        transport.set_write_buffer_limits(WRITE_HIGH, WRITE_LOW)
        h2 = self.h2
        h2.initiate_connection()
        # Ours apply once the peer acknowledges them (RFC 9113 6.5.3); the header-list
        # limit already holds (see __init__).
        h2.update_settings(settings(server=self.server_side))
        h2.increment_flow_control_window(CONNECTION_WINDOW - 65535)
        self.flush()

    def data_received(self, data: bytes) -> None:
        self.progress += 1
        try:
            events = self.h2.receive_data(data)
        except ProtocolError as e:
            # h2 queued GOAWAY with the error's code (PROTOCOL_ERROR, FRAME_SIZE_ERROR,
            # COMPRESSION_ERROR, ENHANCE_YOUR_CALM for a header-list bomb, ...).
            self.protocol_error(e)
            return
        for event in events:
            if self.closed:
                break  # cut off (GOAWAY sent): the rest of this read is not acted on
            self.dispatch(event)
        self.flush()
        flush_touched()

    def touch(self) -> None:
        """Bytes were queued on this link: written when the current read is handled."""
        if not self.touched:
            self.touched = True
            _TOUCHED.append(self)

    @staticmethod
    def h2_closed_by_peer(e: ProtocolError) -> bool:
        return _after_close(e)

    def protocol_error(self, e: ProtocolError) -> None:
        code = getattr(e, "error_code", ErrorCodes.PROTOCOL_ERROR)
        if self.peer_goaway or _after_close(e):
            # The peer said GOAWAY and went on (a PING, a second GOAWAY: gRPC servers
            # do when they stop), which `h2` refuses once it saw the first: the
            # connection was ending anyway, so it ends without blaming the peer.
            self.h2.clear_outbound_data_buffer()
        self.flush()  # the GOAWAY h2 queued
        self.closed = True
        self.transport.close()
        self._lose(f"HTTP/2 protocol error ({ErrorCodes(code).name}): {e}")

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._lose(f"connection lost ({exc})" if exc else "connection closed")

    def pause_writing(self) -> None:
        self._write_blocked = True

    def resume_writing(self) -> None:
        self._write_blocked = False
        for sid in list(self._out):
            self._pump(sid)
        self.flush()

    # -- events -------------------------------------------------------------------------

    def dispatch(self, event: Event) -> None:
        if isinstance(event, DataReceived):
            sid = event.stream_id
            size = event.flow_controlled_length
            self._conn_credit += size
            if self._conn_credit >= _CONN_CREDIT_BATCH:
                self.h2.increment_flow_control_window(self._conn_credit)
                self._conn_credit = 0
            sink = self.sinks.get(sid)
            if sink is None:
                return
            padding = size - len(event.data)
            if padding:
                self.open_window(sid, padding)
            sink.on_data(event.data, event.stream_ended is not None)
        elif isinstance(event, WindowUpdated):
            if event.stream_id:
                self._pump(event.stream_id)
            else:
                for sid in list(self._out):
                    self._pump(sid)
        elif isinstance(event, StreamEnded):
            pass  # reported with the DATA/HEADERS frame that carried END_STREAM
        elif isinstance(event, RequestReceived):
            self.on_request(event.stream_id, list(event.headers), event.stream_ended is not None)
        elif isinstance(event, ResponseReceived):
            sink = self.sinks.get(event.stream_id)
            if sink is not None:
                sink.on_headers(list(event.headers), event.stream_ended is not None)
        elif isinstance(event, TrailersReceived):
            sink = self.sinks.get(event.stream_id)
            if sink is not None:
                sink.on_trailers(list(event.headers))
        elif isinstance(event, StreamReset):
            sid = event.stream_id
            self._out.pop(sid, None)
            sink = self.sinks.pop(sid, None)
            self.on_stream_reset(sid, event.remote_reset)
            if sink is not None:
                sink.on_reset(int(event.error_code), "stream reset by the peer")
            self.stream_closed(sid)
        elif isinstance(event, ConnectionTerminated):
            self.on_goaway(int(event.error_code or 0), event.last_stream_id or 0)
        elif (
            isinstance(event, RemoteSettingsChanged)
            and SettingCodes.INITIAL_WINDOW_SIZE in event.changed_settings
        ):
            for sid in list(self._out):
                self._pump(sid)

    def on_request(self, stream_id: int, headers: Fields, end: bool) -> None:
        """A client opened a stream (server side only)."""
        self.h2.reset_stream(stream_id, ErrorCodes.REFUSED_STREAM)

    def on_stream_reset(self, stream_id: int, remote: bool) -> None:
        """A stream was reset (by the peer when `remote`)."""

    def on_goaway(self, code: int, last_stream_id: int) -> None:
        """The peer sent GOAWAY: streams above `last_stream_id` were never processed."""
        self.goaway = self.peer_goaway = True
        for sid in [s for s in self.sinks if s > last_stream_id]:
            sink = self.sinks.pop(sid)
            self._out.pop(sid, None)
            sink.on_reset(int(ErrorCodes.REFUSED_STREAM), "the peer is going away")
            self.stream_closed(sid)
        if not self.sinks:
            self.close()

    def stream_closed(self, stream_id: int) -> None:
        """A stream is over on this connection (both directions, or reset)."""

    # -- sending ------------------------------------------------------------------------

    def send_headers(self, stream_id: int, headers: Fields, end: bool = False) -> None:
        self.h2.send_headers(stream_id, headers, end_stream=end)
        if end:
            self._finished_sending(stream_id)

    def send_data(self, stream_id: int, data: bytes, end: bool = False) -> None:
        """Queue body bytes; they go out as the windows allow (see `on_sent`)."""
        out = self._out.get(stream_id)
        if out is None:
            out = self._out[stream_id] = _Out()
        if data:
            out.chunks.append(data)
            out.size += len(data)
        out.end = end
        self._pump(stream_id)

    def send_trailers(self, stream_id: int, headers: Fields) -> None:
        out = self._out.get(stream_id)
        if out is None:
            out = self._out[stream_id] = _Out()
        out.trailers = headers
        out.end = True
        self._pump(stream_id)

    def reset(self, stream_id: int, code: int = ErrorCodes.CANCEL) -> None:
        """Reset a stream (its sink hears nothing more)."""
        self._out.pop(stream_id, None)
        self.sinks.pop(stream_id, None)
        if self.closed:
            return
        try:
            self.h2.reset_stream(stream_id, code)
        except (StreamClosedError, ProtocolError):
            return
        self.stream_closed(stream_id)

    def open_window(self, stream_id: int, size: int) -> None:
        """`size` bytes of the stream were passed on: the peer may send that much more."""
        if self.closed or size <= 0:
            return
        try:
            self.h2.increment_flow_control_window(size, stream_id=stream_id)
        except (StreamClosedError, ProtocolError, FlowControlError, KeyError):
            pass  # the stream ended meanwhile: nothing more comes on it

    def _pump(self, stream_id: int) -> None:
        out = self._out.get(stream_id)
        if out is None or self.closed:
            return
        h2 = self.h2
        sink = self.sinks.get(stream_id)
        try:
            chunks = out.chunks
            while chunks and not self._write_blocked:
                window = h2.local_flow_control_window(stream_id)
                if window <= 0:
                    return
                chunk = chunks[0]
                size = min(window, h2.max_outbound_frame_size, len(chunk))
                last = size == len(chunk) and len(chunks) == 1
                if size == len(chunk):
                    chunks.popleft()
                else:
                    chunks[0] = chunk[size:]
                    chunk = chunk[:size]
                out.size -= size
                h2.send_data(stream_id, chunk, end_stream=last and out.end and out.trailers is None)
                if sink is not None:
                    sink.on_sent(size)
                if last and out.end and out.trailers is None:
                    del self._out[stream_id]
                    self._finished_sending(stream_id)
                    return
            if not chunks and out.end:
                del self._out[stream_id]
                if out.trailers is not None:
                    h2.send_headers(stream_id, out.trailers, end_stream=True)
                else:
                    h2.end_stream(stream_id)
                self._finished_sending(stream_id)
        except (StreamClosedError, ProtocolError):
            # The peer reset the stream meanwhile: what was queued is dropped.
            self._out.pop(stream_id, None)

    def _finished_sending(self, stream_id: int) -> None:
        if self._closed_both(stream_id):
            self.sinks.pop(stream_id, None)
            self.stream_closed(stream_id)

    def _closed_both(self, stream_id: int) -> bool:
        stream = self.h2.streams.get(stream_id)
        return stream is None or stream.closed

    def finished_receiving(self, stream_id: int) -> None:
        """The peer ended its side of the stream (its sink saw the end)."""
        if stream_id not in self._out and self._closed_both(stream_id):
            self.sinks.pop(stream_id, None)
            self.stream_closed(stream_id)

    def queued(self, stream_id: int) -> int:
        out = self._out.get(stream_id)
        return out.size if out is not None else 0

    def flush(self) -> None:
        data = self.h2.data_to_send()
        if data and not self.closed:
            self.transport.write(data)

    # -- closing ------------------------------------------------------------------------

    def send_goaway(self, code: int = ErrorCodes.NO_ERROR) -> None:
        """GOAWAY. With NO_ERROR and streams still open, a graceful one: they finish,
        the peer opens no more (h2's own `close_connection` would stop them too, so the
        frame is `hyperframe`'s, written after what `h2` has queued)."""
        if self.closed:
            return
        self.goaway = True
        if code == ErrorCodes.NO_ERROR and self.sinks:
            self.flush()
            frame = GoAwayFrame(0, last_stream_id=self.h2.highest_inbound_stream_id)
            self.transport.write(frame.serialize())
            return
        try:
            self.h2.close_connection(code)
        except ProtocolError:
            pass
        self.flush()

    def close(self) -> None:
        if not self.closed:
            self.flush()
            self.closed = True
            if self.transport is not None:
                self.transport.close()
            self._lose("connection closed")
        elif self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def abort(self) -> None:
        if not self.closed:
            self.closed = True
            if self.transport is not None:
                self.transport.abort()
            self._lose("connection aborted")

    def _lose(self, message: str) -> None:
        """Every stream still open hears that the connection is gone."""
        self.closed = True
        self._out.clear()
        sinks = self.sinks
        self.sinks = {}
        for sid, sink in sinks.items():
            sink.on_reset(-1, message)
            self.stream_closed(sid)
        self.connection_gone()
        flush_touched()  # what the streams' other sides were told (replies, resets)

    def connection_gone(self) -> None:
        """The connection is closed (subclasses unregister it)."""
