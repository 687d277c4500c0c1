"""Wake-ups for blocking queries, scoped to the resources each query reads.

A waiter names exact resources ("service:orders") and/or prefixes ("kv:app/"); a
commit wakes only the waiters of what it touched, so 5,000 watchers of other services
cost a change nothing.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Sequence


class WatchHub:
    def __init__(self) -> None:
        self._exact: dict[str, set[asyncio.Future[None]]] = {}
        self._prefix: dict[str, set[asyncio.Future[None]]] = {}
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def waiting(self) -> int:
        """Distinct waiters (a waiter on several resources counts once)."""
        futs: set[asyncio.Future[None]] = set()
        for group in (self._exact, self._prefix):
            for s in group.values():
                futs.update(s)
        return len(futs)

    async def wait(
        self,
        resources: Sequence[str],
        timeout: float,
        prefixes: Sequence[str] = (),
    ) -> bool:
        """Wait until one of `resources` or `prefixes` is touched; False on timeout."""
        if self._closed or timeout <= 0:
            return False
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        for r in resources:
            self._exact.setdefault(r, set()).add(fut)
        for p in prefixes:
            self._prefix.setdefault(p, set()).add(fut)
        try:
            await asyncio.wait_for(asyncio.shield(fut), timeout)
            return True
        except TimeoutError:
            return False
        finally:
            self._remove(fut, resources, self._exact)
            self._remove(fut, prefixes, self._prefix)

    @staticmethod
    def _remove(
        fut: asyncio.Future[None],
        names: Iterable[str],
        group: dict[str, set[asyncio.Future[None]]],
    ) -> None:
        for n in names:
            s = group.get(n)
            if s is not None:
                s.discard(fut)
                if not s:
                    del group[n]

    def notify(self, touched: Iterable[str]) -> None:
        woken: list[asyncio.Future[None]] = []
        prefixes = self._prefix
        for res in touched:
            s = self._exact.get(res)
            if s:
                woken.extend(s)
            if not prefixes:
                continue
            if len(prefixes) <= len(res):
                for p, ps in prefixes.items():
                    if res.startswith(p):
                        woken.extend(ps)
            else:
                # Many prefix watchers: look up each prefix of `res` instead.
                for i in range(len(res) + 1):
                    found = prefixes.get(res[:i])
                    if found:
                        woken.extend(found)
        for fut in woken:
            if not fut.done():
                fut.set_result(None)

    def close(self) -> None:
        """Release every waiter (server shutdown)."""
        self._closed = True
        self.notify(list(self._exact))
        for ps in self._prefix.values():
            for fut in ps:
                if not fut.done():
                    fut.set_result(None)
