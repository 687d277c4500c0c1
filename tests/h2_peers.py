"""Real HTTP/2 peers for tests, on `h2` over asyncio sockets: an h2c app and an h2c client.

`H2App` answers every stream: `/who` with its name, `/echo` with the request body (and
its trailers back as response trailers), `/big?n=N` with N bytes, `/slow?s=S` after S
seconds; it counts the streams it saw (`streams`) and the connections (`connections`).
`H2Client` opens one connection and runs requests on it as streams
(`request(...) -> H2Response`), reading with its own window so a test can be a slow
reader (`auto_ack=False`, then `ack(stream_id, n)`). Both leave framing to `h2`.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlsplit

from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    RequestReceived,
    ResponseReceived,
    StreamEnded,
    StreamReset,
    TrailersReceived,
    WindowUpdated,
)

from proxy.h2_link import GracefulH2Connection

Fields = list[tuple[bytes, bytes]]


class H2App:
    """An h2c server in the test's event loop."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.status = b"200"  # what every response says (a test may make an app fail)
        self.streams = 0
        self.connections = 0
        self.resets = 0
        self.port = 0
        self.server: asyncio.Server | None = None
        self.seen: list[Fields] = []

    async def start(self) -> H2App:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def aclose(self) -> None:
        if self.server is not None:
            self.server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        conn = H2Connection(H2Configuration(client_side=False, header_encoding=None))
        conn.initiate_connection()
        writer.write(conn.data_to_send())
        bodies: dict[int, bytearray] = {}
        heads: dict[int, dict[bytes, bytes]] = {}
        trailers: dict[int, Fields] = {}
        # Response bytes waiting for window, and the trailers that end them.
        pending: dict[int, tuple[bytes, Fields | None]] = {}

        def pump() -> None:
            for sid in list(pending):
                data, rt = pending[sid]
                window = min(conn.local_flow_control_window(sid), conn.max_outbound_frame_size)
                while data and window > 0:
                    piece, data = data[:window], data[window:]
                    conn.send_data(sid, piece, end_stream=not data and rt is None)
                    window = min(conn.local_flow_control_window(sid), conn.max_outbound_frame_size)
                if data:
                    pending[sid] = (data, rt)
                    continue
                del pending[sid]
                if rt is not None:
                    conn.send_headers(sid, rt, end_stream=True)

        async def answer(sid: int) -> None:
            head = heads.pop(sid)
            body = bytes(bodies.pop(sid, b""))
            url = urlsplit(head.get(b":path", b"/").decode())
            query = parse_qs(url.query)
            if url.path == "/slow":
                await asyncio.sleep(float(query.get("s", ["0.3"])[0]))
            if url.path == "/echo":
                out = body
            elif url.path == "/big":
                out = b"x" * int(query.get("n", ["100000"])[0])
            else:
                out = self.name.encode()
            rt = trailers.pop(sid, None)
            conn.send_headers(
                sid,
                [
                    (b":status", self.status),
                    (b"x-app", self.name.encode()),
                    (b"x-seen-authority", head.get(b":authority", b"")),
                    (b"x-seen-xff", head.get(b"x-forwarded-for", b"")),
                ],
            )
            if not out and rt is None:
                conn.send_data(sid, b"", end_stream=True)
            else:
                pending[sid] = (out, rt)
                pump()
            writer.write(conn.data_to_send())

        tasks: set[asyncio.Task[None]] = set()
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    break
                for ev in conn.receive_data(data):
                    if isinstance(ev, RequestReceived):
                        self.streams += 1
                        heads[ev.stream_id] = dict(ev.headers)
                        self.seen.append(list(ev.headers))
                        if ev.stream_ended is not None:
                            t = asyncio.get_running_loop().create_task(answer(ev.stream_id))
                            tasks.add(t)
                            t.add_done_callback(tasks.discard)
                    elif isinstance(ev, DataReceived):
                        bodies.setdefault(ev.stream_id, bytearray()).extend(ev.data)
                        conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                        if ev.stream_ended is not None:
                            t = asyncio.get_running_loop().create_task(answer(ev.stream_id))
                            tasks.add(t)
                            t.add_done_callback(tasks.discard)
                    elif isinstance(ev, TrailersReceived):
                        trailers[ev.stream_id] = list(ev.headers)
                        t = asyncio.get_running_loop().create_task(answer(ev.stream_id))
                        tasks.add(t)
                        t.add_done_callback(tasks.discard)
                    elif isinstance(ev, StreamReset):
                        self.resets += 1
                        pending.pop(ev.stream_id, None)
                    elif isinstance(ev, WindowUpdated):
                        pump()
                writer.write(conn.data_to_send())
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()


@dataclass
class H2Response:
    stream_id: int
    headers: dict[bytes, bytes] = field(default_factory=dict)
    body: bytearray = field(default_factory=bytearray)
    trailers: dict[bytes, bytes] = field(default_factory=dict)
    reset: int | None = None
    done: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def status(self) -> int:
        return int(self.headers.get(b":status", b"0"))


class H2Client:
    """One h2c connection to a listener; `request` runs a stream on it. It lets streams
    finish after a graceful GOAWAY, as gRPC and browsers do (plain `h2` would cut them:
    proxy/h2_link.py's `GracefulH2Connection`)."""

    def __init__(self, auto_ack: bool = True) -> None:
        self.conn: H2Connection = GracefulH2Connection(
            H2Configuration(client_side=True, header_encoding=None)
        )
        self.auto_ack = auto_ack
        self.responses: dict[int, H2Response] = {}
        self.goaway: ConnectionTerminated | None = None
        self._sending: dict[int, tuple[bytes, Fields | None]] = {}
        self.closed = asyncio.Event()
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self._task: asyncio.Task[None] | None = None

    async def connect(self, port: int) -> H2Client:
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", port)
        self.conn.initiate_connection()
        self.flush()
        self._task = asyncio.get_running_loop().create_task(self._read())
        return self

    def flush(self) -> None:
        assert self.writer is not None
        data = self.conn.data_to_send()
        if data and not self.writer.is_closing():
            self.writer.write(data)

    async def _read(self) -> None:
        assert self.reader is not None
        try:
            while True:
                data = await self.reader.read(65536)
                if not data:
                    break
                for ev in self.conn.receive_data(data):
                    self._event(ev)
                self.flush()
        except Exception:
            pass
        finally:
            self.closed.set()
            for r in self.responses.values():
                r.done.set()

    def _event(self, ev: Any) -> None:
        if isinstance(ev, ResponseReceived):
            r = self.responses[ev.stream_id]
            r.headers = dict(ev.headers)
            if ev.stream_ended is not None:
                r.done.set()
        elif isinstance(ev, DataReceived):
            r = self.responses[ev.stream_id]
            r.body.extend(ev.data)
            if self.auto_ack:
                self.conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            elif ev.flow_controlled_length:
                # A slow reader of this stream: the connection's window is returned (other
                # streams go on), the stream's only by `ack`.
                self.conn.increment_flow_control_window(ev.flow_controlled_length)
        elif isinstance(ev, TrailersReceived):
            self.responses[ev.stream_id].trailers = dict(ev.headers)
        elif isinstance(ev, StreamEnded):
            self.responses[ev.stream_id].done.set()
        elif isinstance(ev, StreamReset):
            r = self.responses[ev.stream_id]
            r.reset = int(ev.error_code)
            r.done.set()
        elif isinstance(ev, ConnectionTerminated):
            self.goaway = ev
        elif isinstance(ev, WindowUpdated):
            self._pump()

    def start(
        self,
        path: str,
        authority: str,
        *,
        method: str = "GET",
        body: bytes | None = None,
        headers: Fields = (),  # type: ignore[assignment]
        trailers: Fields | None = None,
    ) -> H2Response:
        sid = self.conn.get_next_available_stream_id()
        r = self.responses[sid] = H2Response(sid)
        fields = [
            (b":method", method.encode()),
            (b":scheme", b"http"),
            (b":authority", authority.encode()),
            (b":path", path.encode()),
            *headers,
        ]
        end = not body and trailers is None
        self.conn.send_headers(sid, fields, end_stream=end)
        if body or trailers is not None:
            self._sending[sid] = (body or b"", trailers)
            self._pump()
        self.flush()
        return r

    def _pump(self) -> None:
        """Send queued request bodies as the windows allow, then their trailers."""
        conn = self.conn
        for sid in list(self._sending):
            data, trailers = self._sending[sid]
            while data:
                n = min(conn.local_flow_control_window(sid), conn.max_outbound_frame_size)
                if n <= 0:
                    break
                piece, data = data[:n], data[n:]
                conn.send_data(sid, piece, end_stream=not data and trailers is None)
            if data:
                self._sending[sid] = (data, trailers)
                continue
            del self._sending[sid]
            if trailers is not None:
                conn.send_headers(sid, trailers, end_stream=True)

    async def request(self, path: str, authority: str, **kw: Any) -> H2Response:
        r = self.start(path, authority, **kw)
        await asyncio.wait_for(r.done.wait(), 10)
        return r

    def ack(self, stream_id: int, size: int) -> None:
        self.conn.increment_flow_control_window(size, stream_id=stream_id)
        self.flush()

    async def aclose(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self._task is not None:
            self._task.cancel()
