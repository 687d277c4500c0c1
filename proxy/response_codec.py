"""Sans-IO HTTP/1.1 response parsing on an upstream connection (llhttp, strict).

`ResponseCodec.feed(bytes)` calls its sink (the exchange whose request the connection
carries) per head, interim head, body piece and end with trailers, and raises
`BadMessageError` (502) for a response that must not be relayed: over the head limits
of proxy/codec.py (64 KiB, 100 fields; `upstream_response_too_large`), more than
MAX_INTERIM_RESPONSES 1xx before the final one, a transfer coding other than chunked.
A response to HEAD, and 204/304, have no body (llhttp cannot be told about HEAD, so its
parser is replaced after such a head). With a `HeadCache`, a response head seen before
(2xx-5xx but 204/304, Content-Length framing, keep-alive) is taken by its exact bytes
without llhttp; a connection's repeated response with its whole body is taken in
`feed` itself.
"""

from __future__ import annotations

from http import HTTPStatus
from typing import TYPE_CHECKING, Protocol

import httptools

from proxy.codec import MAX_HEADER_FIELDS, MAX_HEADER_SECTION
from proxy.errors import BadMessageError
from proxy.fields import (
    CL,
    CONN,
    PLAIN,
    RESPONSE_FIELDS,
    TE,
    UPGRADE,
    clean_trailers,
    connection_tokens,
    drop_named,
    field_kind,
    response_kinds,
)
from proxy.head_cache import HeadCache
from proxy.heads import Fields, ResponseHead, _encode_fields

if TYPE_CHECKING:
    from proxy.exchange import Exchange as HttpExchange

# Interim (1xx, not 101) responses an upstream may send before its final one: more is a
# flood (a server answers 100 once, 103 a few times), and the exchange fails with 502.
MAX_INTERIM_RESPONSES = 8
_NO_BODY_STATUS = frozenset({204, 304})
# Reason phrases are regenerated from the status (RFC 9112 4: clients ignore them).
_REASONS = {s.value: s.phrase.encode() for s in HTTPStatus}


class ResponseSink(Protocol):
    def on_response_head(self, head: ResponseHead) -> None: ...

    def on_informational(self, head: ResponseHead) -> None: ...

    def on_response_body(self, data: bytes) -> None: ...

    def on_response_end(self, trailers: Fields | None) -> None: ...


class _SkipBody(Exception):
    """Raised from a parser callback to stop llhttp after a body-less response head."""


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
        "cache",
        "head_bytes",
        "head_request",
        "in_body",
        "native",
        "sink",
        "upgraded",
    )

    def __init__(self, sink: ResponseSink, cache: HeadCache | None = None) -> None:
        self.sink = sink
        # `sink` when it is a proxy.exchange.Exchange, called directly in the compiled
        # build (set by proxy/upstream.py's bind); None: through ResponseSink.
        self.native: HttpExchange | None = None
        # Heads llhttp already parsed (proxy/head_cache.py); None: llhttp every time.
        self.cache = cache
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
            cache = self.cache
            if cache is None:
                return -1
            template = cache.responses.get(key)
            if template is None:
                if data[:5] == b"HTTP/" and cache.may_fill_response():
                    self._fill = key
                return -1
            cache.response_hits += 1
            end += 4
            self._last_head = data[:end]
            self._last_template = template
            head, length = template
        self._close_delimited = False
        if self.head_request or not length:
            self._to_head(head)
            self._to_end()
            return end
        self.in_body = True
        self._to_head(head)
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

    # The sink's events: the exchange called directly (compiled) when it is one.

    def _to_head(self, head: ResponseHead) -> None:
        native = self.native
        if native is not None:
            native.on_response_head(head)
        else:
            sink = self.sink
            sink.on_response_head(head)

    def _to_body(self, data: bytes) -> None:
        native = self.native
        if native is not None:
            native.on_response_body(data)
        else:
            sink = self.sink
            sink.on_response_body(data)

    def _to_end(self, trailers: Fields | None = None) -> None:
        native = self.native
        if native is not None:
            native.on_response_end(trailers)
        else:
            sink = self.sink
            sink.on_response_end(trailers)

    def _remember(self, head: ResponseHead, key: bytes) -> None:
        status = head.status
        length = head.content_length
        if status < 200 or status == 204 or status == 304 or length is None:
            return
        if not head.keep_alive or self.cache is None:
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
        self.cache.remember_response(key, (shared, length))

    def feed_eof(self) -> bool:
        """The upstream closed: True if that completed a close-delimited response."""
        if self.in_body and self._close_delimited:
            self.in_body = False
            self._head = ResponseHead()
            self._to_end()
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
        kind = response_kinds.get(name)
        if kind is None:
            kind = field_kind(name, response_kinds, RESPONSE_FIELDS)
        head = self._head
        if kind == PLAIN:
            fields = head._fields
            assert fields is not None
            fields.append((name, value))
        elif kind == CL:
            head.content_length = int(value)
        elif kind == TE:
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
        elif kind == UPGRADE:
            head.upgrade = value
        elif kind == CONN:
            if value == b"keep-alive" or value == b"close":
                return  # llhttp has read it; nothing else is named
            # Fields named here are dropped once the head is complete: they may come
            # after Connection as well as before it.
            if self._conn_tokens is None:
                self._conn_tokens = []
            connection_tokens(value, self._conn_tokens)
        # HOP: dropped.

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
            head.headers = drop_named(head.headers, tokens)
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
            self._remember(head, key)
        self.in_body = True
        if self.head_request or status in _NO_BODY_STATUS:
            self._close_delimited = False
            if self.head_request:
                self.in_body = False
                self._head = ResponseHead()
                self._to_head(head)
                self._to_end()
                raise _SkipBody
        else:
            self._close_delimited = not head.chunked and head.content_length is None
        self._to_head(head)

    def on_body(self, body: bytes) -> None:
        self._to_body(body)

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
        self._to_end(clean_trailers(trailers) if trailers else None)

    def __repr__(self) -> str:
        state = "upgraded" if self.upgraded else ("body" if self.in_body else "idle")
        return f"<ResponseCodec {state}{' head-request' if self.head_request else ''}>"
