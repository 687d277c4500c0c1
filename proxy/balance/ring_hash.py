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
_SHIFT = 16
_MASK = (1 << _SHIFT) - 1


class RingHash(Balancer):
    name = "ring_hash"
    uses_context = True

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
        # The ring: sorted ints packing (point << _SHIFT) | slot, where a slot is a small
        # number an endpoint id keeps for as long as it is a member. Sorting plain ints
        # is one pass, and a membership change only filters out the leaving endpoints'
        # entries and merges in the new ones' (timsort merges the two sorted runs in
        # near-linear time), instead of rehashing and resorting the whole ring.
        self._ring: list[int] = []
        self._slots: dict[str, int] = {}  # endpoint id -> slot
        self._counts: dict[str, int] = {}  # endpoint id -> its points on the ring
        self._by_slot: list[Endpoint | None] = []
        self._distinct = 0

    def update(self, endpoints: Sequence[Endpoint]) -> None:
        super().update(endpoints)
        pool = [ep for ep in self.endpoints if ep.weight > 0]
        wanted: dict[str, int] = {}
        if pool:
            lowest = min(ep.weight for ep in pool)
            for ep in pool:
                wanted[ep.id] = max(1, round(self.ring_size * ep.weight / lowest))
            total = sum(wanted.values())
            if total > self.max_ring_size:
                scale = self.max_ring_size / total
                wanted = {k: max(1, int(c * scale)) for k, c in wanted.items()}
        gone = {
            self._slots[k]
            for k, c in self._counts.items()
            if wanted.get(k) != c  # left, or its share changed
        }
        ring = self._ring
        if gone:
            ring = [e for e in ring if e & _MASK not in gone]
            for k in [k for k, slot in self._slots.items() if slot in gone]:
                del self._slots[k], self._counts[k]
        fresh: list[int] = []
        free = sorted(set(range(len(self._slots) + len(wanted))) - set(self._slots.values()))
        for k, count in sorted(wanted.items()):
            if k in self._counts:
                continue
            slot = free.pop(0)
            if slot > _MASK:
                raise PolicyError("endpoints", f"ring hash takes at most {_MASK + 1}")
            self._slots[k], self._counts[k] = slot, count
            fresh.extend((point << _SHIFT) | slot for point in _points(k, count))
        if fresh:
            fresh.sort()
            ring.extend(fresh)
            ring.sort()
        self._ring = ring
        by_slot: list[Endpoint | None] = [None] * (max(self._slots.values(), default=-1) + 1)
        for ep in pool:
            by_slot[self._slots[ep.id]] = ep
        self._by_slot = by_slot
        self._distinct = len(pool)

    def pick(self, ctx: PickContext, now: float, rng: random.Random) -> Endpoint | None:
        ring = self._ring
        n = len(ring)
        if n == 0:
            return None
        h = request_hash(ctx, self.hash_policies)
        if h is None:
            h = rng.getrandbits(64)
        i = bisect_left(ring, h << _SHIFT)
        if i == n:
            i = 0
        by_slot = self._by_slot
        ep = by_slot[ring[i] & _MASK]
        if ep is not None and ep.available(now):
            return ep
        seen = {ring[i] & _MASK}
        for k in range(1, n):
            slot = ring[(i + k) % n] & _MASK
            ep = by_slot[slot]
            if ep is not None and ep.available(now):
                return ep
            seen.add(slot)
            if len(seen) >= self._distinct:
                return None
        return None

    def __repr__(self) -> str:
        return f"<RingHash endpoints={len(self.endpoints)} points={len(self._ring)}>"


def _points(endpoint_id: str, count: int) -> list[int]:
    """An endpoint's `count` ring points: a prefix of one fixed sequence per id."""
    ident = endpoint_id.encode()
    out: list[int] = []
    for block in range((count + 7) // 8):
        digest = hashlib.blake2b(b"%s_%d" % (ident, block), digest_size=64).digest()
        out.extend(_EIGHT.unpack(digest))
    del out[count:]
    return out
