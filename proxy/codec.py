"""Sans-IO HTTP/1.1 request parsing: a client's requests, strictly, on llhttp.

No sockets here: `RequestCodec.feed(bytes)` calls a sink's methods (head, body pieces,
end with trailers) and raises `BadMessageError` for anything that must not be forwarded.
The heads it produces (proxy/heads.py) are already split the way a proxy needs them:
`headers` holds the end-to-end fields in arrival order (original case), and the
hop-by-hop fields and the framing are interpreted into attributes (proxy/fields.py).
Responses are parsed by proxy/response_codec.py, with the same limits.

llhttp (through httptools) in its default strict mode already rejects: Content-Length
with Transfer-Encoding, duplicate Content-Length, non-digit Content-Length, invalid or
overflowing chunk sizes, bare LF anywhere in the head or chunk framing, obs-fold,
whitespace before the colon, control characters in values, unknown HTTP versions and a
Transfer-Encoding whose last coding is not chunked. This module adds: a request line
over 8 KiB (400), a header section over 64 KiB or more than 100 fields (431), a missing
or repeated Host in HTTP/1.1 (400), HTTP/0.9 (400), transfer codings other than plain
`chunked` (501, since the proxy would have to decode them), and forwards `Upgrade: h2c`
as plain HTTP/1.1.

With a `HeadCache` (proxy/head_cache.py, one per listener), a head llhttp accepted
before is taken by its exact bytes without llhttp (one `find` of the blank line, one
dict lookup, its Content-Length body counted through), at the start of a message of a
connection llhttp would still parse; only plain framing is remembered (no
Transfer-Encoding, Upgrade, Expect or CONNECT, keep-alive). A cached head keeps its
forwarded field lines as bytes (`raw`) and builds `headers` on first access.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

import httptools

from proxy.errors import BadMessageError
from proxy.fields import (
    B3,
    CL,
    CONN,
    EXPECT,
    HOST,
    PLAIN,
    REQUEST_FIELDS,
    TE,
    TRACEPARENT,
    UPGRADE,
    XFF,
    XFP,
    XRID,
    clean_trailers,
    connection_tokens,
    drop_named,
    field_kind,
    is_h2c,
    request_kinds,
)
from proxy.head_cache import HeadCache
from proxy.heads import (
    Fields,
    RequestHead,
    _encode_fields,
    _from_template,
)

if TYPE_CHECKING:
    from proxy.downstream import DownstreamConnection

MAX_REQUEST_LINE = 8 * 1024
MAX_HEADER_SECTION = 64 * 1024
# Field lines per head (Envoy's default max_headers_count), requests and responses alike.
MAX_HEADER_FIELDS = 100
# An X-Request-Id value a cached head may differ in (`_masked_key`): at most this long,
# and only visible ASCII (no space).
MAX_MASKED_ID = 128
# Visible ASCII to "a", any other byte to a space: `value.translate(VISIBLE).isalnum()`
# says whether a value holds visible ASCII only (two C calls, no table made per call).
VISIBLE = bytes(0x61 if 0x21 <= i <= 0x7E else 0x20 for i in range(256))
# Exact misses in a row without a masked hit after which only one in this many heads
# is tried masked (a power of two).
MASKED_PATIENCE = 64


def _masked_key(key: bytes) -> tuple[bytes, int, int] | None:
    """A whole head's cache key without its X-Request-Id value, with where that field's
    line starts (its CRLF before) and where the value stops; None when the head has no
    such line or its value is one llhttp must see.

    Every request another sidecar forwards carries a request id of its own, so an
    inbound listener would see no head twice. Keyed without the value, the rest of the
    head must still equal, byte for byte, a head llhttp accepted, and the value must be
    1-128 visible ASCII characters with nothing around it (llhttp accepts any such
    value, and nothing else in its result depends on it): the head cached this way
    gives exactly llhttp's result. The name is matched as a sidecar writes it or in
    lowercase; a marker byte (never in a head llhttp accepted) says which.
    """
    p = key.rfind(b"\r\nX-Request-Id: ")
    marker = b"\x00"
    if p < 0:
        p = key.rfind(b"\r\nx-request-id: ")
        if p < 0:
            return None
        marker = b"\x01"
    start = p + 16
    stop = key.find(b"\r\n", start)
    n = stop - start
    if n <= 0 or n > MAX_MASKED_ID:
        return None
    after = key[stop + 2]
    if after == 32 or after == 9 or not key[start:stop].translate(VISIBLE).isalnum():
        return None
    return key[:p] + marker + key[stop:], p, stop


class RequestSink(Protocol):
    def on_request_head(self, head: RequestHead) -> None: ...

    def on_request_body(self, data: bytes) -> None: ...

    def on_request_end(self, trailers: Fields | None) -> None: ...


class RequestCodec:
    """Parses a stream of requests from a client; calls the sink per head/body/end.

    `feed` returns None, or, once a request switched protocols (Upgrade or CONNECT),
    the bytes that followed its head; the codec must not be fed after that.
    """

    __slots__ = (
        "_clean",
        "_fields_seen",
        "_fill",
        "_fill_masked",
        "_h2c_body",
        "_head",
        "_last_head",
        "_last_masked",
        "_last_template",
        "_parser",
        "_probed",
        "_remaining",
        "_size",
        "_te",
        "_trailers",
        "_url",
        "cache",
        "conn",
        "head_bytes",
        "in_body",
        "sink",
        "upgraded",
    )

    def __init__(self, sink: RequestSink, cache: HeadCache | None = None) -> None:
        self.sink = sink
        # `sink` when it is the HTTP/1 connection, called directly in the compiled build
        # (set by proxy/downstream.py); None: through RequestSink.
        self.conn: DownstreamConnection | None = None
        # Heads llhttp already parsed (proxy/head_cache.py); None: llhttp every time.
        self.cache = cache
        self._parser = httptools.HttpRequestParser(self)
        self.upgraded = False
        self.in_body = False
        self.head_bytes = 0
        # llhttp is between messages (the fast path may take the next one).
        self._clean = True
        # Body bytes still to come of a message taken from the cache.
        self._remaining = 0
        # The cache key of the head llhttp is about to parse (a miss), if any.
        self._fill: bytes | None = None
        # With `_fill`: the head's key without its X-Request-Id value, and its
        # X-Request-Id line as it arrived (`_masked_key`), to cache it masked too.
        self._fill_masked: tuple[bytes, bytes] | None = None
        # An h2c upgrade was stripped from the current request: llhttp still stops at its
        # head as at an upgrade, and this many body bytes follow it (-1: none pending).
        self._h2c_body = -1
        # The previous cached head taken on this connection (with its blank line).
        self._last_head: bytes | None = None
        self._last_template: tuple[tuple[Any, ...], int] = ((), -1)
        # The previous head taken masked (`_find`): the bytes before and after its
        # X-Request-Id value, and its template.
        self._last_masked: tuple[bytes, bytes, tuple[Any, ...], bytes, bytes, int] | None = None
        # The masked key `_find` made of the head it last missed (`_masked_key`), or
        # None: the head's fill takes it from here.
        self._probed: tuple[bytes, int, int] | None = None
        self._new_head()

    def _new_head(self) -> None:
        self._head = RequestHead()
        self._url = b""
        self._size = 0
        self._fields_seen = 0
        self._te: bytes | None = None
        self._trailers: Fields | None = None

    @property
    def in_head(self) -> bool:
        """True between messages or inside a head (where the header-read timeout runs)."""
        return not self.in_body

    @property
    def partial_head(self) -> bool:
        """True when some bytes of a head arrived but not all of it."""
        return not self.in_body and self.head_bytes > 0

    def feed(self, data: bytes) -> bytes | None:
        remaining = self._remaining
        if remaining:
            # Inside a fast-path Content-Length body: count it through.
            n = len(data)
            if n < remaining:
                self._remaining = remaining - n
                self._to_body(data)
                return None
            self._remaining = 0
            self.in_body = False
            if n == remaining:
                self._to_body(data)
                self._to_end()
                return None
            self._to_body(data[:remaining])
            self._to_end()
            data = data[remaining:]
        elif data == self._last_head and self._clean and not self.in_body:
            # The previous head of this connection again, alone (a client's keep-alive
            # loop): _fast(), shortened for this case.
            args, length = self._last_template
            head = _from_template(args)
            self.in_body = True
            self._to_head(head)
            if length <= 0:
                self.in_body = False
                self._to_end()
            else:
                self._remaining = length
            return None
        while self._clean and not self.in_body:
            used = self._fast(data)
            if used < 0:
                break
            if used == len(data):
                return None
            data = data[used:]
        if not self.in_body:
            self.head_bytes += len(data)
        after_h2c = b""
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as e:
            rest = data[e.args[0] :]
            length = self._h2c_body
            if length < 0:
                self.upgraded = True
                return rest
            # A stripped h2c upgrade: not switching. A new parser for what follows
            # (fed outside this handler, so its errors do not chain to this one).
            self._h2c_body = -1
            self._parser = httptools.HttpRequestParser(self)
            self._clean = True
            if length:
                self._remaining = length
                self.head_bytes = 0
            after_h2c = rest
        except httptools.HttpParserCallbackError as e:
            self._fill = None
            self._fill_masked = None
            cause = e.__context__
            if isinstance(cause, BaseException):
                raise cause from None
            raise BadMessageError(str(e)) from None
        except httptools.HttpParserError as e:
            self._fill = None
            self._fill_masked = None
            raise BadMessageError(str(e) or "malformed request") from None
        if after_h2c:
            return self.feed(after_h2c)
        if not self.in_body and self.head_bytes > MAX_HEADER_SECTION:
            # Still inside a head after all of these bytes: all of them are head.
            raise BadMessageError(
                "header section larger than 64 KiB",
                status=431,
                reason="request_header_fields_too_large",
            )
        return None

    def _fast(self, data: bytes) -> int:
        """Take one message whose head is cached: bytes used, or -1 for llhttp.

        On a miss nothing is consumed and `_fill` tells llhttp's head callback to cache
        what it makes of this head.
        """
        last = self._last_head
        masked = self._last_masked
        if last is not None and data.startswith(last):
            # The same head as this connection's previous request (no hashing at all).
            end = len(last)
            args, length = self._last_template
            head = _from_template(args)
        elif (
            masked is not None
            and data.startswith(masked[0])
            and data.endswith(masked[1])
            and 0 < len(data) - len(masked[0]) - len(masked[1]) <= MAX_MASKED_ID
            and data[len(masked[0]) : len(data) - len(masked[1])].translate(VISIBLE).isalnum()
        ):
            # The previous masked head of this connection with another X-Request-Id
            # value, alone (see `_masked_key`).
            prefix, suffix, args, pre, post, length = masked
            end = len(data)
            rid = data[len(prefix) : end - len(suffix)]
            head = _from_template(args)
            head.raw = pre + b"X-Request-Id: " + rid + b"\r\n" + post
            head.request_id = rid
            self.cache.request_hits += 1  # type: ignore[union-attr]
        else:
            found = self._lookup(data)
            if found is None:
                return -1
            head, end, length = found
        self.in_body = True
        self._to_head(head)
        if length <= 0:
            self.in_body = False
            self._to_end()
            return end
        avail = len(data) - end
        if avail < length:
            self._remaining = length - avail
            if avail:
                self._to_body(data[end:])
            return len(data)
        self.in_body = False
        self._to_body(data[end : end + length])
        self._to_end()
        return end + length

    # The sink's events: the connection called directly (compiled) when it is one.

    def _to_head(self, head: RequestHead) -> None:
        conn = self.conn
        if conn is not None:
            conn.on_request_head(head)
        else:
            sink = self.sink
            sink.on_request_head(head)

    def _to_body(self, data: bytes) -> None:
        conn = self.conn
        if conn is not None:
            conn.on_request_body(data)
        else:
            sink = self.sink
            sink.on_request_body(data)

    def _to_end(self, trailers: Fields | None = None) -> None:
        conn = self.conn
        if conn is not None:
            conn.on_request_end(trailers)
        else:
            sink = self.sink
            sink.on_request_end(trailers)

    def _lookup(self, data: bytes) -> tuple[RequestHead, int, int] | None:
        """The cached head `data` starts with: (head, its end, body length), or None.

        On a miss nothing is consumed, and `_fill` (with `_fill_masked`) tells llhttp's
        head callback to cache what it makes of the head.
        """
        cache = self.cache
        if cache is None:
            return None
        n = len(data)
        whole = data.endswith(b"\r\n\r\n")
        if whole:
            # Most often a head alone: looked up whole, without a search for its end (a
            # cached head's only blank line is its last, so a hit is the first head).
            found = self._find(data, n - 4, cache)
            if found is not None:
                return found
        end = data.find(b"\r\n\r\n")
        if end < 0 or end > MAX_HEADER_SECTION:
            return None
        key = data[: end + 4]
        if not whole or end + 4 != n:
            found = self._find(key, end, cache)
            if found is not None:
                return found
        # Cache what llhttp makes of it, if the head starts at data[0] (the method, not
        # an empty line llhttp would skip) and the cache has room or has earned a refill.
        masked = self._probed
        self._probed = None
        if data[0] > 32 and cache.may_fill_request():
            self._fill = key
            if masked is not None:
                mkey, p, stop = masked
                self._fill_masked = (mkey, key[p + 2 : stop + 2])
        return None

    def _find(self, key: bytes, end: int, cache: HeadCache) -> tuple[RequestHead, int, int] | None:
        """The head `key` (a whole head) from the cache: as it is, or with another
        X-Request-Id value (`_masked_key`)."""
        template = cache.requests.get(key)
        if template is not None:
            cache.request_hits += 1
            args, length = template
            self._last_head = key
            self._last_template = template
            return _from_template(args), end + 4, length
        # Heads that never come back (each its own path, say) would pay for the masked
        # key, a search and a hash of the whole head, on every request: after 64 exact
        # misses in a row that were no masked hit either, only one in 64 tries it.
        misses = cache.masked_misses
        cache.masked_misses = misses + 1
        if misses >= MASKED_PATIENCE and misses & (MASKED_PATIENCE - 1):
            self._probed = None
            return None
        masked = self._probed = _masked_key(key)
        if masked is None:
            return None
        mkey, p, stop = masked
        found = cache.masked_requests.get(mkey)
        if found is None:
            return None
        cache.masked_misses = 0
        cache.request_hits += 1
        args, pre, post, length = found
        head = _from_template(args)
        head.raw = pre + key[p + 2 : stop + 2] + post
        head.request_id = key[p + 16 : stop]
        if key[p + 2] == 88:  # "X": the memo's line is written as a sidecar writes it
            self._last_masked = (key[: p + 16], key[stop:], args, pre, post, length)
        return head, end + 4, length

    def _remember_masked(
        self, head: RequestHead, args: tuple[Any, ...], length: int, masked: bytes, line: bytes
    ) -> None:
        """Remember a head under its key without the X-Request-Id value (see
        `_masked_key`): its forwarded lines before and after that field's line."""
        cache = self.cache
        assert cache is not None
        raw: bytes = args[0]
        if head.request_id != line[14:-2] or b"\nx-request-id:" in masked.lower():
            return  # another X-Request-Id line: llhttp's value is the last one
        i = (b"\r\n" + raw).find(b"\r\n" + line)
        if i < 0:
            return
        cut = (b"", *args[1:-1], None)
        cache.remember_masked_request(masked, (cut, raw[:i], raw[i + len(line) :], length))

    def _remember(self, head: RequestHead, key: bytes, masked: tuple[bytes, bytes] | None) -> None:
        """Remember what llhttp made of a head (simple framing only) under its bytes."""
        if head.chunked or head.upgrade is not None or head.expect_continue:
            return
        if head.method == b"CONNECT" or not head.keep_alive or self.cache is None:
            return
        args = (
            _encode_fields(head.headers, head.content_length),
            head.method,
            head.target,
            head.version,
            head.keep_alive,
            head.host,
            head.content_length,
            head.forwarded_for,
            head.forwarded_proto,
            head.request_id,
        )
        length = -1 if head.content_length is None else head.content_length
        self.cache.remember_request(key, (args, length))
        if masked is not None:
            self._remember_masked(head, args, length, masked[0], masked[1])

    # httptools callbacks -------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._clean = False

    def on_url(self, url: bytes) -> None:
        self._url += url
        if len(self._url) > MAX_REQUEST_LINE:
            raise BadMessageError("request line longer than 8 KiB", reason="request_line_too_long")

    def on_header(self, name: bytes, value: bytes) -> None:
        # llhttp drops leading whitespace; the field value excludes trailing OWS too
        # (RFC 9110 5.5), as the cached and split paths see it.
        value = value.rstrip(b" \t")
        self._size += len(name) + len(value) + 4
        self._fields_seen += 1
        if self._fields_seen > MAX_HEADER_FIELDS:
            raise BadMessageError(
                f"more than {MAX_HEADER_FIELDS} header fields",
                status=431,
                reason="request_header_fields_too_large",
            )
        if self.in_body:
            if self._trailers is None:
                self._trailers = []
            self._trailers.append((name, value))
            return
        kind = request_kinds.get(name)
        if kind is None:
            kind = field_kind(name, request_kinds, REQUEST_FIELDS)
        head = self._head
        fields = head._fields
        assert fields is not None
        if kind == PLAIN:
            fields.append((name, value))
        elif kind == HOST:
            if head.host is not None:
                raise BadMessageError("more than one Host field")
            head.host = value
            head.host_index = len(fields)
            fields.append((name, value))
        elif kind == XRID:
            head.request_id = value
            fields.append((name, value))
        elif kind == XFF:
            ff = head.forwarded_for
            head.forwarded_for = value if ff is None else ff + b", " + value
        elif kind == XFP:
            head.forwarded_proto = value
            fields.append((name, value))
        elif kind == CL:
            # llhttp has checked the digits and refused duplicates.
            head.content_length = int(value)
        elif kind == TE:
            self._te = value if self._te is None else self._te + b", " + value
        elif kind == CONN:
            if head.connection_tokens is None:
                head.connection_tokens = []
            connection_tokens(value, head.connection_tokens)
        elif kind == UPGRADE:
            head.upgrade = value
        elif kind == EXPECT:
            if value.strip().lower() == b"100-continue":
                head.expect_continue = True
            fields.append((name, value))
        elif kind == TRACEPARENT:
            if head.traceparent is None:
                head.traceparent = value
            fields.append((name, value))
        elif kind == B3:
            head.b3 = True
            fields.append((name, value))
        # HOP: dropped.

    def on_headers_complete(self) -> None:
        key = self._fill
        masked = self._fill_masked
        self._fill = self._fill_masked = None
        if self._size > MAX_HEADER_SECTION:
            raise BadMessageError(
                "header section larger than 64 KiB",
                status=431,
                reason="request_header_fields_too_large",
            )
        parser = self._parser
        head = self._head
        head.version = version = parser.get_http_version()
        if version != "1.1" and version != "1.0":
            raise BadMessageError(f"HTTP/{version} is not supported")
        if head.host is None and version == "1.1":
            raise BadMessageError("HTTP/1.1 request without Host")
        if self._te is not None:
            if self._te.strip().lower() != b"chunked":
                raise BadMessageError(
                    f"transfer coding {self._te.decode('latin-1')!r} is not supported",
                    status=501,
                    reason="not_implemented",
                )
            head.chunked = True
        head.method = parser.get_method()
        head.target = self._url
        head.keep_alive = parser.should_keep_alive()
        tokens = head.connection_tokens
        if tokens:
            head.headers = drop_named(head.headers, tokens)
            if b"upgrade" not in tokens:
                head.upgrade = None
            elif head.upgrade is not None and is_h2c(head.upgrade):
                self._strip_h2c(head)
                key = None
        elif head.upgrade is not None:
            head.upgrade = None
        self.in_body = True
        self.head_bytes = 0
        self._fields_seen = 0  # trailers are counted afresh
        if key is not None:
            self._remember(head, key, masked)
        self._to_head(head)

    def _strip_h2c(self, head: RequestHead) -> None:
        """Forward an `Upgrade: h2c` request as a plain HTTP/1.1 one, as Envoy does.

        An h2c app that switched would take the connection out of per-request policy.
        llhttp still ends the message at its head (an upgrade's body is the new
        protocol's), so a Content-Length body is counted through by `feed`.
        """
        if head.chunked:
            raise BadMessageError(
                "an h2c upgrade with a chunked body is not supported",
                status=501,
                reason="not_implemented",
            )
        head.upgrade = None
        head.headers = [f for f in head.headers if f[0].lower() != b"http2-settings"]
        self._h2c_body = head.content_length or 0

    def on_body(self, body: bytes) -> None:
        self._to_body(body)

    def on_message_complete(self) -> None:
        if self._h2c_body > 0:
            # A stripped h2c upgrade: llhttp ends it at its head; the body comes next.
            self._new_head()
            return
        trailers = self._trailers
        self.in_body = False
        # llhttp refuses any byte after a message without keep-alive: so must the cache.
        self._clean = self._head.keep_alive
        self._new_head()
        if trailers:
            self._to_end(clean_trailers(trailers))
        else:
            self._to_end()

    def __repr__(self) -> str:
        state = "upgraded" if self.upgraded else ("body" if self.in_body else "head")
        return f"<RequestCodec {state} head_bytes={self.head_bytes}>"
