"""Maglev (Envoy's MAGLEV, Eisenbud et al., NSDI 2016): a lookup table of prime size.

Each endpoint has a permutation of the table's slots, from two hashes of its id
(offset, skip); endpoints take turns claiming their next free slot, the heavier ones
more often (Envoy's weighted variant), until the table is full. A key goes to the
owner of slot `hash % size`: one modulo and one index per pick, whatever N is, and each
endpoint's share is within a slot of its weight's. Adding or removing one of N endpoints
moves a little over 1/N of the keys when the table is much larger than N (the paper's
guidance: size >= 100 N). The default size is 16381, not Envoy's 65537: building the
table is Python work proportional to its size (5-11 ms against 45-70 ms here, on the event
loop), and 16381 keeps the guidance up to 160 endpoints. A key whose endpoint is
unavailable is rehashed (up to a few times, then a scan), so only that endpoint's keys
move while it is out.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from proxy.balance.base import Balancer, Endpoint, PickContext
from proxy.balance.errors import PolicyError
from proxy.balance.hashing import HashPolicy, hash64, request_hash

_REHASHES = 8
_GOLDEN = 0x9E3779B97F4A7C15  # odd 64-bit constant mixing the rehash attempts apart


def _is_prime(n: int) -> bool:
    if n < 2:
        return False
    if n % 2 == 0:
        return n == 2
    f = 3
    while f * f <= n:
        if n % f == 0:
            return False
        f += 2
    return True


class Maglev(Balancer):
    name = "maglev"
    uses_context = True

    def __init__(self, hash_policies: Sequence[HashPolicy] = (), table_size: int = 16381) -> None:
        super().__init__()
        if not _is_prime(table_size):
            raise PolicyError("table_size", "must be a prime number (for example 16381 or 65537)")
        self.hash_policies = tuple(hash_policies)
        self.table_size = table_size
        self._table: list[Endpoint] = []
        self._slots: list[int] = []  # the table as indices into the pool (sorted by id)
        self._signature: tuple[tuple[str, int], ...] = ()
        self._pool: tuple[Endpoint, ...] = ()

    def update(self, endpoints: Sequence[Endpoint]) -> None:
        super().update(endpoints)
        # By id: the table must not depend on the order discovery lists endpoints in.
        pool = tuple(sorted((ep for ep in self.endpoints if ep.weight > 0), key=_by_id))
        self._pool = pool
        # Discovery re-sends unchanged memberships (every health answer): the table
        # depends only on ids and weights, so it is rebuilt only when those change.
        signature = tuple((ep.id, ep.weight) for ep in pool)
        if signature != self._signature:
            self._slots = self._build(pool) if pool else []
            self._signature = signature
        self._table = [pool[i] for i in self._slots]

    def _build(self, pool: Sequence[Endpoint]) -> list[int]:
        m = self.table_size
        n = len(pool)
        position: list[int] = []
        skip: list[int] = []
        for ep in pool:
            ident = ep.id.encode()
            position.append(hash64(ident) % m)
            skip.append(hash64(ident + b"#skip") % (m - 1) + 1)
        weights = [float(ep.weight) for ep in pool]
        heaviest = max(weights)
        target = [0.0] * n
        table = [-1] * m
        filled = 0
        iteration = 1
        while True:
            for i in range(n):
                # An endpoint of the heaviest weight claims a slot every round; one of a
                # third of it, every third round (Envoy's target-weight bookkeeping).
                if iteration * weights[i] < target[i]:
                    continue
                target[i] += heaviest
                c = position[i]
                step = skip[i]
                while table[c] >= 0:
                    c += step
                    if c >= m:
                        c -= m
                table[c] = i
                position[i] = c + step - m if c + step >= m else c + step
                filled += 1
                if filled == m:
                    return table
            iteration += 1

    def pick(self, ctx: PickContext, now: float, rng: random.Random) -> Endpoint | None:
        table = self._table
        if not table:
            return None
        h = request_hash(ctx, self.hash_policies)
        if h is None:
            h = rng.getrandbits(64)
        m = self.table_size
        ep = table[h % m]
        if ep.available(now):
            return ep
        for attempt in range(1, _REHASHES + 1):
            ep = table[((h + attempt * _GOLDEN) & 0xFFFFFFFFFFFFFFFF) % m]
            if ep.available(now):
                return ep
        candidates = [ep for ep in self._pool if ep.available(now)]
        return candidates[h % len(candidates)] if candidates else None

    def __repr__(self) -> str:
        return f"<Maglev endpoints={len(self.endpoints)} table={self.table_size}>"


def _by_id(ep: Endpoint) -> str:
    return ep.id
