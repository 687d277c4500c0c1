"""HTTP/1.1 fields as a proxy sees them: which the codecs interpret, which are hop-by-hop.

The codecs (proxy/codec.py, proxy/response_codec.py) look each field name up here once
(`request_kind`, `response_kind`, remembered per spelling so the common names skip
`lower()`): framing, `Host`, `Connection` and what it names, `Upgrade`, `Expect` and
the forwarding fields are interpreted into head attributes; `PLAIN` fields are
end-to-end and kept in order. Trailers lose the fields a sender must not put there.
"""

from __future__ import annotations

from proxy.heads import Fields

# What each interpreted field name means to the codec; anything else is end-to-end.
HOST, CL, TE, CONN, HOP, UPGRADE, EXPECT, XFF, XRID, XFP = range(10)
REQUEST_FIELDS = {
    b"host": HOST,
    b"content-length": CL,
    b"transfer-encoding": TE,
    b"connection": CONN,
    b"keep-alive": HOP,
    b"proxy-connection": HOP,
    b"te": HOP,
    b"upgrade": UPGRADE,
    b"expect": EXPECT,
    b"x-forwarded-for": XFF,
    b"x-request-id": XRID,
    b"x-forwarded-proto": XFP,
    # Only the inbound sidecar says who the caller is (from its certificate): a value
    # arriving from outside is dropped on every listener, as hop-by-hop fields are.
    b"x-tether-peer-identity": HOP,
}
RESPONSE_FIELDS = {
    b"content-length": CL,
    b"transfer-encoding": TE,
    b"connection": CONN,
    b"keep-alive": HOP,
    b"proxy-connection": HOP,
    b"te": HOP,
    b"upgrade": UPGRADE,
}
# Fields a sender must not put in trailers (RFC 9110 6.5.1): framing, routing, auth.
FORBIDDEN_TRAILERS = frozenset(
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
PLAIN = -1
# Field names as they arrive (any case) → kind, so the common names skip `lower()`.
request_kinds: dict[bytes, int] = {}
response_kinds: dict[bytes, int] = {}
MAX_KIND_CACHE = 1024


def field_kind(name: bytes, cache: dict[bytes, int], table: dict[bytes, int]) -> int:
    """The kind of a field name not seen in this spelling yet (and remember it)."""
    kind = table.get(name.lower(), PLAIN)
    if len(cache) < MAX_KIND_CACHE:
        cache[name] = kind
    return kind


def connection_tokens(value: bytes, into: list[bytes]) -> None:
    for token in value.split(b","):
        token = token.strip().lower()
        if token:
            into.append(token)


def drop_named(fields: Fields, tokens: list[bytes]) -> Fields:
    named = {t for t in tokens if t not in (b"close", b"keep-alive", b"upgrade")}
    if not named:
        return fields
    return [f for f in fields if f[0].lower() not in named]


def is_h2c(upgrade: bytes) -> bool:
    return upgrade.strip().lower() == b"h2c"


def clean_trailers(fields: Fields) -> Fields:
    return [f for f in fields if f[0].lower() not in FORBIDDEN_TRAILERS]
