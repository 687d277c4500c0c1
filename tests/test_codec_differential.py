"""The codecs give one result per input: cold (llhttp), warm (head cache), split anywhere.

A fixed corpus (tests/codec_differential.py: seeds, including the inputs of issue 18,
and deterministic mutations of them), every input split at every offset, request and
response codec. `make fuzz` runs the same check coverage-guided for longer.
"""

from __future__ import annotations

import pytest

from tests.codec_differential import corpus, differences, empty_caches, run

CORPUS = corpus()


@pytest.mark.parametrize("start", range(0, len(CORPUS), 20))
def test_cold_warm_and_split_runs_agree(start: int) -> None:
    problems = [p for data in CORPUS[start : start + 20] for p in differences(data)]
    assert problems == []


class _Poisoned(dict[bytes, object]):
    """A head cache that misses once (the cold run), then answers a wrong template."""

    def __init__(self, template: object) -> None:
        super().__init__()
        self.template = template
        self.lookups = 0

    def clear(self) -> None:
        pass

    def get(self, key: bytes, default: object = None) -> object:  # type: ignore[override]
        self.lookups += 1
        return None if self.lookups == 1 else self.template

    def __setitem__(self, key: bytes, value: object) -> None:
        pass


def test_the_differential_check_sees_a_cache_that_disagrees(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The check can fail: a cached template unlike llhttp's parse is found."""
    from proxy import codec

    data = b"GET /d HTTP/1.1\r\nHost: a\r\n\r\n"
    assert differences(data) == []
    empty_caches()
    run(codec.RequestCodec, [data])  # cold: llhttp's parse is cached
    (args, length), *_ = codec._request_heads.values()
    monkeypatch.setattr(codec, "_request_heads", _Poisoned(((args[0], b"POST", *args[2:]), length)))
    assert any("request warm" in p for p in differences(data, every_split=False))
