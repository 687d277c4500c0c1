"""Request hashing for the consistent-hash balancers: hash policies and a stable hash.

A request's hash comes from its `PickContext`: `hash_key` when the proxy set one, else
the balancer's hash policies in order (Envoy's and Consul's `HashPolicies`): a header,
a cookie, a query parameter or the source IP. Each policy that finds its value mixes it
into the hash; a `terminal` one that finds its value stops the evaluation. No value at
all means no hash, and the balancer picks at random, as Envoy does.

The hash is 64 bits of BLAKE2b, not Python's `hash()`, which is salted per process: two
sidecars must map a key to the same endpoint.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from urllib.parse import parse_qsl

from proxy.balance.base import PickContext
from wire.resources import HashPolicy

__all__ = ["HashPolicy", "hash64", "policy_value", "request_hash"]
_MASK = (1 << 64) - 1


def policy_value(policy: HashPolicy, ctx: PickContext) -> str | None:
    """The value a hash policy (the schema's `HashPolicy`) finds in a request, or None."""
    field = policy.field
    if field == "source_ip":
        return ctx.source_ip or None
    if field == "query_parameter":
        _, sep, query = ctx.path.partition("?")
        if not sep:
            return None
        for k, v in parse_qsl(query, keep_blank_values=True):
            if k == policy.name:
                return v
        return None
    if ctx.header is None:
        return None
    if field == "header":
        return ctx.header(policy.name)
    return cookie_value(ctx.header("cookie"), policy.name)


def cookie_value(cookie_header: str | None, name: str) -> str | None:
    """The value of cookie `name` in a `Cookie` header (RFC 6265 section 5.4 syntax)."""
    if not cookie_header:
        return None
    for pair in cookie_header.split(";"):
        k, sep, v = pair.partition("=")
        if sep and k.strip() == name:
            v = v.strip()
            if len(v) >= 2 and v[0] == v[-1] == '"':
                v = v[1:-1]
            return v
    return None


def hash64(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


# Hashes of recent short values: a source address, a session cookie or a user header
# repeats from request to request, and BLAKE2b plus its conversions were most of a hashed
# pick's cost. Bounded by count and by value length, and cleared whole when full.
_RECENT: dict[str, int] = {}
_RECENT_MAX = 4096
_RECENT_LONGEST = 256


def value_hash(value: str) -> int:
    """hash64 of a hash policy's value (UTF-8), remembered for recent short values."""
    h = _RECENT.get(value)
    if h is None:
        h = hash64(value.encode("utf-8", "surrogateescape"))
        if len(value) <= _RECENT_LONGEST:
            if len(_RECENT) >= _RECENT_MAX:
                _RECENT.clear()
            _RECENT[value] = h
    return h


def request_hash(ctx: PickContext, policies: Sequence[HashPolicy]) -> int | None:
    """The request's 64-bit hash, or None when nothing to hash on is present."""
    if ctx.hash_key is not None:
        return hash64(ctx.hash_key)
    result: int | None = None
    for policy in policies:
        value = policy_value(policy, ctx)
        if value is None:
            continue
        h = value_hash(value)
        # Envoy combines several policies' hashes by rotate-left-1 then xor.
        result = h if result is None else (((result << 1) | (result >> 63)) & _MASK) ^ h
        if policy.terminal:
            break
    return result
