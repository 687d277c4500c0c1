"""Ring hash (Envoy's RING_HASH, Karger's consistent hashing): a key goes to the next point.

Every endpoint owns `ring_size × weight / lowest weight` points on a 64-bit ring, placed by
hashing its id; a request's hash goes to the first point at or after it (wrapping).
Points depend only on the endpoint's own id and weight ratio, never on how many others
there are, so adding or removing one endpoint moves only the keys it gains or loses
(about 1/N) and a rebuild with the same members maps every key as before. (Envoy's
`minimum_ring_size` sizes the whole ring instead, which re-spreads every endpoint's
points when N changes.) An unavailable endpoint's keys go on to the next available
point's owner, so its keys come back when it does. Ring balance improves as the square
root of the points per endpoint: 1024 keeps each share within a few percent.
"""

from __future__ import annotations

import hashlib
import random
import struct
from bisect import bisect_left
from collections.abc import Sequence

from proxy.balance.base import Balancer, Endpoint, PickContext
from proxy.balance.errors import PolicyError
from proxy.balance.hashing import HashPolicy, request_hash

_EIGHT = struct.Struct("<8Q")


class RingHash(Balancer):
    name = "ring_hash"

    def __init__(
        self,
        hash_policies: Sequence[HashPolicy] = (),
        ring_size: int = 1024,
        max_ring_size: int = 1 << 18,
    ) -> None:
        super().__init__()
        if ring_size < 1:
            raise PolicyError("ring_size", "must be >= 1")
        if max_ring_size < ring_size:
            raise PolicyError("max_ring_size", "must be >= ring_size")
        self.hash_policies = tuple(hash_policies)
        self.ring_size = ring_size
        self.max_ring_size = max_ring_size
        self._points: list[int] = []
        self._owners: list[Endpoint] = []
        self._distinct = 0

    def update(self, endpoints: Sequence[Endpoint]) -> None:
        super().update(endpoints)
        # By id: the ring must not depend on the order discovery lists endpoints in.
        pool = sorted((ep for ep in self.endpoints if ep.weight > 0), key=_by_id)
        if not pool:
            self._points, self._owners, self._distinct = [], [], 0
            return
        lowest = min(ep.weight for ep in pool)
        counts = [max(1, round(self.ring_size * ep.weight / lowest)) for ep in pool]
        total = sum(counts)
        if total > self.max_ring_size:
            scale = self.max_ring_size / total
            counts = [max(1, int(c * scale)) for c in counts]
        # Each entry packs (point, endpoint index) into one int, so sorting is one pass
        # over plain ints; equal points (vanishingly rare) order by endpoint index.
        shift = max(1, len(pool).bit_length())
        ring: list[int] = []
        for index, (ep, count) in enumerate(zip(pool, counts, strict=True)):
            ident = ep.id.encode()
            for block in range((count + 7) // 8):
                digest = hashlib.blake2b(b"%s_%d" % (ident, block), digest_size=64).digest()
                ring.extend(
                    (point << shift) | index for point in _EIGHT.unpack(digest)[: count - block * 8]
                )
        ring.sort()
        mask = (1 << shift) - 1
        self._points = [entry >> shift for entry in ring]
        self._owners = [pool[entry & mask] for entry in ring]
        self._distinct = len(pool)

    def pick(self, ctx: PickContext, now: float, rng: random.Random) -> Endpoint | None:
        points = self._points
        n = len(points)
        if n == 0:
            return None
        h = request_hash(ctx, self.hash_policies)
        if h is None:
            h = rng.getrandbits(64)
        i = bisect_left(points, h)
        if i == n:
            i = 0
        owners = self._owners
        ep = owners[i]
        if ep.available(now):
            return ep
        seen = {id(ep)}
        for k in range(1, n):
            ep = owners[(i + k) % n]
            if ep.available(now):
                return ep
            seen.add(id(ep))
            if len(seen) == self._distinct:
                return None
        return None

    def __repr__(self) -> str:
        return f"<RingHash endpoints={len(self.endpoints)} points={len(self._points)}>"


def _by_id(ep: Endpoint) -> str:
    return ep.id
