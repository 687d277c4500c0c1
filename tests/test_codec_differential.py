"""The codecs give one result per input: cold (llhttp), warm (head cache), split anywhere.

A fixed corpus (tests/codec_differential.py: seeds, including the inputs of issue 18,
and deterministic mutations of them), every input split at every offset, request and
response codec. `make fuzz` runs the same check coverage-guided for longer.
"""

from __future__ import annotations

import pytest

from proxy.codec import RequestCodec
from proxy.head_cache import HeadCache
from tests.codec_differential import _Events, corpus, differences, run
from tests.test_proxy_codec import MALFORMED

CORPUS = corpus()


@pytest.mark.parametrize("start", range(0, len(CORPUS), 20))
def test_cold_warm_and_split_runs_agree(start: int) -> None:
    problems = [p for data in CORPUS[start : start + 20] for p in differences(data)]
    assert problems == []


class _Poisoned(dict[bytes, object]):
    """A head cache that remembers a wrong template for what llhttp parsed (the cold
    run), and answers it from then on. (Only `__setitem__` is overridden: the compiled
    build reads a dict subclass with dict's own lookup.)"""

    def __init__(self, template: object) -> None:
        super().__init__()
        self.template = template

    def clear(self) -> None:
        pass

    def __setitem__(self, key: bytes, value: object) -> None:
        super().__setitem__(key, self.template)


def test_the_differential_check_sees_a_cache_that_disagrees() -> None:
    """The check can fail: a cached template unlike llhttp's parse is found."""
    data = b"GET /d HTTP/1.1\r\nHost: a\r\n\r\n"
    assert differences(data) == []
    cache = HeadCache()
    run(lambda sink: RequestCodec(sink, cache), [data])  # cold: llhttp's parse is cached
    (args, length), *_ = cache.requests.values()

    def poisoned() -> HeadCache:
        bad = HeadCache()
        bad.requests = _Poisoned(((args[0], b"POST", *args[2:]), length))
        return bad

    assert any(
        "request warm" in p for p in differences(data, every_split=False, new_cache=poisoned)
    )


def test_the_differential_check_sees_a_masked_template_that_disagrees() -> None:
    """The check covers the masked lookup too: a head cached without its X-Request-Id
    value that answers with the wrong method is found by the "another id" runs."""
    data = b"GET /d HTTP/1.1\r\nHost: a\r\nX-Request-Id: r-1\r\n\r\n"
    assert differences(data) == []
    cache = HeadCache()
    run(lambda sink: RequestCodec(sink, cache), [data])
    ((args, pre, post, length),) = cache.masked_requests.values()
    assert pre + b"X-Request-Id: r-1\r\n" + post == cache.requests[data][0][0]

    def poisoned() -> HeadCache:
        bad = HeadCache()
        bad.masked_requests = _Poisoned(((args[0], b"POST", *args[2:]), pre, post, length))
        return bad

    problems = differences(data, every_split=False, new_cache=poisoned)
    assert problems and all("another id" in p for p in problems)


def _warm_cache() -> HeadCache:
    """A cache holding every cacheable request head of tests/test_proxy_codec.py."""
    from tests.test_proxy_codec import CACHEABLE_REQUESTS

    cache = HeadCache()
    for data in CACHEABLE_REQUESTS:
        run(lambda sink: RequestCodec(sink, cache), [data])
    assert cache.requests
    return cache


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_every_malformed_request_is_refused_alike_with_the_cache_warm(name: str) -> None:
    data, _status = MALFORMED[name]
    assert differences(data, every_split=len(data) < 300, new_cache=_warm_cache) == []


def test_a_head_from_another_sidecar_is_taken_from_the_cache_with_its_own_request_id() -> None:
    """Only the X-Request-Id value differs between requests a sidecar forwards: the
    second head is a cache hit that carries its own id, in the forwarded lines too; a
    value llhttp should see (a space, an obs-fold, a control, too long) is not."""
    head = b"GET /api HTTP/1.1\r\nHost: svc\r\nX-Request-Id: %s\r\nVia: 1.1 tether\r\n\r\n"
    cache = HeadCache()
    run(lambda sink: RequestCodec(sink, cache), [head % b"first"])
    assert cache.request_hits == 0 and len(cache.masked_requests) == 1
    events, _, _ = run(lambda sink: RequestCodec(sink, cache), [head % b"second-0123"])
    assert cache.request_hits == 1
    assert events[0][14] == b"second-0123"
    assert (b"X-Request-Id", b"second-0123") in events[0][6]
    # The same connection's next heads (its memo of the last masked head), one by one.
    codec_hits = cache.request_hits
    rec = _Events()
    codec = RequestCodec(rec, cache)
    for rid in (b"third", b"4th", b"fifth-5", b"6"):
        codec.feed(head % rid)
    assert [e[14] for e in rec.events if e[0] == "head"] == [b"third", b"4th", b"fifth-5", b"6"]
    assert cache.request_hits == codec_hits + 4
    assert codec._last_masked is not None
    for value in (b"a b", b"x\x01", b"r" * 129, b"1\r\n 2"):
        hits = cache.request_hits
        events, _, _ = run(lambda sink: RequestCodec(sink, cache), [head % value])
        assert cache.request_hits == hits, value


def test_heads_that_never_come_back_stop_paying_for_the_masked_lookup() -> None:
    """After 64 exact misses in a row without a masked hit (every head its own path),
    only one head in 64 is tried (and remembered) without its X-Request-Id value; the
    first masked hit opens the lookup again."""
    cache = HeadCache()
    codec = RequestCodec(_Events(), cache)
    unique = b"GET /u/%d HTTP/1.1\r\nHost: a\r\nX-Request-Id: r%d\r\n\r\n"
    for i in range(65):
        codec.feed(unique % (i, i))
    assert cache.masked_misses == 65 and cache.request_hits == 0
    shape = b"GET /same HTTP/1.1\r\nHost: a\r\nX-Request-Id: %s\r\n\r\n"
    codec.feed(shape % b"a1")  # the 66th miss: not tried, not remembered masked
    assert len(cache.masked_requests) == 65
    tries = 0
    while cache.request_hits == 0:  # tried and remembered at the 128th, a hit at the 192nd
        tries += 1
        assert tries <= 2 * 64
        codec.feed(shape % b"b%d" % tries)
    assert len(cache.masked_requests) == 66
    assert cache.masked_misses == 0
    codec.feed(shape % b"next")
    assert cache.request_hits == 2
