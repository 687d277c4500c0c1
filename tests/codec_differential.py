"""Differential check of the codecs: one input fed cold, warm and split gives one result.

`differences(data)` feeds `data` to a RequestCodec with an empty head cache (cold:
llhttp parses everything), again (warm: heads llhttp accepted are now cached), then
split in two at every offset (warm, so a cached head may meet a split), and does the
same with a ResponseCodec. Every run must give the same outcome: the heads as a sink
sees them (every attribute a proxy reads), the body bytes, trailers and ends, the bytes
after a protocol switch, and, if the input is refused, the refusal's status. Only
`BadMessageError` may escape a codec; anything else fails the check.

tests/test_codec_differential.py runs it on a fixed corpus in `make test`;
tests/fuzz_codec.py runs it under atheris (coverage-guided) in `make fuzz`.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

from proxy.codec import RequestCodec
from proxy.errors import BadMessageError
from proxy.head_cache import HeadCache
from proxy.heads import RequestHead, ResponseHead
from proxy.response_codec import ResponseCodec
from tests.test_proxy_codec import Recorder

Outcome = tuple[Any, ...]


class _Events(Recorder):
    """A sink for both codecs recording every attribute of a head a proxy reads."""

    def on_request_head(self, head: RequestHead) -> None:
        self.events.append(
            (
                "head",
                head.method,
                head.target,
                head.version,
                head.keep_alive,
                head.host,
                list(head.headers),
                head.host_index,
                head.content_length,
                head.chunked,
                head.upgrade,
                head.expect_continue,
                head.forwarded_for,
                head.forwarded_proto,
                head.request_id,
            )
        )

    def on_response_head(self, head: ResponseHead) -> None:
        self.events.append(
            (
                "head",
                head.status,
                head.reason,
                head.version,
                head.keep_alive,
                list(head.headers),
                head.content_length,
                head.chunked,
                head.upgrade,
            )
        )

    def on_informational(self, head: ResponseHead) -> None:
        self.events.append(("1xx", head.status, list(head.headers)))


def run(make: Any, pieces: list[bytes]) -> Outcome:
    sink = _Events()
    parser = make(sink)
    rest: bytes | None = None
    try:
        for piece in pieces:
            if rest is not None:
                rest += piece
                continue
            rest = parser.feed(piece)
    except BadMessageError as e:
        return (sink.events, "refused", e.status)
    return (sink.events, "rest", rest)


def differences(
    data: bytes, *, every_split: bool = True, new_cache: Callable[[], HeadCache] = HeadCache
) -> list[str]:
    """How the runs of `data` disagree (empty: they all agree). Each codec kind gets an
    empty cache (`new_cache()`) for its cold run, warm for the others."""
    problems: list[str] = []
    for name, codec in (("request", RequestCodec), ("response", ResponseCodec)):
        cache = new_cache()

        def make(sink: _Events, codec: Any = codec, cache: HeadCache = cache) -> Any:
            return codec(sink, cache)

        cold = run(make, [data])
        runs = [("warm", [data]), ("warm again", [data])]
        offsets = range(1, len(data)) if every_split else ()
        runs += [(f"split at {i}", [data[:i], data[i:]]) for i in offsets]
        for label, pieces in runs:
            got = run(make, pieces)
            if got != cold:
                problems.append(f"{name} {label}: {got!r} != cold {cold!r}")
        other = other_request_id(data)
        if other is not None and codec is RequestCodec:
            # A cache warmed by the same head with another X-Request-Id value (the head
            # a request from another sidecar brings): taken masked, or by llhttp.
            for label, pieces in [("warm, another id", [data])] + [
                (f"warm, another id, split at {i}", [data[:i], data[i:]]) for i in offsets
            ]:
                masked = new_cache()
                run(lambda sink, c=masked: RequestCodec(sink, c), [other])
                got = run(lambda sink, c=masked: RequestCodec(sink, c), pieces)
                if got != cold:
                    problems.append(f"{name} {label}: {got!r} != cold {cold!r}")
    return problems


def other_request_id(data: bytes) -> bytes | None:
    """`data` with its first X-Request-Id value (as cased by sidecars or all lowercase)
    replaced by another one, or None without such a field line."""
    for name in (b"\r\nX-Request-Id: ", b"\r\nx-request-id: "):
        p = data.find(name)
        if p >= 0:
            start = p + len(name)
            stop = data.find(b"\r\n", start)
            if stop < 0:
                return None
            return data[:start] + b"0ther-id-" + data[start:stop][::-1] + data[stop:]
    return None


# -- a fixed corpus: seeds, and deterministic mutations of them ---------------------------

SEEDS = [
    b"GET /a HTTP/1.1\r\nHost: beta\r\nX-Request-Id: 1\r\n\r\n",
    b"GET /a HTTP/1.1\r\nHost: beta\r\nX-Request-Id: 1\r\n\r\n"
    b"HTTP/1.1\r\nHost: beta\r\nX-Request-Id: 1\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: svc\r\nUser-Agent: bench\r\nAccept: */*\r\n\r\n"
    b"GET / HTTP/1.1\r\nHost: svc\r\nUser-Agent: bench\r\nAccept: */*\r\n\r\n",
    b"POST /p?q=1 HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nX-A: b \t\r\n\r\nhello"
    b"GET /n HTTP/1.1\r\nHost: a\r\n\r\n",
    b"POST /c HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n"
    b"X-T: 1\r\n\r\n",
    b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\nGET / HTTP/1.0\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, X-S\r\nX-S: s\r\nX-T: t\r\n\r\n",
    b"GET http://svc:8080/x HTTP/1.1\r\nHost: o\r\nX-Forwarded-For: 10.0.0.1\r\n"
    b"X-Forwarded-Proto: https\r\nTE: trailers\r\n\r\n",
    b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\nraw",
    b"POST /h HTTP/1.1\r\nHost: a\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
    b"HTTP2-Settings: AA\r\nContent-Length: 2\r\n\r\nhiGET / HTTP/1.1\r\nHost: a\r\n\r\n",
    b"PUT /e HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\nx",
    b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\ntls",
    b"HTTP/1.1 200 OK\r\nServer: s\r\nContent-Length: 2\r\nX-V: v  \r\n\r\nok"
    b"HTTP/1.1 200 OK\r\nServer: s\r\nContent-Length: 2\r\nX-V: v  \r\n\r\nok",
    b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </s>\r\n\r\n"
    b"HTTP/1.1 204 No Content\r\nX-A: 1\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nX-Secret: s\r\nConnection: X-Secret\r\nTransfer-Encoding: chunked\r\n"
    b"\r\n2\r\nok\r\n0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\nabc",
    b"HTTP/1.0 200 OK\r\n\r\nclose-delimited",
    # Found by `make fuzz`: bytes after a response without keep-alive (llhttp refuses
    # them; a cached head must not take them).
    b"HTTP/1.0 200 OK\r\nServer: s\r\nContent-Length: 2\r\n\r\nok"
    b"HTTP/1.1 200 O\x13\x13V: v  \r\n\r\nok",
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\nws",
    # Heads that differ from a cached one in their X-Request-Id value only (a request
    # another sidecar forwarded), and the values the masked lookup must leave to llhttp.
    b"GET /api/items HTTP/1.1\r\nHost: svc\r\nUser-Agent: bench\r\nX-Forwarded-For: 127.0.0.1"
    b"\r\nX-Forwarded-Proto: http\r\nX-Request-Id: 4d2a96c1e0b34f6f\r\nVia: 1.1 tether\r\n\r\n"
    b"GET /api/items HTTP/1.1\r\nHost: svc\r\nUser-Agent: bench\r\nX-Forwarded-For: 127.0.0.1"
    b"\r\nX-Forwarded-Proto: http\r\nX-Request-Id: 77aa96c1e0b34f6f\r\nVia: 1.1 tether\r\n\r\n",
    b"GET /m HTTP/1.1\r\nHost: a\r\nX-Request-Id: 1a\r\nVia: t\r\n\r\n"
    b"GET /m HTTP/1.1\r\nHost: a\r\nX-Request-Id: 2b\r\nVia: t\r\n\r\n"
    b"GET /m HTTP/1.1\r\nHost: a\r\nX-Request-Id: 3c\r\nVia: t\r\n\r\n"
    b"GET /m HTTP/1.1\r\nHost: a\r\nX-Request-Id: 4-d\r\nVia: t\r\n\r\n",
    b"POST /o HTTP/1.1\r\nx-request-id: a-1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc",
    b"GET / HTTP/1.1\r\nHost: a\r\nX-Request-Id: 1\r\nX-Request-Id: 2\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nX-Request-Id: 1\r\nx-request-id: 1\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nX-Request-Id: 1 \r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nX-Request-Id: 1\r\n 2\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nX-Request-Id: a b\x7f\x80\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nX-Request-Id: " + b"r" * 129 + b"\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nConnection: X-Request-Id\r\nX-Request-Id: 9\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nX-Request-Id: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"1\r\nz\r\n0\r\n\r\n",
]

# Bytes a mutation inserts: framing, whitespace, separators, controls.
_TOKENS = [
    b"\r\n", b"\n", b"\r", b" ", b"\t", b":", b"\x00", b"\x7f", b"/", b"HTTP/1.1",
    b"\r\n\r\n", b"GET", b"Host: b\r\n", b"Content-Length: 1\r\n", b"0", b"\xff",
]  # fmt: skip


def mutate(data: bytes, rng: random.Random) -> bytes:
    """One random edit: delete, insert, duplicate or swap a span."""
    n = len(data)
    i = rng.randrange(n + 1)
    j = min(n, i + rng.randrange(1, 12))
    op = rng.randrange(4)
    if op == 0:
        return data[:i] + data[j:]
    if op == 1:
        return data[:i] + rng.choice(_TOKENS) + data[i:]
    if op == 2:
        return data[:j] + data[i:j] + data[j:]
    k = rng.randrange(n + 1)
    return data[:i] + data[k : k + (j - i)] + data[j:]


def corpus(mutants: int = 6, seed: int = 18) -> list[bytes]:
    """The seeds, each with `mutants` deterministic mutations (one to three edits)."""
    rng = random.Random(seed)
    out = list(SEEDS)
    for s in SEEDS:
        for _ in range(mutants):
            m = s
            for _ in range(rng.randrange(1, 4)):
                m = mutate(m, rng)
            out.append(m)
    return out
