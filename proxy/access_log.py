"""The access log: one JSON line per request, written off the hot path.

At the exchange's end (`ListenerAccessLog.record`) the request's values are appended as a
tuple to a bounded in-memory list: no formatting, no I/O, never a wait. A timer on the
loop hands the list to a writer thread every `interval` seconds; the thread formats the
lines and writes them to the file (or standard output) and flushes. When the list is
full, or the writer is more than `MAX_BATCHES` batches behind (a slow disk, a reader of
standard output that stopped reading), lines are dropped and counted
(`tether_access_log_dropped_total`), never waited for. `aclose` writes what is left.

Filters, applied before anything is kept: status classes (`2xx`, `4xx`, `5xx`, ...,
and `none` for a request that ended without a status) and a sampling ratio.

A line (keys always present, `null` when unknown; docs/observability.md):
`time` (RFC 3339, when the request head arrived), `trace_id`, `request_id`, `listener`,
`source`, `destination`, `subset`, `route`, `method`, `authority`, `path` (without the
query), `protocol`, `status`, `reason` (the local-reply reason, "" for a relayed
response), `outcome`, `duration_ms`, `upstream` (host:port of the endpoint), `attempts`,
`bytes_in` and `bytes_out` (body bytes received from the client and sent to it).
"""

from __future__ import annotations

import asyncio
import json
import os
import queue
import random
import sys
import threading
import time
from datetime import UTC, datetime
from typing import IO, TYPE_CHECKING, Any, Final

from proxy.stats import split_destination
from proxy.trace_context import find_parent, path_of

if TYPE_CHECKING:
    from proxy.exchange import Exchange
    from proxy.h2_exchange import H2Exchange

STATUS_CLASSES: Final = ("none", "1xx", "2xx", "3xx", "4xx", "5xx")
MAX_PENDING: Final = 20_000  # lines kept between two flushes
MAX_BATCHES: Final = 8  # batches the writer may be behind before new ones are dropped


def parse_status_classes(text: str) -> frozenset[int]:
    """`4xx,5xx` -> {4, 5} (`none` is 0); an unknown class raises ValueError."""
    out: set[int] = set()
    for word in text.split(","):
        w = word.strip().lower()
        if not w:
            continue
        if w not in STATUS_CLASSES:
            raise ValueError(
                f"--access-log-status: {w!r} is not one of {', '.join(STATUS_CLASSES)}"
            )
        out.add(STATUS_CLASSES.index(w))
    return frozenset(out)


class AccessLog:
    """One sidecar's access log: the pending lines, the timer and the writer thread."""

    def __init__(
        self,
        path: str,
        *,
        source: str = "",
        sample: float = 1.0,
        statuses: frozenset[int] = frozenset(),
        interval: float = 1.0,
        max_pending: int = MAX_PENDING,
        rng: random.Random | None = None,
    ) -> None:
        if not 0.0 <= sample <= 1.0:
            raise ValueError(f"--access-log-sample: {sample} is not within 0..1")
        self.path = path
        self.source = source
        self.sample = sample
        self.statuses = statuses  # empty: every class
        self.interval = interval
        self.max_pending = max_pending
        self.rng = rng if rng is not None else random.Random()
        self.pending: list[tuple[Any, ...]] = []
        self.written = 0  # lines written (by the writer thread)
        self.dropped = 0  # lines dropped (list full, writer behind)
        self.write_errors = 0
        self._queue: queue.SimpleQueue[list[tuple[Any, ...]] | None] = queue.SimpleQueue()
        self._behind = 0  # batches handed over and not yet written
        self._lock = threading.Lock()
        self._timer: asyncio.TimerHandle | None = None
        self._thread: threading.Thread | None = None
        self._file: IO[bytes] | None = None

    def for_listener(self, listener: str) -> ListenerAccessLog:
        return ListenerAccessLog(self, listener)

    def start(self) -> None:
        """Open the file (append) and start the writer thread and the flush timer."""
        if self.path == "-":
            self._file = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
        else:
            self._file = open(self.path, "ab")  # noqa: SIM115 (closed by aclose)
        self._thread = threading.Thread(target=self._write_loop, name="access-log", daemon=True)
        self._thread.start()
        self._schedule()

    def _schedule(self) -> None:
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(self.interval, self._tick)

    def _tick(self) -> None:
        self.flush()
        self._schedule()

    def flush(self) -> None:
        """Hand what is pending to the writer (on the loop: a swap and a put)."""
        batch = self.pending
        if not batch:
            return
        self.pending = []
        with self._lock:
            behind = self._behind
            if behind >= MAX_BATCHES:
                self.dropped += len(batch)
                return
            self._behind = behind + 1
        self._queue.put(batch)

    async def aclose(self) -> None:
        """Write everything pending, then stop the writer and close the file."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.flush()
        thread = self._thread
        if thread is not None:
            self._queue.put(None)
            await asyncio.to_thread(thread.join, 10.0)
            self._thread = None
        if self._file is not None:
            self._file.close()
            self._file = None

    # -- the writer thread ----------------------------------------------------------------

    def _write_loop(self) -> None:
        out = self._file
        assert out is not None
        while True:
            batch = self._queue.get()
            if batch is None:
                return
            try:
                out.write(b"".join(format_line(values) for values in batch))
                out.flush()
                self.written += len(batch)
            except (OSError, ValueError):
                self.write_errors += 1
                self.dropped += len(batch)
            finally:
                with self._lock:
                    self._behind -= 1

    def render_prometheus(self, prefix: str = "tether") -> str:
        p = prefix
        lines = [
            f"# HELP {p}_access_log_lines_total Access-log lines written.",
            f"# TYPE {p}_access_log_lines_total counter",
            f"{p}_access_log_lines_total {self.written}",
            f"# HELP {p}_access_log_dropped_total Access-log lines dropped, never waited for.",
            f"# TYPE {p}_access_log_dropped_total counter",
            f"{p}_access_log_dropped_total {self.dropped}",
        ]
        return "\n".join(lines) + "\n"

    def __repr__(self) -> str:
        return (
            f"<AccessLog {self.path} pending={len(self.pending)} written={self.written}"
            f" dropped={self.dropped}>"
        )


class ListenerAccessLog:
    """What one listener's exchanges call (`ProxyServer.access_log`)."""

    __slots__ = ("listener", "log", "source")

    def __init__(self, log: AccessLog, listener: str) -> None:
        self.log = log
        self.listener = listener
        # The caller: on the outbound listener this sidecar's app; on the inbound one
        # ("" here) the service of the caller's verified mTLS identity, per request.
        self.source = log.source if listener == "outbound" else ""

    def record(self, ex: Exchange | H2Exchange, now: float) -> None:
        """Keep the request's values for the writer (filters first; full: dropped)."""
        log = self.log
        outcome = ex.outcome
        status = outcome.status
        if log.statuses and (status // 100 if 0 < status < 600 else 0) not in log.statuses:
            return
        if log.sample < 1.0 and log.rng.random() >= log.sample:
            return
        pending = log.pending
        if len(pending) >= log.max_pending:
            log.dropped += 1
            return
        route = ex.route
        dest = ep = None
        if route is not None:
            ds = route.dstats
            dest = (ds.name, ds.route) if ds is not None else None
            endpoint = route.endpoint
            if endpoint is not None:
                ep = (endpoint.host, endpoint.port)
            elif route.pool is not None:
                ep = (route.pool.host, route.pool.port)
        source = self.source
        if not source:
            source = ex.conn.peer.source or "unknown"  # plaintext: no identity
        trace = ex.trace
        trace_id: Any = None
        if trace is not None:
            trace_id = trace.trace_id()
        pending.append(
            (
                time.time() - (now - ex.start),
                trace_id,
                ex.head,
                self.listener,
                source,
                dest,
                status,
                outcome.reason,
                outcome.kind,
                now - ex.start,
                ep,
                ex.attempts,
                ex.bytes_in,
                ex.bytes_out,
                route.path if route is not None else None,
            )
        )


def _text(value: bytes | None) -> str | None:
    return value.decode("latin-1") if value is not None else None


def format_line(values: tuple[Any, ...]) -> bytes:
    """One JSON line from what `record` kept (in the writer thread)."""
    (start, trace_id, head, listener, source, dest, status, reason, kind, duration, ep,
     attempts, bytes_in, bytes_out, path) = values  # fmt: skip
    if trace_id is None:
        parent, _ = find_parent(head)
        if parent is not None and parent.trace_id:
            trace_id = parent.trace_id
    target = path_of(path if path is not None else head.target)
    destination = subset = route = None
    if dest is not None:
        destination, subset = split_destination(dest[0])
        route = dest[1] or None
    line = {
        "time": datetime.fromtimestamp(start, UTC).isoformat(timespec="milliseconds"),
        "trace_id": _text(trace_id),
        "request_id": _text(head.request_id),
        "listener": listener,
        "source": source,
        "destination": destination,
        "subset": subset or None,
        "route": route,
        "method": _text(head.method),
        "authority": _text(head.host),
        "path": _text(target),
        "protocol": f"HTTP/{head.version}",
        "status": status,
        "reason": reason,
        "outcome": kind,
        "duration_ms": round(duration * 1000, 3),
        "upstream": f"{ep[0]}:{ep[1]}" if ep is not None else None,
        "attempts": attempts,
        "bytes_in": bytes_in,
        "bytes_out": bytes_out,
    }
    return json.dumps(line, separators=(",", ":")).encode() + b"\n"
