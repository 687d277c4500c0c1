"""Reading an HTTP body (a request's, or an answer the CA asked for) within a size limit
and a deadline, so no peer can make the CA hold unbounded bytes or wait forever."""

from __future__ import annotations

import asyncio

from aiohttp import StreamReader

READ_TIMEOUT = 10.0


class BodyTooLargeError(Exception):
    def __init__(self, limit: int) -> None:
        super().__init__(f"body over {limit} bytes")
        self.limit = limit


async def read_bounded(stream: StreamReader, limit: int, timeout: float = READ_TIMEOUT) -> bytes:
    """The whole body; `BodyTooLargeError` past `limit`, `TimeoutError` past `timeout`."""
    buf = bytearray()
    async with asyncio.timeout(timeout):
        while chunk := await stream.read(65536):
            buf += chunk
            if len(buf) > limit:
                raise BodyTooLargeError(limit)
    return bytes(buf)
