"""Sans-IO HTTP/1.1 codec: strict request/response parsing on llhttp, and head serialisation.

No sockets here: `RequestCodec.feed(bytes)` / `ResponseCodec.feed(bytes)` call a sink's
methods (head, body pieces, end with trailers) and raise `BadMessageError` for anything
that must not be forwarded. The heads they produce are already split the way a proxy
needs them: `headers` holds the end-to-end fields in arrival order (original case), and
the hop-by-hop fields (`Connection` and the fields it names, `Keep-Alive`,
`Proxy-Connection`, `TE`, `Transfer-Encoding`, `Upgrade`) and the framing
(`Content-Length`) are interpreted into attributes instead.

llhttp (through httptools) in its default strict mode already rejects: Content-Length
with Transfer-Encoding, duplicate Content-Length, non-digit Content-Length, invalid or
overflowing chunk sizes, bare LF anywhere in the head or chunk framing, obs-fold,
whitespace before the colon, control characters in values, unknown HTTP versions and a
Transfer-Encoding whose last coding is not chunked. This module adds: a request line
over 8 KiB (400), a header section over 64 KiB (431), a missing or repeated Host in
HTTP/1.1 (400), HTTP/0.9 (400), and transfer codings other than plain `chunked` (501,
since the proxy would have to decode them).

Head cache. A proxy sees the same heads over and over (one client library's requests,
one server's responses), so what llhttp made of a head is remembered under the head's
exact bytes, request line and blank line included, and a head is taken from the cache
only when all of its bytes equal a head llhttp accepted, at the start of a message of a
connection llhttp would still parse (none after a message without keep-alive): identical
bytes parse identically, so the cache gives exactly llhttp's result and every rejection
comes from the strict parser. A head seen before is then taken without llhttp: one
`find` of the blank line, one dict lookup, its Content-Length body counted through. Only
heads with plain framing are cached (no Transfer-Encoding, Upgrade, Expect or CONNECT;
responses 2xx-5xx but not 204/304, with Content-Length). tests/test_codec_differential.py
feeds every input cold, warm and split at every offset and requires one result. A cached
head keeps its forwarded field lines as bytes (`raw`: hop-by-hop fields and
X-Forwarded-For out, Content-Length in); its `headers` list is built on first access (a
policy route reading or editing fields).
"""

from __future__ import annotations

from http import HTTPStatus
from typing import Any, Protocol

import httptools

from proxy.errors import BadMessageError

MAX_REQUEST_LINE = 8 * 1024
MAX_HEADER_SECTION = 64 * 1024
# Field lines per head (Envoy's default max_headers_count), requests and responses alike.
MAX_HEADER_FIELDS = 100
# Interim (1xx, not 101) responses an upstream may send before its final one: more is a
# flood (a server answers 100 once, 103 a few times), and the exchange fails with 502.
MAX_INTERIM_RESPONSES = 8

Fields = list[tuple[bytes, bytes]]

# What each interpreted field name means to the codec; anything else is end-to-end.
_HOST, _CL, _TE, _CONN, _HOP, _UPGRADE, _EXPECT, _XFF, _XRID, _XFP = range(10)
_REQUEST_FIELDS = {
    b"host": _HOST,
    b"content-length": _CL,
    b"transfer-encoding": _TE,
    b"connection": _CONN,
    b"keep-alive": _HOP,
    b"proxy-connection": _HOP,
    b"te": _HOP,
    b"upgrade": _UPGRADE,
    b"expect": _EXPECT,
    b"x-forwarded-for": _XFF,
    b"x-request-id": _XRID,
    b"x-forwarded-proto": _XFP,
}
_RESPONSE_FIELDS = {
    b"content-length": _CL,
    b"transfer-encoding": _TE,
    b"connection": _CONN,
    b"keep-alive": _HOP,
    b"proxy-connection": _HOP,
    b"te": _HOP,
    b"upgrade": _UPGRADE,
}
# Fields a sender must not put in trailers (RFC 9110 6.5.1): framing, routing, auth.
_FORBIDDEN_TRAILERS = frozenset(
    {
        b"content-length",
        b"transfer-encoding",
        b"host",
        b"connection",
        b"keep-alive",
        b"te",
        b"trailer",
        b"upgrade",
        b"proxy-connection",
        b"authorization",
        b"set-cookie",
        b"content-type",
        b"content-encoding",
    }
)
_NO_BODY_STATUS = frozenset({204, 304})
_PLAIN = -1
# Field names as they arrive (any case) → kind, so the common names skip `lower()`.
_request_kinds: dict[bytes, int] = {}
_response_kinds: dict[bytes, int] = {}
_MAX_KIND_CACHE = 1024
# Reason phrases are regenerated from the status (RFC 9112 4: clients ignore them).
_REASONS = {s.value: s.phrase.encode() for s in HTTPStatus}
# Head caches (see the module docstring): exact head bytes → the parse llhttp made of
# them (see RequestCodec._lookup for what request keys leave out). Bounded (_renew).
_MAX_CACHED_HEADS = 512
# A template: the arguments that rebuild the parsed head (its `raw` first) and the body
# length (-1: none).
_request_heads: dict[bytes, tuple[tuple[Any, ...], int]] = {}
_response_heads: dict[bytes, tuple[ResponseHead, int]] = {}
# Per cache: hits and skipped fills since it was last emptied. A full cache is emptied
# for new heads only once it has earned its keep (as many hits as it holds) or after a
# long pause: heads that never repeat then stop paying for being remembered.
_request_use = [0, 0]
_response_use = [0, 0]


def _renew(cache: dict[bytes, Any], use: list[int]) -> bool:
    """A full head cache: empty it for new heads (True), or keep it and skip this one."""
    if use[0] >= _MAX_CACHED_HEADS or use[1] >= 16 * _MAX_CACHED_HEADS:
        cache.clear()
        use[0] = use[1] = 0
        return True
    use[1] += 1
    return False


def _encode_fields(headers: Fields, content_length: int | None) -> bytes:
    """Field lines as they are forwarded, framing included (a cached head's `raw`)."""
    raw = b"".join([n + b": " + v + b"\r\n" for n, v in headers])
    if content_length is not None:
        raw += b"Content-Length: %d\r\n" % content_length
    return raw


def _field_list(raw: bytes, host_index: bool) -> tuple[Fields, int]:
    """A cached head's field lines as (name, value) pairs, framing fields left out."""
    out: Fields = []
    index = -1
    for line in raw.split(b"\r\n")[:-1]:
        name, _, value = line.partition(b":")
        lname = name.lower()
        if lname == b"content-length":
            continue
        if host_index and lname == b"host":
            index = len(out)
        out.append((name, value.strip(b" \t")))
    return out, index


def _kind(name: bytes, cache: dict[bytes, int], table: dict[bytes, int]) -> int:
    kind = table.get(name.lower(), _PLAIN)
    if len(cache) < _MAX_KIND_CACHE:
        cache[name] = kind
    return kind


class RequestHead:
    """A parsed request head; `headers` are the end-to-end fields only.

    Slots, no `__getattr__`: attribute reads on the hot path stay on CPython's fast path.
    A cached head carries `raw`, its field lines as forwarded (Content-Length included;
    hop-by-hop fields and X-Forwarded-For left out), and builds `headers` on first access.
    """

    __slots__ = (
        "_fields",
        "_host_index",
        "chunked",
        "connection_tokens",
        "content_length",
        "expect_continue",
        "forwarded_for",
        "forwarded_proto",
        "host",
        "keep_alive",
        "method",
        "raw",
        "request_id",
        "target",
        "upgrade",
        "version",
    )

    def __init__(
        self,
        raw: bytes | None = None,
        method: bytes = b"",
        target: bytes = b"",
        version: str = "1.1",
        keep_alive: bool = True,
        host: bytes | None = None,
        content_length: int | None = None,
        forwarded_for: bytes | None = None,
        forwarded_proto: bytes | None = None,
        request_id: bytes | None = None,
    ) -> None:
        self.raw = raw
        self._fields: Fields | None = [] if raw is None else None
        self._host_index = -1
        self.method = method
        self.target = target
        self.version = version
        self.keep_alive = keep_alive
        self.host = host
        self.content_length = content_length
        self.forwarded_for = forwarded_for
        self.forwarded_proto = forwarded_proto
        self.request_id = request_id
        self.chunked = False
        self.upgrade: bytes | None = None
        self.expect_continue = False
        self.connection_tokens: list[bytes] | None = None

    def _materialise(self) -> Fields:
        fields, self._host_index = _field_list(self.raw or b"", True)
        self._fields = fields
        self.raw = None
        return fields

    @property
    def headers(self) -> Fields:
        fields = self._fields
        return fields if fields is not None else self._materialise()

    @headers.setter
    def headers(self, fields: Fields) -> None:
        self._fields = fields
        self.raw = None

    @property
    def host_index(self) -> int:
        if self._fields is None:
            self._materialise()
        return self._host_index

    @host_index.setter
    def host_index(self, index: int) -> None:
        self._host_index = index

    def set_host(self, authority: bytes) -> None:
        """Replace the Host field (or add one): absolute-form's authority wins."""
        raw = self.raw
        if raw is not None:
            low = b"\n" + raw.lower()
            i = low.find(b"\nhost:")
            line = b"Host: " + authority + b"\r\n"
            if i < 0:
                self.raw = raw + line
            else:
                j = raw.index(b"\r\n", i) + 2
                self.raw = raw[:i] + line + raw[j:]
        elif self.host_index >= 0:
            self.headers[self.host_index] = (b"Host", authority)
        else:
            self.headers.append((b"Host", authority))
        self.host = authority

    @property
    def has_body(self) -> bool:
        return self.chunked or bool(self.content_length)

    def __repr__(self) -> str:
        framing = "chunked" if self.chunked else f"length={self.content_length}"
        return (
            f"<RequestHead {self.method.decode()} {self.target[:60]!r} HTTP/{self.version}"
            f" host={self.host!r} {framing} fields={len(self.headers)}"
            f"{' upgrade=' + repr(self.upgrade) if self.upgrade else ''}>"
        )


class _CachedRequestHead(RequestHead):
    """A RequestHead made from a cache template without running `__init__`.

    Calling a class with a Python `__init__` is the costliest step of taking a cached
    head (CPython 3.11 runs it in a frame of its own); with object's `__init__` the call
    only allocates, and `_from_template` sets every slot as `__init__` would.
    """

    __slots__ = ()
    __init__ = object.__init__


def _from_template(args: tuple[Any, ...]) -> RequestHead:
    """What `RequestHead(*args)` makes of a cache template's args (`raw` is set)."""
    head: RequestHead = _CachedRequestHead()
    (
        head.raw,
        head.method,
        head.target,
        head.version,
        head.keep_alive,
        head.host,
        head.content_length,
        head.forwarded_for,
        head.forwarded_proto,
        head.request_id,
    ) = args
    head._fields = None
    head._host_index = -1
    head.chunked = False
    head.upgrade = None
    head.expect_continue = False
    head.connection_tokens = None
    return head


class ResponseHead:
    """A parsed response head; `headers` are the end-to-end fields only.

    A cached head carries `raw` (field lines as forwarded, Content-Length included,
    hop-by-hop out) and builds `headers` on first access.
    """

    __slots__ = (
        "_fields",
        "chunked",
        "content_length",
        "keep_alive",
        "raw",
        "reason",
        "shared",
        "status",
        "upgrade",
        "version",
    )

    def __init__(
        self,
        raw: bytes | None = None,
        status: int = 0,
        reason: bytes = b"",
        version: str = "1.1",
        keep_alive: bool = True,
        content_length: int | None = None,
    ) -> None:
        self.raw = raw
        self._fields: Fields | None = [] if raw is None else None
        self.status = status
        self.reason = reason
        self.version = version
        self.keep_alive = keep_alive
        self.content_length = content_length
        self.chunked = False
        self.upgrade: bytes | None = None
        # A cached head handed out for every response with these bytes: never changed;
        # its `headers` is a new list each time.
        self.shared = False

    @property
    def headers(self) -> Fields:
        fields = self._fields
        if fields is None:
            fields = _field_list(self.raw or b"", False)[0]
            if self.shared:
                return fields
            self._fields = fields
            self.raw = None
        return fields

    @headers.setter
    def headers(self, fields: Fields) -> None:
        if self.shared:
            raise AttributeError("a cached response head is shared and cannot change")
        self._fields = fields
        self.raw = None

    def __repr__(self) -> str:
        framing = "chunked" if self.chunked else f"length={self.content_length}"
        fields = len(self.headers)
        return f"<ResponseHead {self.status} HTTP/{self.version} {framing} fields={fields}>"


class RequestSink(Protocol):
    def on_request_head(self, head: RequestHead) -> None: ...

    def on_request_body(self, data: bytes) -> None: ...

    def on_request_end(self, trailers: Fields | None) -> None: ...


class ResponseSink(Protocol):
    def on_response_head(self, head: ResponseHead) -> None: ...

    def on_informational(self, head: ResponseHead) -> None: ...

    def on_response_body(self, data: bytes) -> None: ...

    def on_response_end(self, trailers: Fields | None) -> None: ...


class _SkipBody(Exception):
    """Raised from a parser callback to stop llhttp after a body-less response head."""


def _connection_tokens(value: bytes, into: list[bytes]) -> None:
    for token in value.split(b","):
        token = token.strip().lower()
        if token:
            into.append(token)


def _drop_named(fields: Fields, tokens: list[bytes]) -> Fields:
    named = {t for t in tokens if t not in (b"close", b"keep-alive", b"upgrade")}
    if not named:
        return fields
    return [f for f in fields if f[0].lower() not in named]


def _is_h2c(upgrade: bytes) -> bool:
    return upgrade.strip().lower() == b"h2c"


def _clean_trailers(fields: Fields) -> Fields:
    return [f for f in fields if f[0].lower() not in _FORBIDDEN_TRAILERS]


class RequestCodec:
    """Parses a stream of requests from a client; calls the sink per head/body/end.

    `feed` returns None, or, once a request switched protocols (Upgrade or CONNECT),
    the bytes that followed its head; the codec must not be fed after that.
    """

    __slots__ = (
        "_clean",
        "_fields_seen",
        "_fill",
        "_h2c_body",
        "_head",
        "_last_head",
        "_last_template",
        "_parser",
        "_remaining",
        "_size",
        "_te",
        "_trailers",
        "_url",
        "head_bytes",
        "in_body",
        "sink",
        "upgraded",
    )

    def __init__(self, sink: RequestSink) -> None:
        self.sink = sink
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
        # An h2c upgrade was stripped from the current request: llhttp still stops at its
        # head as at an upgrade, and this many body bytes follow it (-1: none pending).
        self._h2c_body = -1
        # The previous cached head taken on this connection (with its blank line).
        self._last_head: bytes | None = None
        self._last_template: tuple[tuple[Any, ...], int] = ((), -1)
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
                self.sink.on_request_body(data)
                return None
            self._remaining = 0
            self.in_body = False
            if n == remaining:
                self.sink.on_request_body(data)
                self.sink.on_request_end(None)
                return None
            self.sink.on_request_body(data[:remaining])
            self.sink.on_request_end(None)
            data = data[remaining:]
        elif data == self._last_head and self._clean and not self.in_body:
            # The previous head of this connection again, alone (a client's keep-alive
            # loop): _fast() and _from_template(), inlined for this case.
            args, length = self._last_template
            head: RequestHead = _CachedRequestHead()
            (
                head.raw,
                head.method,
                head.target,
                head.version,
                head.keep_alive,
                head.host,
                head.content_length,
                head.forwarded_for,
                head.forwarded_proto,
                head.request_id,
            ) = args
            head._fields = None
            head._host_index = -1
            head.chunked = False
            head.upgrade = None
            head.expect_continue = False
            head.connection_tokens = None
            sink = self.sink
            self.in_body = True
            sink.on_request_head(head)
            if length <= 0:
                self.in_body = False
                sink.on_request_end(None)
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
            cause = e.__context__
            if isinstance(cause, BaseException):
                raise cause from None
            raise BadMessageError(str(e)) from None
        except httptools.HttpParserError as e:
            self._fill = None
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
        if last is not None and data.startswith(last):
            # The same head as this connection's previous request (no hashing at all).
            end = len(last)
            args, length = self._last_template
            head = _from_template(args)
        else:
            found = self._lookup(data)
            if found is None:
                return -1
            head, end, length = found
        sink = self.sink
        self.in_body = True
        sink.on_request_head(head)
        if length <= 0:
            self.in_body = False
            sink.on_request_end(None)
            return end
        avail = len(data) - end
        if avail < length:
            self._remaining = length - avail
            if avail:
                sink.on_request_body(data[end:])
            return len(data)
        self.in_body = False
        sink.on_request_body(data[end : end + length])
        sink.on_request_end(None)
        return end + length

    def _lookup(self, data: bytes) -> tuple[RequestHead, int, int] | None:
        """The cached head `data` starts with: (head, its end, body length), or None."""
        end = data.find(b"\r\n\r\n")
        if end < 0 or end > MAX_HEADER_SECTION:
            return None
        key = data[: end + 4]
        template = _request_heads.get(key)
        if template is None:
            # Cache what llhttp makes of it, if the head starts at data[0] (the method,
            # not an empty line llhttp would skip) and the cache has room or has earned
            # a refill.
            if data[0] > 32 and (
                len(_request_heads) < _MAX_CACHED_HEADS or _renew(_request_heads, _request_use)
            ):
                self._fill = key
            return None
        _request_use[0] += 1
        args, length = template
        self._last_head = key
        self._last_template = template
        return _from_template(args), end + 4, length

    def _cache(self, head: RequestHead, key: bytes) -> None:
        """Remember what llhttp made of a head (simple framing only) under its bytes."""
        if head.chunked or head.upgrade is not None or head.expect_continue:
            return
        if head.method == b"CONNECT" or not head.keep_alive:
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
        if len(_request_heads) >= _MAX_CACHED_HEADS:
            _request_heads.clear()
        length = head.content_length
        _request_heads[key] = (args, -1 if length is None else length)

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
        kind = _request_kinds.get(name)
        if kind is None:
            kind = _kind(name, _request_kinds, _REQUEST_FIELDS)
        head = self._head
        fields = head._fields
        assert fields is not None
        if kind == _PLAIN:
            fields.append((name, value))
        elif kind == _HOST:
            if head.host is not None:
                raise BadMessageError("more than one Host field")
            head.host = value
            head.host_index = len(fields)
            fields.append((name, value))
        elif kind == _XRID:
            head.request_id = value
            fields.append((name, value))
        elif kind == _XFF:
            ff = head.forwarded_for
            head.forwarded_for = value if ff is None else ff + b", " + value
        elif kind == _XFP:
            head.forwarded_proto = value
            fields.append((name, value))
        elif kind == _CL:
            # llhttp has checked the digits and refused duplicates.
            head.content_length = int(value)
        elif kind == _TE:
            self._te = value if self._te is None else self._te + b", " + value
        elif kind == _CONN:
            if head.connection_tokens is None:
                head.connection_tokens = []
            _connection_tokens(value, head.connection_tokens)
        elif kind == _UPGRADE:
            head.upgrade = value
        elif kind == _EXPECT:
            if value.strip().lower() == b"100-continue":
                head.expect_continue = True
            fields.append((name, value))
        # _HOP: dropped.

    def on_headers_complete(self) -> None:
        key = self._fill
        self._fill = None
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
            head.headers = _drop_named(head.headers, tokens)
            if b"upgrade" not in tokens:
                head.upgrade = None
            elif head.upgrade is not None and _is_h2c(head.upgrade):
                self._strip_h2c(head)
                key = None
        elif head.upgrade is not None:
            head.upgrade = None
        self.in_body = True
        self.head_bytes = 0
        self._fields_seen = 0  # trailers are counted afresh
        if key is not None:
            self._cache(head, key)
        self.sink.on_request_head(head)

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
        self.sink.on_request_body(body)

    def on_message_complete(self) -> None:
        if self._h2c_body > 0:
            # A stripped h2c upgrade: llhttp ends it at its head; the body comes next.
            self._head = RequestHead()
            self._url = b""
            self._size = 0
            self._fields_seen = 0
            self._te = None
            return
        trailers = self._trailers
        self.in_body = False
        # llhttp refuses any byte after a message without keep-alive: so must the cache.
        self._clean = self._head.keep_alive
        # self._new_head(), inlined: this runs once per request
        self._head = RequestHead()
        self._url = b""
        self._size = 0
        self._fields_seen = 0
        self._te = None
        if trailers:
            self._trailers = None
            self.sink.on_request_end(_clean_trailers(trailers))
        else:
            self.sink.on_request_end(None)

    def __repr__(self) -> str:
        state = "upgraded" if self.upgraded else ("body" if self.in_body else "head")
        return f"<RequestCodec {state} head_bytes={self.head_bytes}>"


class ResponseCodec:
    """Parses responses on an upstream connection, one per request sent.

    Before each request, `expect(method)` tells it whether the response can have a body
    (HEAD's cannot; llhttp cannot be told, so the parser is replaced after such a head).
    At end of stream `feed_eof` completes a close-delimited body or reports truncation.
    """

    __slots__ = (
        "_clean",
        "_close_delimited",
        "_conn_tokens",
        "_fields_seen",
        "_fill",
        "_head",
        "_interim",
        "_last_head",
        "_last_template",
        "_parser",
        "_remaining",
        "_trailers",
        "head_bytes",
        "head_request",
        "in_body",
        "sink",
        "upgraded",
    )

    def __init__(self, sink: ResponseSink) -> None:
        self.sink = sink
        self._parser = httptools.HttpResponseParser(self)
        self.head_request = False
        self.upgraded = False
        self.in_body = False
        self._close_delimited = False
        self._head = ResponseHead()
        self._trailers: Fields | None = None
        self._clean = True
        self._remaining = 0
        self._fill: bytes | None = None
        # The previous cached head taken on this connection (with its blank line).
        self._last_head: bytes | None = None
        self._last_template: tuple[ResponseHead, int] = (self._head, -1)
        # Limits of the head being parsed: bytes fed since it began (llhttp buffers a
        # field value that never ends inside itself), field lines, Connection tokens,
        # and the interim responses before this exchange's final one.
        self.head_bytes = 0
        self._fields_seen = 0
        self._conn_tokens: list[bytes] | None = None
        self._interim = 0

    @property
    def idle(self) -> bool:
        """No response is partly read: the connection may carry another request."""
        return not self.in_body and not self.upgraded

    def feed(self, data: bytes) -> bytes | None:
        remaining = self._remaining
        if remaining:
            # Inside a fast-path Content-Length body: count it through.
            n = len(data)
            if n < remaining:
                self._remaining = remaining - n
                self.sink.on_response_body(data)
                return None
            self._remaining = 0
            self.in_body = False
            if n == remaining:
                self.sink.on_response_body(data)
                self.sink.on_response_end(None)
                return None
            self.sink.on_response_body(data[:remaining])
            self.sink.on_response_end(None)
            data = data[remaining:]
        else:
            last = self._last_head
            if last is not None and self._clean and not self.in_body and not self.head_request:
                head, length = self._last_template
                end = len(last)
                if length and len(data) == end + length and data[:end] == last:
                    # The previous head of this connection again, with its whole body
                    # and nothing after it: _fast(), inlined for this case (a slice
                    # compared costs less than startswith's argument parsing).
                    self._close_delimited = False
                    sink = self.sink
                    self.in_body = True
                    sink.on_response_head(head)
                    self.in_body = False
                    sink.on_response_body(data[end:])
                    sink.on_response_end(None)
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
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as e:
            self.upgraded = True
            return data[e.args[0] :]
        except httptools.HttpParserCallbackError as e:
            self._fill = None
            cause = e.__context__
            if isinstance(cause, _SkipBody):
                self._parser = httptools.HttpResponseParser(self)
                self._clean = True
                return None
            if isinstance(cause, BaseException):
                raise cause from None
            raise BadMessageError(str(e), status=502, reason="upstream_protocol_error") from None
        except httptools.HttpParserError as e:
            self._fill = None
            raise BadMessageError(
                str(e) or "malformed response", status=502, reason="upstream_protocol_error"
            ) from None
        if not self.in_body and self.head_bytes > MAX_HEADER_SECTION:
            # Still inside a head after all of these bytes: all of them are head.
            raise BadMessageError(
                "upstream response header section larger than 64 KiB",
                status=502,
                reason="upstream_response_too_large",
            )
        return None

    def _fast(self, data: bytes) -> int:
        """Take one response whose head is cached: bytes used, or -1 for llhttp.

        On a miss nothing is consumed and `_fill` tells llhttp's head callback to cache
        what it makes of this head (2xx-5xx but not 204/304, Content-Length framing).
        """
        last = self._last_head
        if last is not None and data.startswith(last):
            # The same head as this connection's previous response (no hashing at all).
            end = len(last)
            head, length = self._last_template
        else:
            end = data.find(b"\r\n\r\n")
            if end < 0:
                return -1
            key = data[:end]
            template = _response_heads.get(key)
            if template is None:
                if data[:5] == b"HTTP/" and (
                    len(_response_heads) < _MAX_CACHED_HEADS
                    or _renew(_response_heads, _response_use)
                ):
                    self._fill = key
                return -1
            _response_use[0] += 1
            end += 4
            self._last_head = data[:end]
            self._last_template = template
            head, length = template
        self._close_delimited = False
        sink = self.sink
        if self.head_request or not length:
            sink.on_response_head(head)
            sink.on_response_end(None)
            return end
        self.in_body = True
        sink.on_response_head(head)
        avail = len(data) - end
        if avail < length:
            self._remaining = length - avail
            if avail:
                sink.on_response_body(data[end:])
            return len(data)
        self.in_body = False
        sink.on_response_body(data[end : end + length])
        sink.on_response_end(None)
        return end + length

    def _cache(self, head: ResponseHead, key: bytes) -> None:
        status = head.status
        length = head.content_length
        if status < 200 or status == 204 or status == 304 or length is None:
            return
        if not head.keep_alive:
            return
        if head.chunked or head.upgrade is not None:
            return
        shared = ResponseHead(
            _encode_fields(head.headers, length),
            status,
            head.reason,
            head.version,
            head.keep_alive,
            length,
        )
        shared.shared = True
        if len(_response_heads) >= _MAX_CACHED_HEADS:
            _response_heads.clear()
        _response_heads[key] = (shared, length)

    def feed_eof(self) -> bool:
        """The upstream closed: True if that completed a close-delimited response."""
        if self.in_body and self._close_delimited:
            self.in_body = False
            self._head = ResponseHead()
            self.sink.on_response_end(None)
            return True
        return False

    # httptools callbacks -------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._clean = False

    def on_header(self, name: bytes, value: bytes) -> None:
        # llhttp drops leading whitespace; the field value excludes trailing OWS too
        # (RFC 9110 5.5), as the cached and split paths see it.
        value = value.rstrip(b" \t")
        self._fields_seen += 1
        if self._fields_seen > MAX_HEADER_FIELDS:
            raise BadMessageError(
                f"upstream response has more than {MAX_HEADER_FIELDS} header fields",
                status=502,
                reason="upstream_response_too_large",
            )
        if self.in_body:
            if self._trailers is None:
                self._trailers = []
            self._trailers.append((name, value))
            return
        kind = _response_kinds.get(name)
        if kind is None:
            kind = _kind(name, _response_kinds, _RESPONSE_FIELDS)
        head = self._head
        if kind == _PLAIN:
            fields = head._fields
            assert fields is not None
            fields.append((name, value))
        elif kind == _CL:
            head.content_length = int(value)
        elif kind == _TE:
            te = value.strip().lower()
            if te != b"chunked":
                # llhttp accepts e.g. "gzip, chunked"; we would have to pass the coding
                # through as hop-by-hop, which HTTP/1.1 proxies may not do blindly.
                raise BadMessageError(
                    "upstream used a transfer coding other than chunked",
                    status=502,
                    reason="upstream_protocol_error",
                )
            head.chunked = True
        elif kind == _UPGRADE:
            head.upgrade = value
        elif kind == _CONN:
            if value == b"keep-alive" or value == b"close":
                return  # llhttp has read it; nothing else is named
            # Fields named here are dropped once the head is complete: they may come
            # after Connection as well as before it.
            if self._conn_tokens is None:
                self._conn_tokens = []
            _connection_tokens(value, self._conn_tokens)
        # _HOP: dropped.

    def on_headers_complete(self) -> None:
        # The head a cache miss announced is this one only if nothing came before it.
        key = self._fill
        self._fill = None
        self.head_bytes = 0
        self._fields_seen = 0
        parser = self._parser
        head = self._head
        tokens = self._conn_tokens
        if tokens is not None:
            self._conn_tokens = None
            head.headers = _drop_named(head.headers, tokens)
        head.status = status = parser.get_status_code()
        head.reason = _REASONS.get(status, b"Unknown")
        head.version = parser.get_http_version()
        head.keep_alive = parser.should_keep_alive()
        if status < 200 and status != 101:
            self._interim += 1
            if self._interim > MAX_INTERIM_RESPONSES:
                raise BadMessageError(
                    f"upstream sent more than {MAX_INTERIM_RESPONSES} interim responses",
                    status=502,
                    reason="upstream_protocol_error",
                )
            self._head = ResponseHead()
            self.sink.on_informational(head)
            return
        self._interim = 0
        if key is not None:
            self._cache(head, key)
        self.in_body = True
        if self.head_request or status in _NO_BODY_STATUS:
            self._close_delimited = False
            if self.head_request:
                self.in_body = False
                self._head = ResponseHead()
                self.sink.on_response_head(head)
                self.sink.on_response_end(None)
                raise _SkipBody
        else:
            self._close_delimited = not head.chunked and head.content_length is None
        self.sink.on_response_head(head)

    def on_body(self, body: bytes) -> None:
        self.sink.on_response_body(body)

    def on_message_complete(self) -> None:
        # llhttp refuses any byte after a message without keep-alive: so must the cache.
        # (An informational response's end finds a fresh head here, keep-alive.)
        self._clean = self._head.keep_alive
        self._fields_seen = 0
        if not self.in_body:
            return  # the end of an informational (1xx) response
        trailers = self._trailers
        self._trailers = None
        self.in_body = False
        self._head = ResponseHead()
        self.sink.on_response_end(_clean_trailers(trailers) if trailers else None)

    def __repr__(self) -> str:
        state = "upgraded" if self.upgraded else ("body" if self.in_body else "idle")
        return f"<ResponseCodec {state}{' head-request' if self.head_request else ''}>"


# Serialisation ------------------------------------------------------------------------


def encode_request_head(method: bytes, target: bytes, headers: Fields) -> bytes:
    """`METHOD target HTTP/1.1` and the given field lines (framing fields included)."""
    fields = b"".join([n + b": " + v + b"\r\n" for n, v in headers])
    return method + b" " + target + b" HTTP/1.1\r\n" + fields + b"\r\n"


def encode_response_head(status: int, reason: bytes, headers: Fields) -> bytes:
    fields = b"".join([n + b": " + v + b"\r\n" for n, v in headers])
    return b"HTTP/1.1 %d %s\r\n%s\r\n" % (status, reason, fields)


def chunk_prefix(size: int) -> bytes:
    """The size line that goes before `size` bytes of chunk data (followed by CRLF)."""
    return b"%x\r\n" % size


def encode_last_chunk(trailers: Fields | None) -> bytes:
    if not trailers:
        return b"0\r\n\r\n"
    return b"0\r\n" + b"".join(n + b": " + v + b"\r\n" for n, v in trailers) + b"\r\n"
