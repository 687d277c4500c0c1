"""Waiting for a condition in tests: poll it, bounded in time, never a fixed sleep.

`until(cond)` calls `cond` (a plain function, or one returning an awaitable) until it
returns something truthy, or exactly `want` when given, and returns that value; after
`timeout` seconds it fails naming `what` and the last value seen. Synchronous tests
(driving processes) use `asyncio.run(until(...))`.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Callable
from typing import Any

_TRUTHY: Any = object()


async def until(
    cond: Callable[[], Any],
    timeout: float = 10.0,
    what: str = "condition",
    *,
    want: Any = _TRUTHY,
    interval: float = 0.02,
) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = cond()
        if inspect.isawaitable(got):
            got = await got
        if (got == want) if want is not _TRUTHY else got:
            return got
        if time.monotonic() >= deadline:
            expected = "" if want is _TRUTHY else f", wanted {want!r}"
            raise AssertionError(f"{what}: not within {timeout}s (last: {got!r}{expected})")
        await asyncio.sleep(interval)
