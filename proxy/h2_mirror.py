"""Mirroring for HTTP/2 streams: the copy of a stream goes to the shadow as a stream.

A route's `mirror` (proxy/mirror.py) applies to HTTP/2 streams as to HTTP/1 requests,
with the same sender, so the same bounds and counters: the copy is made when the
stream is routed and the rule's draw hit (`MirrorTap`), filled as the request body
streams (abandoned past the rule's `maxBody`, counted `too_large`), and sent when the
request ended. It goes as an HTTP/2 stream on the HTTP/2 pool of a shadow endpoint
(h2c, or mTLS with ALPN `h2` as the stream's own hops), because a gRPC shadow speaks
nothing else: `:authority` with the `-shadow` suffix, `x-tether-mirror: 1`, the body in
one go. Fire and forget: the caller's stream never waits for it; the shadow's response
is read and dropped (its window given back), and a copy still open after the sender's
timeout is reset (counted `failed`). Copies in flight, HTTP/1 and HTTP/2 together, are
bounded by the sender's `max_in_flight` (beyond: `busy`).
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from h2.errors import ErrorCodes

from proxy.h2_link import Fields, flush_touched
from proxy.h2_pool import H2PoolOverflowError
from proxy.mirror import shadow_host
from proxy.pool import PoolPolicy

if TYPE_CHECKING:
    from proxy.h2_downstream import H2Front
    from proxy.h2_exchange import H2Exchange
    from proxy.h2_upstream import H2UpstreamConnection
    from proxy.mirror import MirrorSender, MirrorTap
    from proxy.route_filters import Mirror

# Fields the copy does not carry on (its framing is its own; `host` is :authority).
_DROP = frozenset({b"host", b"content-length", b"x-tether-mirror"})
_POLICY = PoolPolicy()


def h2_copy(ex: H2Exchange, tap: MirrorTap) -> H2MirrorCopy | None:
    """The copy of the stream `ex` (routed with `tap`), with its body so far; None
    when it cannot be mirrored (counted), or was sent already (the request ended)."""
    head = ex.head
    route = ex.route
    path = route.path if route is not None and route.path is not None else head.target
    host = head.host or tap.mirror.service.encode()
    headers: Fields = [
        (b":method", head.method),
        (b":scheme", b"http"),
        (b":authority", shadow_host(host)),
        (b":path", path),
    ]
    headers += [(n.lower(), v) for n, v in head.headers if n.lower() not in _DROP]
    headers.append((b"x-tether-mirror", b"1"))
    copy: H2MirrorCopy | None = H2MirrorCopy(ex.conn.front, tap.sender, tap.mirror, headers)
    for piece in ex.body:
        if copy is not None:
            copy = copy.feed(piece)
    if copy is not None and ex.req_done:
        copy.send()
        return None
    return copy


class H2MirrorCopy:
    """One stream's copy: filled, then sent on a shadow's HTTP/2 pool, its answer dropped."""

    __slots__ = (
        "body",
        "front",
        "headers",
        "mirror",
        "pool",
        "sender",
        "sid",
        "size",
        "timer",
        "up",
    )

    def __init__(
        self, front: H2Front, sender: MirrorSender, mirror: Mirror, headers: Fields
    ) -> None:
        self.front = front
        self.sender = sender
        self.mirror = mirror
        self.headers = headers
        self.body: list[bytes] = []
        self.size = 0
        self.pool: Any = None
        self.up: H2UpstreamConnection | None = None
        self.sid = 0
        self.timer: asyncio.TimerHandle | None = None

    def feed(self, data: bytes) -> H2MirrorCopy | None:
        """Keep a body piece; None (the copy abandoned, counted) past the limit."""
        self.size += len(data)
        if self.size > self.mirror.max_body:
            self.sender.counts["too_large"] += 1
            return None
        self.body.append(data)
        return self

    def send(self) -> None:
        sender = self.sender
        if len(sender.tasks) + len(sender.streams) >= sender.max_in_flight:
            sender.counts["busy"] += 1
            return
        target = sender.pick(self.mirror)
        if target is None:
            sender.counts["no_endpoint"] += 1
            return
        ep, tls = target
        self.pool = pool = self.front.shadow_pool(ep.host, ep.port, tls, _POLICY)
        sender.streams.add(self)
        self.timer = asyncio.get_running_loop().call_later(sender.timeout, self._timeout)
        try:
            up = pool.acquire(self)
        except H2PoolOverflowError:
            self._done("busy")
            return
        if up is not None:
            self.on_h2_ready(up)

    # -- the pool's answers ---------------------------------------------------------------

    def on_h2_ready(self, up: H2UpstreamConnection) -> None:
        if self not in self.sender.streams:
            return
        self.up = up
        body = self.body
        self.sid = sid = up.open_stream(self, self.headers, not body)
        for i, chunk in enumerate(body):
            up.send_data(sid, chunk, i == len(body) - 1)
        self.body = []
        up.flush()

    def on_h2_failed(self, reason: str, message: str) -> None:
        self._done("failed")

    # -- the shadow's answer (read and dropped) ------------------------------------------

    def on_headers(self, headers: Fields, end: bool) -> None:
        if end:
            self._done("sent")

    def on_data(self, data: bytes, end: bool) -> None:
        up = self.up
        if end:
            self._done("sent")
        elif up is not None:
            up.open_window(self.sid, len(data))
            up.touch()

    def on_trailers(self, headers: Fields) -> None:
        self._done("sent")

    def on_end(self) -> None:
        pass

    def on_reset(self, code: int, message: str) -> None:
        self.up = None
        self._done("failed")

    def on_sent(self, size: int) -> None:
        pass

    def _timeout(self) -> None:
        self.timer = None
        up = self.up
        if up is not None:
            self.up = None
            up.reset(self.sid, ErrorCodes.CANCEL)
            up.touch()
        elif self.pool is not None:
            self.pool.cancel(self)
        self._done("failed")
        flush_touched()

    def _done(self, count: str) -> None:
        sender = self.sender
        if self not in sender.streams:
            return
        sender.streams.discard(self)
        sender.counts[count] += 1
        timer = self.timer
        if timer is not None:
            self.timer = None
            timer.cancel()
        up = self.up
        if up is not None:
            self.up = None
            sid = self.sid
            up.finished_receiving(sid)
            up.reset(sid, ErrorCodes.NO_ERROR)  # if our side is still open
            up.touch()
