"""Forwarded heads: what the sidecar adds to a request and a response head it relays.

Hop-by-hop fields were already dropped by the codec (proxy/codec.py). A request goes
upstream with `X-Forwarded-For` (the peer appended), `X-Forwarded-Proto` (if absent),
`X-Request-Id` (kept, or generated), `x-tether-peer-identity` (the caller's SPIFFE ID,
at an inbound listener over mTLS; the codec dropped any that arrived), `Via` and its
framing fields; a response goes to
the client with `Via`, its framing for this client (Content-Length, or chunked for an
HTTP/1.1 client when the upstream delimited the body by closing; none for HEAD, 204
and 304) and `Connection` when the client's connection closes or is HTTP/1.0
keep-alive. A cached head (`raw` set) is not rebuilt: its field lines go out as they
arrived, with ours appended, in one join.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from proxy.heads import encode_request_head, encode_response_head

if TYPE_CHECKING:
    from collections.abc import Callable

    from proxy.heads import Fields, RequestHead, ResponseHead
    from proxy.route_result import Peer

_NO_BODY = frozenset({204, 304})
_VIA11 = (b"Via", b"1.1 tether")
_VIA10 = (b"Via", b"1.0 tether")
# What ends a forwarded request head after the X-Request-Id value.
_RID_VIA11_END = b"\r\nVia: 1.1 tether\r\n\r\n"
_RID_VIA10_END = b"\r\nVia: 1.0 tether\r\n\r\n"
_VIA11_END = _RID_VIA11_END[2:]
_VIA10_END = _RID_VIA10_END[2:]
# Response head endings of a cached head (Via, then what the client's connection needs).
_RESP_END = b"Via: 1.1 tether\r\n\r\n"
_RESP_END_CLOSE = b"Via: 1.1 tether\r\nConnection: close\r\n\r\n"
_RESP_END_KEEP10 = b"Via: 1.1 tether\r\nConnection: keep-alive\r\n\r\n"
_STATUS_LINES: dict[int, bytes] = {}


class Forwarder(Protocol):
    """What the request head takes of the listener: its scheme's field, request ids."""

    xfp: tuple[bytes, bytes]
    xfp_line: bytes

    def new_request_id(self) -> bytes: ...


class ResponseMemo:
    """The last cached response head a connection forwarded, its ending and the bytes
    they made: the same head with the same ending is the same bytes (a cached head never
    changes), so a connection repeating a response skips the join."""

    __slots__ = ("data", "end", "rhead")

    def __init__(self) -> None:
        self.rhead: ResponseHead | None = None
        self.end = b""
        self.data = b""


def forwarded_request_head(head: RequestHead, path: bytes, peer: Peer, fwd: Forwarder) -> bytes:
    """The request head as it goes upstream (origin-form `path`); sets `head.request_id`
    when the request had none."""
    raw = head.raw
    ff = head.forwarded_for
    if raw is not None:
        # An X-Request-Id the client sent is among the cached lines already.
        rid = head.request_id
        if rid is None:
            head.request_id = rid = fwd.new_request_id()
            rid_name = b"X-Request-Id: "
            end = _RID_VIA11_END if head.version == "1.1" else _RID_VIA10_END
        else:
            rid = rid_name = b""
            end = _VIA11_END if head.version == "1.1" else _VIA10_END
        return b"".join(
            (
                head.method,
                b" ",
                path,
                b" HTTP/1.1\r\n",
                raw,
                peer.xff_line
                if ff is None
                else b"X-Forwarded-For: " + ff + b", " + peer.address + b"\r\n",
                fwd.xfp_line if head.forwarded_proto is None else b"",
                peer.identity_line,
                rid_name,
                rid,
                end,
            )
        )
    headers = head.headers
    headers.append(peer.xff if ff is None else (b"X-Forwarded-For", ff + b", " + peer.address))
    if head.forwarded_proto is None:
        headers.append(fwd.xfp)
    if peer.identity:
        headers.append((b"x-tether-peer-identity", peer.identity.encode()))
    if head.request_id is None:
        head.request_id = rid = fwd.new_request_id()
        headers.append((b"X-Request-Id", rid))
    headers.append(_VIA11 if head.version == "1.1" else _VIA10)
    if head.chunked:
        headers.append((b"Transfer-Encoding", b"chunked"))
    elif head.content_length is not None:
        headers.append((b"Content-Length", b"%d" % head.content_length))
    if head.upgrade is not None:
        headers.append((b"Connection", b"upgrade"))
        headers.append((b"Upgrade", head.upgrade))
    return encode_request_head(head.method, path, headers)


def cached_response_head(
    rhead: ResponseHead, version: str, keep_alive: bool, memo: ResponseMemo
) -> bytes:
    """A cached response head (Content-Length framing, 2xx-5xx but 204/304) for a client
    speaking HTTP/`version`: its field lines as they arrived, then Via and Connection."""
    if not keep_alive:
        end = _RESP_END_CLOSE
    elif version == "1.0":
        end = _RESP_END_KEEP10
    else:
        end = _RESP_END
    if rhead is memo.rhead and end is memo.end:
        return memo.data
    status = rhead.status
    line = _STATUS_LINES.get(status)
    if line is None:
        line = _STATUS_LINES[status] = b"HTTP/1.1 %d %s\r\n" % (status, rhead.reason)
    assert rhead.raw is not None
    memo.data = data = line + rhead.raw + end
    memo.rhead = rhead
    memo.end = end
    return data


def forwarded_response_head(
    rhead: ResponseHead,
    head: RequestHead,
    keep_alive: bool,
    edit: Callable[[Fields], None] | None,
) -> tuple[bytes, bool, bool]:
    """A response head rebuilt for the client of `head`: (bytes, whether its body is
    re-chunked, whether the client's connection stays open)."""
    status = rhead.status
    headers = rhead.headers
    if edit is not None:
        edit(headers)
    headers.append(_VIA11)
    chunked = False
    if status == 101:
        headers.append((b"Connection", b"upgrade"))
        headers.append((b"Upgrade", rhead.upgrade or head.upgrade or b""))
        return encode_response_head(status, rhead.reason, headers), False, keep_alive
    if status in _NO_BODY or head.method == b"HEAD":
        if rhead.content_length is not None and status != 204:
            headers.append((b"Content-Length", b"%d" % rhead.content_length))
    elif rhead.content_length is not None:
        headers.append((b"Content-Length", b"%d" % rhead.content_length))
    elif head.version == "1.1":
        chunked = True
        headers.append((b"Transfer-Encoding", b"chunked"))
    else:
        # An HTTP/1.0 client cannot read chunked: the body ends with the connection.
        keep_alive = False
    if not keep_alive:
        headers.append((b"Connection", b"close"))
    elif head.version == "1.0":
        headers.append((b"Connection", b"keep-alive"))
    return encode_response_head(status, rhead.reason, headers), chunked, keep_alive
