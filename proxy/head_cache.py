"""The head cache: what llhttp made of a head, remembered under the head's exact bytes.

A proxy sees the same heads over and over (one client library's requests, one server's
responses). A codec (proxy/codec.py) given a `HeadCache` looks a head up by all of its
bytes, request or status line and blank line included, and takes it from the cache
only when they equal a head llhttp accepted, so the cache gives exactly llhttp's
result and every refusal still comes from llhttp (tests/test_codec_differential.py
feeds every input cold, warm and split at every offset and requires one result). Only
heads with plain framing are remembered (the codecs decide which).

One cache per listener, made by the listener and handed to its connections and pools
(no module state): each direction holds at most `size` heads. A full direction is
emptied for new heads only once it has earned its keep (as many hits as it holds) or
after many refused fills: heads that never repeat then stop paying for being
remembered.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from proxy.heads import ResponseHead

MAX_HEADS = 512
# A request head as cached: the arguments that rebuild the parsed head (its `raw`
# first), and its body length (-1: none).
RequestTemplate = tuple[tuple[Any, ...], int]
# A request head cached without its X-Request-Id value (proxy/codec.py `_masked_key`).
MaskedRequestTemplate = tuple[tuple[Any, ...], bytes, bytes, int]
# A response head as cached: one shared, unchangeable head and its body length.
ResponseTemplate = tuple["ResponseHead", int]


class HeadCache:
    """Exact head bytes → parsed head, for requests and responses; bounded."""

    __slots__ = (
        "_skips",
        "masked_misses",
        "masked_requests",
        "request_hits",
        "requests",
        "response_hits",
        "responses",
        "size",
    )

    def __init__(self, size: int = MAX_HEADS) -> None:
        self.size = size
        # Read directly by the codecs' fast paths (a dict lookup per head).
        self.requests: dict[bytes, RequestTemplate] = {}
        self.responses: dict[bytes, ResponseTemplate] = {}
        # Request heads under their bytes with the X-Request-Id value left out (requests
        # from another sidecar each carry their own): the template's args without `raw`
        # and request id, the forwarded field lines before and after that field's line,
        # and the body length.
        self.masked_requests: dict[bytes, MaskedRequestTemplate] = {}
        # Exact misses since the last masked hit (the codecs count them; see
        # proxy/codec.py `_find`).
        self.masked_misses = 0
        # Hits since each direction was last emptied (bumped by the codecs), and fills
        # refused since then.
        self.request_hits = 0
        self.response_hits = 0
        self._skips = [0, 0]

    def may_fill_request(self) -> bool:
        """Whether a request head llhttp is about to parse should be remembered."""
        if len(self.requests) < self.size:
            return True
        if self.request_hits >= self.size or self._skips[0] >= 16 * self.size:
            self.requests.clear()
            self.request_hits = self._skips[0] = 0
            return True
        self._skips[0] += 1
        return False

    def may_fill_response(self) -> bool:
        if len(self.responses) < self.size:
            return True
        if self.response_hits >= self.size or self._skips[1] >= 16 * self.size:
            self.responses.clear()
            self.response_hits = self._skips[1] = 0
            return True
        self._skips[1] += 1
        return False

    def remember_request(self, key: bytes, template: RequestTemplate) -> None:
        if len(self.requests) >= self.size:
            self.requests.clear()
        self.requests[key] = template

    def remember_masked_request(self, key: bytes, template: MaskedRequestTemplate) -> None:
        if len(self.masked_requests) >= self.size:
            self.masked_requests.clear()
        self.masked_requests[key] = template

    def remember_response(self, key: bytes, template: ResponseTemplate) -> None:
        if len(self.responses) >= self.size:
            self.responses.clear()
        self.responses[key] = template

    def clear(self) -> None:
        self.requests.clear()
        self.masked_requests.clear()
        self.masked_misses = 0
        self.responses.clear()
        self.request_hits = self.response_hits = 0
        self._skips = [0, 0]

    def __repr__(self) -> str:
        return (
            f"<HeadCache requests={len(self.requests)} responses={len(self.responses)}"
            f" size={self.size}>"
        )
