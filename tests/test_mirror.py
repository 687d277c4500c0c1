"""Request copies (proxy/mirror.py) over real sockets: the copy's head and body as the
shadow receives them, bodies over the limit not copied, copies beyond the in-flight cap
dropped while a shadow hangs; every case counted."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from proxy.balance import Endpoint
from proxy.heads import RequestHead
from proxy.mirror import MirrorSender
from proxy.route_filters import Mirror
from tests.polling import until

MIRROR = Mirror("search-next", "default", None, 100.0, max_body=10)


class Shadow:
    """A server that records each request's bytes; answers, or holds (`hang`)."""

    def __init__(self) -> None:
        self.received: list[bytes] = []
        self.hang = asyncio.Event()
        self.open = 0
        self.port = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.open += 1
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            length = next(
                int(line.split(b":")[1]) for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            )  # fmt: skip
            body = await reader.readexactly(length)
            self.received.append(head + body)
            if self.hang.is_set():
                await asyncio.sleep(3600)
            writer.write(b"HTTP/1.1 204 No Content\r\n\r\n")
            await writer.drain()
        finally:
            self.open -= 1
            writer.close()


@pytest.fixture
async def shadow() -> AsyncIterator[Shadow]:
    s = Shadow()
    server = await asyncio.start_server(s.handle, "127.0.0.1", 0)
    s.port = server.sockets[0].getsockname()[1]
    try:
        yield s
    finally:
        server.close()


def head(chunked: bool = False) -> RequestHead:
    h = RequestHead(method=b"POST", target=b"/q?x=1", host=b"search:8080", content_length=8)
    h.headers = [(b"Host", b"search:8080"), (b"Accept", b"*/*"), (b"Content-Length", b"8")]
    h.chunked = chunked
    return h


async def test_the_copy_carries_the_body_and_the_shadow_marks(shadow: Shadow) -> None:
    sender = MirrorSender(lambda m: (Endpoint("s", "127.0.0.1", shadow.port), None), timeout=5)
    copy = sender.tap(MIRROR).copy(head(), None, [], False)
    assert copy is not None
    copy = copy.feed(b"abcd")
    assert copy is not None and copy.feed(b"efgh") is copy
    copy.send()
    await until(lambda: sender.counts["sent"] == 1)
    (got,) = shadow.received
    lines = got.split(b"\r\n")
    assert lines[0] == b"POST /q?x=1 HTTP/1.1"
    assert b"Host: search-shadow:8080" in lines and b"x-tether-mirror: 1" in lines
    assert b"Content-Length: 8" in lines and b"Accept: */*" in lines
    assert got.endswith(b"\r\n\r\nabcdefgh")
    sender.close()


async def test_body_pieces_that_arrived_while_routing_are_copied(shadow: Shadow) -> None:
    sender = MirrorSender(lambda m: (Endpoint("s", "127.0.0.1", shadow.port), None))
    assert sender.tap(MIRROR).copy(head(), b"/other", [b"abcdefgh"], True) is None  # sent
    await until(lambda: sender.counts["sent"] == 1)
    assert shadow.received[0].startswith(b"POST /other HTTP/1.1\r\n")
    assert shadow.received[0].endswith(b"abcdefgh")
    # Already chunk-framed for the upstream: not copied, counted.
    assert sender.tap(MIRROR).copy(head(True), None, [b"8\r\nabcdefgh\r\n"], True) is None
    assert sender.counts["too_large"] == 1


async def test_large_bodies_and_a_full_house_are_counted_not_sent(shadow: Shadow) -> None:
    shadow.hang.set()
    sender = MirrorSender(
        lambda m: (Endpoint("s", "127.0.0.1", shadow.port), None), max_in_flight=2
    )
    copy = sender.tap(MIRROR).copy(head(), None, [], False)
    assert copy is not None and copy.feed(b"x" * 11) is None
    assert sender.counts["too_large"] == 1
    for _ in range(3):
        c = sender.tap(MIRROR).copy(head(), None, [b"12345678"], True)
        assert c is None
    assert sender.counts["busy"] == 1 and len(sender.tasks) == 2
    await until(lambda: shadow.open == 2)  # both held by the shadow
    sender.close()
    await until(lambda: not sender.tasks)
    none = MirrorSender(lambda m: None)
    none.tap(MIRROR).copy(head(), None, [b"12345678"], True)
    assert none.counts["no_endpoint"] == 1
