"""In-memory stand-ins for what the data plane touches outside Python: a transport, a clock.

`FakeTransport` records what a protocol writes and how it treats the socket (pauses,
close, abort); `FakeClock` is a monotonic clock a test moves by hand; `parse_request`
gives the head a real codec makes of some bytes. With them, the
real protocol objects (exchanges, upstream connections, pools, codecs) run without a
socket or an event loop, and no test waits for time to pass.
"""

from __future__ import annotations

from typing import Any

from proxy.codec import RequestCodec
from proxy.heads import Fields, RequestHead


class FakeTransport:
    """What asyncio protocols call on a transport; keeps everything written."""

    def __init__(self, peer: tuple[str, int] = ("127.0.0.1", 40000)) -> None:
        self.peer = peer
        self.written: list[bytes] = []
        self.paused = False
        self.closed = False
        self.aborted = False

    @property
    def data(self) -> bytes:
        return b"".join(self.written)

    def take(self) -> bytes:
        """Everything written since the last take()."""
        out = b"".join(self.written)
        self.written.clear()
        return out

    def write(self, data: bytes) -> None:
        self.written.append(bytes(data))

    def writelines(self, chunks: list[bytes]) -> None:
        self.written.append(b"".join(chunks))

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.peer if name == "peername" else default

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True
        self.aborted = True

    def __repr__(self) -> str:
        state = " aborted" if self.aborted else " closed" if self.closed else ""
        return f"<FakeTransport {len(self.data)} bytes{state}>"


class FakeClock:
    """A monotonic clock that moves only when told to."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> float:
        self.now += seconds
        return self.now

    def __repr__(self) -> str:
        return f"<FakeClock {self.now}>"


def parse_request(data: bytes) -> RequestHead:
    """The first request head the real codec makes of `data`."""
    heads: list[RequestHead] = []

    class Sink:
        def on_request_head(self, head: RequestHead) -> None:
            heads.append(head)

        def on_request_body(self, data: bytes) -> None:
            pass

        def on_request_end(self, trailers: Fields | None) -> None:
            pass

    RequestCodec(Sink()).feed(data)
    assert heads, data
    return heads[0]
