"""Parsed HTTP/1.1 heads (`RequestHead`, `ResponseHead`) and head and chunk serialisation.

The codecs (proxy/codec.py) make these heads; the exchange and the routers read and
edit them; `encode_*` turn them back into bytes. `headers` holds the end-to-end fields
in arrival order (original case); hop-by-hop fields and framing are attributes. A head
taken from the head cache (proxy/head_cache.py) carries `raw`, its field lines as they
are forwarded, and builds `headers` only when something reads it.
"""

from __future__ import annotations

from typing import Any, Final

Fields = list[tuple[bytes, bytes]]


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


# RequestHead's attributes (a compiled class has no `__slots__` to read them from).
REQUEST_HEAD_SLOTS: Final = (
    "_fields",
    "_host_index",
    "b3",
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
    "traceparent",
    "upgrade",
    "version",
)


class RequestHead:
    """A parsed request head; `headers` are the end-to-end fields only.

    Slots, no `__getattr__`: attribute reads on the hot path stay on CPython's fast path.
    A cached head carries `raw`, its field lines as forwarded (Content-Length included;
    hop-by-hop fields and X-Forwarded-For left out), and builds `headers` on first access.
    """

    __slots__ = REQUEST_HEAD_SLOTS

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
        # Trace context the codec saw (the first traceparent; any B3 field), so tracing
        # needs no pass over the fields. A cached head (`raw`) is searched as bytes.
        self.traceparent: bytes | None = None
        self.b3 = False

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


try:
    # Interpreted, the call then only allocates. A compiled class refuses (TypeError) and
    # keeps its native `__init__`, which costs no frame.
    setattr(_CachedRequestHead, "__init__", object.__init__)  # noqa: B010
except (TypeError, AttributeError):
    pass


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
    head.traceparent = None
    head.b3 = False
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
