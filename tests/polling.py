"""Waiting for a condition in tests: poll it, bounded in time, never a fixed sleep.

`until(cond)` calls `cond` (a plain function, or one returning an awaitable) until it
returns something truthy, or exactly `want` when given, and returns that value; after
`timeout` seconds it fails naming `what` and the last value seen. Synchronous tests
(driving processes) use `poll(...)`, the same loop without an event loop, which also
takes an exception from `cond` (a connection refused, say) as "not yet".
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


def poll(cond: Callable[[], Any], timeout: float, what: str, interval: float = 0.02) -> Any:
    """Call `cond` until it returns something truthy; fail after `timeout` seconds. An
    exception from `cond` counts as not yet (the last one is in the failure)."""
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while time.monotonic() < deadline:
        try:
            result = cond()
            if result:
                return result
        except Exception as exc:  # not there yet (connection refused, ...)
            last_exc = exc
        time.sleep(interval)
    raise AssertionError(f"{what}: not within {timeout}s (last error: {last_exc!r})")
