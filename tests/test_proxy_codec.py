"""The sans-IO HTTP/1.1 codec: every message is fed whole and split at every offset."""

from __future__ import annotations

from typing import Any

import pytest

from proxy.codec import RequestCodec
from proxy.errors import BadMessageError
from proxy.head_cache import HeadCache
from proxy.heads import (
    REQUEST_HEAD_SLOTS,
    RequestHead,
    ResponseHead,
    _from_template,
    encode_last_chunk,
    encode_request_head,
    encode_response_head,
)
from proxy.response_codec import ResponseCodec

# The codecs' head cache in these tests (a listener's, in the sidecar).
HEADS = HeadCache()


class Recorder:
    """Collects codec events; body pieces are joined so splits do not change the result."""

    def __init__(self) -> None:
        self.events: list[Any] = []

    def _body(self, data: bytes) -> None:
        if self.events and self.events[-1][0] == "body":
            self.events[-1] = ("body", self.events[-1][1] + data)
        else:
            self.events.append(("body", data))

    def on_request_head(self, head: RequestHead) -> None:
        self.events.append(("head", head))

    def on_request_body(self, data: bytes) -> None:
        self._body(data)

    def on_request_end(self, trailers: Any) -> None:
        self.events.append(("end", trailers))

    def on_response_head(self, head: ResponseHead) -> None:
        self.events.append(("head", head))

    def on_informational(self, head: ResponseHead) -> None:
        self.events.append(("1xx", head.status))

    def on_response_body(self, data: bytes) -> None:
        self._body(data)

    def on_response_end(self, trailers: Any) -> None:
        self.events.append(("end", trailers))


def splits(data: bytes) -> list[list[bytes]]:
    """The message whole, byte by byte, and cut in two at every offset."""
    out = [[data], [data[i : i + 1] for i in range(len(data))]]
    out += [[data[:i], data[i:]] for i in range(1, len(data))]
    return out


def feed_requests(pieces: list[bytes]) -> tuple[Recorder, bytes | None]:
    rec = Recorder()
    codec = RequestCodec(rec, HEADS)
    rest = None
    for piece in pieces:
        if rest is not None:
            rest += piece
            continue
        rest = codec.feed(piece)
    return rec, rest


def every_split_requests(data: bytes) -> list[tuple[Recorder, bytes | None]]:
    return [feed_requests(p) for p in splits(data)]


def summary(rec: Recorder) -> list[Any]:
    out: list[Any] = []
    for kind, value in rec.events:
        if kind == "head" and isinstance(value, RequestHead):
            out.append(
                (
                    "head",
                    value.method,
                    value.target,
                    value.version,
                    value.headers,
                    value.content_length,
                    value.chunked,
                    value.keep_alive,
                )
            )
        elif kind == "head":
            out.append(("head", value.status, value.reason, value.headers, value.content_length))
        else:
            out.append((kind, value))
    return out


def test_simple_get_every_split() -> None:
    data = b"GET /a?b=1 HTTP/1.1\r\nHost: orders\r\nAccept: */*\r\n\r\n"
    results = every_split_requests(data)
    expected = [
        (
            "head",
            b"GET",
            b"/a?b=1",
            "1.1",
            [(b"Host", b"orders"), (b"Accept", b"*/*")],
            None,
            False,
            True,
        ),
        ("end", None),
    ]
    for rec, rest in results:
        assert rest is None
        assert summary(rec) == expected


def test_content_length_body_and_pipelining_every_split() -> None:
    data = (
        b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello"
        b"GET /y HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
    )
    for rec, _ in every_split_requests(data):
        s = summary(rec)
        assert [e[0] for e in s] == ["head", "body", "end", "head", "end"]
        assert s[0][5] == 5 and s[1] == ("body", b"hello")
        assert s[3][2] == b"/y" and s[3][7] is False  # Connection: close ends keep-alive


def test_chunked_with_extensions_and_trailers_every_split() -> None:
    data = (
        b"POST /up HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTrailer: X-Sum\r\n\r\n"
        b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-Sum: abc\r\nHost: evil\r\n\r\n"
    )
    for rec, _ in every_split_requests(data):
        s = summary(rec)
        assert s[0][6] is True
        # Transfer-Encoding is hop-by-hop: interpreted, not in headers.
        assert s[0][4] == [(b"Host", b"a"), (b"Trailer", b"X-Sum")]
        assert s[1] == ("body", b"hello world")
        # Host in trailers is forbidden (RFC 9110 6.5.1) and dropped.
        assert s[2] == ("end", [(b"X-Sum", b"abc")])


def test_hop_by_hop_and_connection_named_fields_are_removed() -> None:
    data = (
        b"GET / HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, X-Secret\r\nKeep-Alive: 5\r\n"
        b"TE: trailers\r\nProxy-Connection: keep-alive\r\nX-Secret: s\r\nX-Keep: k\r\n"
        b"X-Forwarded-For: 10.0.0.1\r\nX-Forwarded-For: 10.0.0.2\r\nX-Request-Id: r1\r\n\r\n"
    )
    for rec, _ in every_split_requests(data):
        head = rec.events[0][1]
        assert head.headers == [(b"Host", b"a"), (b"X-Keep", b"k"), (b"X-Request-Id", b"r1")]
        assert head.forwarded_for == b"10.0.0.1, 10.0.0.2"
        assert head.request_id == b"r1"
        assert head.host == b"a" and head.host_index == 0


def test_upgrade_returns_bytes_after_head() -> None:
    data = (
        b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
        b"Sec-WebSocket-Key: k\r\n\r\n\x81\x00"
    )
    for rec, rest in every_split_requests(data):
        head = rec.events[0][1]
        assert head.upgrade == b"websocket"
        assert rest == b"\x81\x00"


def test_connect_returns_tunnel_bytes() -> None:
    data = b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n\x16\x03\x01"
    for rec, rest in every_split_requests(data):
        head = rec.events[0][1]
        assert head.method == b"CONNECT" and head.target == b"example.com:443"
        assert rest == b"\x16\x03\x01"


def test_expect_continue_and_http10() -> None:
    rec, _ = feed_requests([b"PUT / HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\n\r\n"])
    assert rec.events[0][1].expect_continue
    rec, _ = feed_requests([b"GET / HTTP/1.0\r\n\r\n"])
    head = rec.events[0][1]
    assert head.version == "1.0" and head.keep_alive is False and head.host is None
    rec, _ = feed_requests([b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"])
    assert rec.events[0][1].keep_alive is True


MALFORMED = {
    "content-length with transfer-encoding": (
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
        400,
    ),
    "differing duplicate content-length": (
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
        400,
    ),
    "content-length list": (
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3, 4\r\n\r\nabcd",
        400,
    ),
    "negative content-length": (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: -1\r\n\r\n", 400),
    "invalid chunk size": (
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n",
        400,
    ),
    "chunk size overflow": (
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nfffffffffffffffffff\r\n",
        400,
    ),
    "chunk data longer than its size": (
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcd\r\n",
        400,
    ),
    "bare LF request line": (b"GET / HTTP/1.1\nHost: a\r\n\r\n", 400),
    "bare LF in fields": (b"GET / HTTP/1.1\r\nHost: a\nX: b\r\n\r\n", 400),
    "bare LF chunk size": (
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\nabc\r\n",
        400,
    ),
    "obs-fold": (b"GET / HTTP/1.1\r\nHost: a\r\nX: b\r\n c\r\n\r\n", 400),
    "whitespace before colon": (b"GET / HTTP/1.1\r\nHost : a\r\n\r\n", 400),
    "control char in value": (b"GET / HTTP/1.1\r\nHost: a\r\nX: a\x01b\r\n\r\n", 400),
    "missing host": (b"GET / HTTP/1.1\r\nX: y\r\n\r\n", 400),
    "two hosts": (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
    "http/0.9": (b"GET /\r\n\r\n", 400),
    "http/1.2": (b"GET / HTTP/1.2\r\nHost: a\r\n\r\n", 400),
    "space in target": (b"GET /a b HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    "gzip transfer coding": (
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
        501,
    ),
    "chunked not last": (
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
        400,
    ),
    "request line over 8 KiB": (b"GET /" + b"a" * 8200 + b" HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    "header section over 64 KiB": (
        b"GET / HTTP/1.1\r\nHost: a\r\n" + b"X-Big: " + b"v" * 66000 + b"\r\n\r\n",
        431,
    ),
}
MALFORMED["many fields over 64 KiB"] = (
    b"GET / HTTP/1.1\r\nHost: a\r\n"
    + b"".join(b"X-F%d: %s\r\n" % (i, b"v" * 900) for i in range(80))
    + b"\r\n",
    431,
)


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_requests_are_rejected(name: str) -> None:
    data, status = MALFORMED[name]
    pieces_list = [[data], [data[i : i + 7] for i in range(0, len(data), 7)]]
    if len(data) < 300:
        pieces_list = splits(data)
    for pieces in pieces_list:
        rec = Recorder()
        codec = RequestCodec(rec, HEADS)
        with pytest.raises(BadMessageError) as err:
            for piece in pieces:
                codec.feed(piece)
        assert err.value.status == status, (name, err.value)
        # Nothing reached the sink for a bad head; a bad body never reaches its end.
        assert ("end", None) not in rec.events or name.startswith("chunk")


def test_large_header_section_under_limit_with_body_in_same_read_is_accepted() -> None:
    head = (
        b"POST / HTTP/1.1\r\nHost: a\r\nX-Big: "
        + b"v" * 60000
        + b"\r\nContent-Length: 70000\r\n\r\n"
    )
    rec, _ = feed_requests([head + b"b" * 70000])
    assert [e[0] for e in rec.events] == ["head", "body", "end"]


RESPONSE_CASES = {
    "content-length": (
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nServer: s\r\n\r\nhello",
        [("head", 200, b"OK", [(b"Server", b"s")], 5), ("body", b"hello"), ("end", None)],
    ),
    "chunked with trailers": (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\nX-T: 1\r\n\r\n",
        [("head", 200, b"OK", [], None), ("body", b"ok"), ("end", [(b"X-T", b"1")])],
    ),
    "204 ignores content-length": (
        b"HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\n",
        [("head", 204, b"No Content", [], 5), ("end", None)],
    ),
    "304": (
        b"HTTP/1.1 304 Not Modified\r\nETag: x\r\n\r\n",
        [("head", 304, b"Not Modified", [(b"ETag", b"x")], None), ("end", None)],
    ),
    "100 then 200": (
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
        [("1xx", 100), ("head", 200, b"OK", [], 2), ("body", b"ok"), ("end", None)],
    ),
}


@pytest.mark.parametrize("name", sorted(RESPONSE_CASES))
def test_responses_every_split(name: str) -> None:
    data, expected = RESPONSE_CASES[name]
    for pieces in splits(data):
        rec = Recorder()
        codec = ResponseCodec(rec, HEADS)
        for piece in pieces:
            assert codec.feed(piece) is None
        assert summary(rec) == expected
        assert codec.idle


def test_response_to_head_has_no_body_and_parser_is_reusable() -> None:
    for pieces in splits(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n"):
        rec = Recorder()
        codec = ResponseCodec(rec, HEADS)
        codec.head_request = True
        for piece in pieces:
            codec.feed(piece)
        assert summary(rec) == [("head", 200, b"OK", [], 100), ("end", None)]
        codec.head_request = False
        codec.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi")
        assert summary(rec)[-2:] == [("body", b"hi"), ("end", None)]


def test_close_delimited_response_ends_at_eof() -> None:
    rec = Recorder()
    codec = ResponseCodec(rec, HEADS)
    codec.feed(b"HTTP/1.1 200 OK\r\n\r\nsome")
    codec.feed(b" bytes")
    assert not codec.idle
    assert codec.feed_eof() is True
    assert summary(rec)[-2:] == [("body", b"some bytes"), ("end", None)]
    # A truncated length-delimited response is not completed by EOF.
    rec = Recorder()
    codec = ResponseCodec(rec, HEADS)
    codec.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
    assert codec.feed_eof() is False


def test_switching_protocols_returns_rest() -> None:
    rec = Recorder()
    codec = ResponseCodec(rec, HEADS)
    rest = codec.feed(
        b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\nWS"
    )
    assert rest == b"WS"
    assert rec.events[0][1].upgrade == b"websocket"


def test_malformed_and_unknown_coding_responses() -> None:
    for data in (
        b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
        b"HTTP/1.1 200 OK\nContent-Length: 1\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
        b"HTTTP/1.1 200 OK\r\n\r\n",
    ):
        codec = ResponseCodec(Recorder(), HEADS)
        with pytest.raises(BadMessageError) as err:
            codec.feed(data)
        assert err.value.status == 502 and err.value.reason == "upstream_protocol_error"


def test_serialisation_round_trips_through_the_parser() -> None:
    head_bytes = encode_request_head(
        b"POST", b"/p", [(b"Host", b"a"), (b"Transfer-Encoding", b"chunked")]
    )
    body = b"3\r\nabc\r\n" + encode_last_chunk([(b"X-T", b"v")])
    rec, _ = feed_requests([head_bytes + body])
    s = summary(rec)
    assert s[0][1:3] == (b"POST", b"/p") and s[1] == ("body", b"abc")
    assert s[2] == ("end", [(b"X-T", b"v")])
    resp = encode_response_head(200, b"OK", [(b"Content-Length", b"0")])
    rec2 = Recorder()
    ResponseCodec(rec2, HEADS).feed(resp)
    assert summary(rec2) == [("head", 200, b"OK", [], 0), ("end", None)]
    assert encode_last_chunk(None) == b"0\r\n\r\n"


def test_reprs_say_what_a_debugger_wants() -> None:
    rec, _ = feed_requests([b"GET /r HTTP/1.1\r\nHost: h\r\n\r\n"])
    assert (
        repr(rec.events[0][1]) == "<RequestHead GET b'/r' HTTP/1.1 host=b'h' length=None fields=1>"
    )
    codec = RequestCodec(Recorder(), HEADS)
    codec.feed(b"GET / HT")
    assert repr(codec) == "<RequestCodec head head_bytes=8>"


# -- the head cache: a head seen before is taken without llhttp, with the same result ----

CACHEABLE_REQUESTS = [
    b"GET / HTTP/1.1\r\nHost: svc\r\n\r\n",
    b"POST /p?q=1 HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nX-A: b\r\n\r\nhello",
    b"GET / HTTP/1.0\r\nConnection: keep-alive\r\nKeep-Alive: 5\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, X-Secret\r\nX-Secret: s\r\n\r\n",
    b"GET http://svc:8080/x HTTP/1.1\r\nHost: other\r\nX-Forwarded-For: 10.0.0.1\r\n"
    b"X-Forwarded-Proto: https\r\nTE: trailers\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nX-Request-Id: abc-1\r\nVia: 1.1 tether\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nx-request-id: lower\r\n\r\n",
]


def _attrs(head: RequestHead) -> tuple[Any, ...]:
    return (
        head.method,
        head.target,
        head.version,
        head.host,
        head.headers,
        head.host_index,
        head.content_length,
        head.keep_alive,
        head.forwarded_for,
        head.forwarded_proto,
        head.request_id,
    )


@pytest.mark.parametrize("data", CACHEABLE_REQUESTS)
def test_cached_request_heads_parse_as_llhttp_did(data: bytes) -> None:
    slow, _ = feed_requests([data[i : i + 1] for i in range(len(data))])
    first, _ = feed_requests([data])  # a miss: llhttp parses, the head is cached
    second, _ = feed_requests([data * 2])  # hits, pipelined
    heads = [e[1] for rec in (slow, first, second) for e in rec.events if e[0] == "head"]
    assert heads[0].raw is None and heads[-1].raw is not None  # llhttp's, then the cache's
    assert summary(first) == summary(slow)
    assert summary(second) == summary(slow) * 2
    # A keep-alive loop: the same head alone in each read (the third read takes the
    # repeated-head path in `feed`).
    loop, _ = feed_requests([data, data, data])
    looped = [e[1] for e in loop.events if e[0] == "head"]
    assert summary(loop) == summary(slow) * 3
    attrs = [_attrs(h) for h in heads + looped]
    assert all(a == attrs[0] for a in attrs)


def test_a_head_from_a_cache_template_sets_every_slot_as_init_does() -> None:
    """Cached heads skip RequestHead.__init__ (heads._from_template): a slot added to
    RequestHead must be set there too."""
    rec, _ = feed_requests([b"GET /a HTTP/1.1\r\nHost: a\r\n\r\n"] * 3)
    template = (b"Host: a\r\n", b"GET", b"/a", "1.1", True, b"a", None, None, None, None)
    made = [_from_template(template), rec.events[-2][1]]
    assert made[1].raw is not None  # taken from the cache
    reference = RequestHead(*template)
    for head in made:
        for slot in REQUEST_HEAD_SLOTS:
            if slot == "raw":
                continue
            assert getattr(head, slot) == getattr(reference, slot), slot


def test_a_head_that_differs_in_any_byte_is_parsed_by_llhttp() -> None:
    """The cache holds whole heads: a new field value or request line is a new head,
    parsed (and judged) by llhttp, with its fields in arrival order. The one exception
    is the X-Request-Id value (every request another sidecar forwards has its own): a
    head that differs only there is taken from the cache with its own value."""
    template = b"GET /r HTTP/1.1\r\nHost: a\r\nX-Request-Id: %s\r\nX-B: c\r\n\r\n"
    rec = Recorder()
    codec = RequestCodec(rec, HeadCache())  # its own: the masked lookup not yet idle
    for piece in (template % b"first", template % b"second", template % b"first"):
        codec.feed(piece)
    heads = [e[1] for e in rec.events if e[0] == "head"]
    assert [h.request_id for h in heads] == [b"first", b"second", b"first"]
    assert [h.raw is not None for h in heads] == [False, True, True]
    assert heads[1].headers[1] == (b"X-Request-Id", b"second")
    assert heads[2].headers == [(b"Host", b"a"), (b"X-Request-Id", b"first"), (b"X-B", b"c")]
    for line in (b"GET /other HTTP/1.1", b"PUT /r HTTP/1.1"):
        rec, _ = feed_requests([line + (template % b"first")[15:]])
        assert rec.events[0][1].raw is None


def test_a_pipelined_head_without_request_line_is_refused_after_its_cached_twin() -> None:
    """Issue 18: a malformed line used to be taken as a copy of a cached request."""
    good = b"GET /a HTTP/1.1\r\nHost: beta\r\nX-Request-Id: 1\r\n\r\n"
    feed_requests([good])
    feed_requests([good])
    with pytest.raises(BadMessageError) as err:
        feed_requests([good + b"HTTP/1.1\r\nHost: beta\r\nX-Request-Id: 1\r\n\r\n"])
    assert err.value.status == 400


def test_no_head_is_taken_from_the_cache_after_a_message_without_keep_alive() -> None:
    head = b"GET /k HTTP/1.1\r\nHost: a\r\n\r\n"
    feed_requests([head, head])
    rec = Recorder()
    codec = RequestCodec(rec, HEADS)
    codec.feed(b"GET /k HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    with pytest.raises(BadMessageError, match="Connection: close"):
        codec.feed(head)


def test_cached_shape_with_a_bad_request_id_is_still_rejected_by_llhttp() -> None:
    template = b"GET /bad HTTP/1.1\r\nHost: a\r\nX-Request-Id: %s\r\n\r\n"
    feed_requests([template % b"ok"])
    feed_requests([template % b"ok2"])
    for bad in (b"a\x01b", b"a\nb", b"a b\x7f"):
        with pytest.raises(BadMessageError) as err:
            feed_requests([template % bad])
        assert err.value.status == 400


def test_cached_head_set_host_replaces_the_host_line() -> None:
    data = b"GET http://svc/x HTTP/1.1\r\nHost: old\r\nX-A: b\r\n\r\n"
    feed_requests([data])
    rec, _ = feed_requests([data])
    head = rec.events[0][1]
    assert head.raw == b"Host: old\r\nX-A: b\r\n"
    head.set_host(b"svc")
    assert head.raw == b"X-A: b\r\nHost: svc\r\n" or head.raw == b"Host: svc\r\nX-A: b\r\n"
    assert head.host == b"svc" and head.headers[head.host_index] == (b"Host", b"svc")


def test_cached_response_heads_parse_as_llhttp_did() -> None:
    data = (
        b"HTTP/1.1 200 OK\r\nServer: s\r\nConnection: keep-alive\r\nKeep-Alive: timeout=5\r\n"
        b"Content-Length: 5\r\n\r\nhello"
    )
    results = []
    for pieces in ([data[i : i + 1] for i in range(len(data))], [data], [data * 2]):
        rec = Recorder()
        codec = ResponseCodec(rec, HEADS)
        for piece in pieces:
            assert codec.feed(piece) is None
        assert codec.idle
        results.append(summary(rec))
    expected = [("head", 200, b"OK", [(b"Server", b"s")], 5), ("body", b"hello"), ("end", None)]
    assert results == [expected, expected, expected * 2]
    # To HEAD, the same cached head has no body; the next response is parsed in turn.
    rec = Recorder()
    codec = ResponseCodec(rec, HEADS)
    codec.head_request = True
    codec.feed(data[:-5])
    codec.head_request = False
    codec.feed(data)
    assert summary(rec) == [expected[0], ("end", None), *expected]


def test_cached_response_body_split_across_reads_and_truncation() -> None:
    data = b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n"
    for _ in range(2):  # the second time from the cache
        rec = Recorder()
        codec = ResponseCodec(rec, HEADS)
        codec.feed(data + b"abc")
        assert not codec.idle
        codec.feed(b"defg")
        assert codec.feed_eof() is False  # cut short: the connection reports a reset
    rec = Recorder()
    codec = ResponseCodec(rec, HEADS)
    codec.feed(data + b"abc")
    codec.feed(b"defghij" + data)  # the rest, then a second response's head
    assert not codec.idle
    codec.feed(b"0123456789")
    assert codec.idle
    one = [("head", 200, b"OK", [], 10), ("body", b"abcdefghij"), ("end", None)]
    assert summary(rec) == [*one, one[0], ("body", b"0123456789"), ("end", None)]


def test_a_shared_cached_response_head_cannot_be_changed_through_its_headers() -> None:
    data = b"HTTP/1.1 200 OK\r\nX-Shared: 1\r\nContent-Length: 0\r\n\r\n"
    heads = []
    for _ in range(3):
        rec = Recorder()
        ResponseCodec(rec, HEADS).feed(data)
        heads.append(rec.events[0][1])
    assert heads[1] is heads[2] and heads[2].raw is not None  # one cached object
    heads[2].headers.append((b"X-Edit", b"e"))  # an edit to a copy only
    assert heads[2].headers == [(b"X-Shared", b"1")]
    with pytest.raises(AttributeError):
        heads[2].headers = []


def test_a_full_head_cache_is_renewed_only_once_it_earned_its_keep() -> None:
    HEADS.clear()
    cache = HEADS.requests
    size = HEADS.size
    unique = b"GET / HTTP/1.1\r\nHost: a\r\nX-U: %d\r\nX-V: %d\r\n\r\n"
    feed_requests([unique % (i, i) for i in range(size + 50)])
    # Full of heads never seen again: kept.
    assert len(cache) == size and HEADS.request_hits == 0
    assert unique % (0, 0) in cache
    for _ in range(size):  # the cache earns its keep (one hit per new connection)...
        rec, _ = feed_requests([unique % (0, 0)])
        assert rec.events[0][1].raw is not None
    feed_requests([unique % (10 * size, 10 * size)])  # ...so the next new head empties it
    assert len(cache) == 1 and HEADS.request_hits == 0
