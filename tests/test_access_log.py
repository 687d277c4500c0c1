"""The access log: its lines from real exchanges, its filters, drops instead of waits
(a FIFO nobody reads), and over real sidecar processes (a file, standard output with a
status filter, the lines written at exit, its counters in /stats/prometheus)."""

from __future__ import annotations

import asyncio
import json
import os
import random
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from proxy.access_log import MAX_BATCHES, AccessLog, format_line, parse_status_classes
from proxy.exchange import ENDED
from tests.conftest import RegistryProcess
from tests.sidecar_harness import ProcessSet, poll
from tests.test_exchange import POST, World
from tests.test_observe import documented_metrics

KEYS = {
    "time", "trace_id", "request_id", "listener", "source", "destination", "subset", "route",
    "method", "authority", "path", "protocol", "status", "reason", "outcome", "duration_ms",
    "upstream", "attempts", "bytes_in", "bytes_out",
}  # fmt: skip


def ended(request: bytes = POST, body: bytes = b"hello", status: int = 200) -> World:
    """An exchange through to its end: request body in, a response body out."""
    w = World(request)
    w.route(w.pool(idle=1))
    if body:
        w.ex.on_request_body(body)
    w.ex.on_request_end(None)
    w.upstream.codec.feed(b"HTTP/1.1 %d X\r\nContent-Length: 3\r\n\r\nabc" % status)
    assert w.ex.state == ENDED
    return w


def test_a_line_has_every_field() -> None:
    log = AccessLog("-", source="a.default")
    w = ended(
        b"POST /items?token=secret HTTP/1.1\r\nHost: svc\r\nContent-Length: 5\r\n"
        b"traceparent: 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01\r\n\r\n"
    )
    log.for_listener("outbound").record(w.ex, w.server.clock())
    (values,) = log.pending
    line = json.loads(format_line(values))
    assert set(line) == KEYS
    assert line["path"] == "/items"  # never the query
    assert line["trace_id"] == "0af7651916cd43dd8448eb211c80319c"
    assert (line["method"], line["authority"], line["status"], line["reason"]) == (
        "POST", "svc", 200, "")  # fmt: skip
    assert (line["bytes_in"], line["bytes_out"], line["attempts"]) == (5, 3, 1)
    assert line["destination"] == "svc.default" and line["source"] == "a.default"
    assert line["upstream"] == "127.0.0.1:20001" and line["outcome"] == "Completed"
    assert line["request_id"] and line["time"].endswith("+00:00")


def test_status_classes_and_sampling_filter_before_anything_is_kept() -> None:
    assert parse_status_classes("4xx, 5xx,none") == frozenset({0, 4, 5})
    with pytest.raises(ValueError, match="'6xx' is not one of"):
        parse_status_classes("6xx")
    errors = AccessLog("-", statuses=parse_status_classes("5xx")).for_listener("outbound")
    ok, bad = ended(status=200), ended(status=503)
    for w in (ok, bad):
        errors.record(w.ex, 0.0)
    assert [v[6] for v in errors.log.pending] == [503]

    class Draws(random.Random):
        def __init__(self, draws: list[float]) -> None:
            super().__init__(1)
            self.draws = draws

        def random(self) -> float:
            return self.draws.pop(0)

    half = AccessLog("-", sample=0.5, rng=Draws([0.2, 0.7, 0.49])).for_listener("inbound")
    for _ in range(3):
        half.record(ok.ex, 0.0)
    # Inbound, the caller is its verified mTLS identity; this one has none (plaintext).
    assert len(half.log.pending) == 2 and [v[4] for v in half.log.pending] == ["unknown"] * 2
    full = AccessLog("-", max_pending=2).for_listener("outbound")
    for _ in range(5):
        full.record(ok.ex, 0.0)
    assert len(full.log.pending) == 2 and full.log.dropped == 3
    with pytest.raises(ValueError, match="--access-log-sample"):
        AccessLog("-", sample=1.5)


async def test_a_writer_that_cannot_write_costs_drops_not_waits(tmp_path: Path) -> None:
    """A FIFO nobody reads: the writer thread blocks once the pipe is full; the loop goes
    on, batches beyond MAX_BATCHES are dropped and counted, and once someone reads,
    everything kept is written."""
    fifo = tmp_path / "log.fifo"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # so opening for writing returns
    log = AccessLog(str(fifo), interval=3600)
    log.start()
    rec = log.for_listener("outbound")
    w = ended()
    batches, per_batch = MAX_BATCHES + 8, 400
    for _ in range(batches):
        for _ in range(per_batch):
            rec.record(w.ex, 0.0)
        log.flush()
        await asyncio.sleep(0)  # the loop keeps running
    assert log.dropped >= per_batch  # at least one batch could not be handed over
    got = bytearray()
    os.set_blocking(reader, True)
    drained = threading.Event()

    def drain() -> None:
        while chunk := os.read(reader, 65536):
            got.extend(chunk)
        drained.set()

    threading.Thread(target=drain, daemon=True).start()
    await log.aclose()  # closes the writing end: the reader sees EOF
    assert await asyncio.to_thread(drained.wait, 30)
    os.close(reader)
    lines = bytes(got).splitlines()
    assert len(lines) == log.written == batches * per_batch - log.dropped
    assert all(json.loads(line)["status"] == 200 for line in lines)


# -- over real processes --------------------------------------------------------------


def read_log(path: Path, at_least: int = 1) -> list[dict[str, Any]]:
    """The lines written so far ([] until there are `at_least`)."""
    if not path.exists():
        return []
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return lines if len(lines) >= at_least else []


@pytest.mark.timeout(120)
def test_access_log_over_real_processes(
    registry_process: Callable[..., RegistryProcess], tmp_path: Path
) -> None:
    reg = registry_process()
    procs = ProcessSet(tmp_path, reg.port)
    a_log, b_log = tmp_path / "a.log", tmp_path / "b.log"
    try:
        procs.sidecar("b", procs.app("b"), "--access-log", str(b_log))
        sa = procs.sidecar("a", procs.app("a"), "--access-log", str(a_log))
        tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
        status, _, body = sa.call("http://b/who?secret=1", {"traceparent": tp})
        assert status == 200
        assert sa.call("http://nosuchservice/")[0] == 404
        # Written by the timer while the sidecars run.
        lines = poll(lambda: read_log(a_log, at_least=2), 15, "a's log")
        ok, missing = lines
        assert set(ok) == KEYS
        assert (ok["listener"], ok["source"], ok["destination"]) == (
            "outbound", "a.default", "b.default")  # fmt: skip
        assert (ok["method"], ok["path"], ok["status"], ok["reason"]) == ("GET", "/who", 200, "")
        assert ok["authority"] == "b" and ok["trace_id"] == "0af7651916cd43dd8448eb211c80319c"
        assert ok["bytes_out"] == len(body) and ok["attempts"] == 1
        assert ok["upstream"].startswith("127.0.0.1:")
        assert (missing["status"], missing["reason"]) == (404, "unknown_service")
        assert missing["attempts"] == 0 and missing["upstream"] is None
        (inbound,) = poll(lambda: read_log(b_log), 15, "b's log")
        assert inbound["listener"] == "inbound" and inbound["destination"] == "app"
        assert inbound["trace_id"] == ok["trace_id"] and inbound["request_id"] == ok["request_id"]

        _, text = sa.admin("/stats/prometheus")
        families = {f.name: f for f in text_string_to_metric_families(text)}
        assert {n: f.type for n, f in families.items()} == documented_metrics(access_log=True)
        (written,) = families["tether_access_log_lines"].samples
        assert written.value == 2
        # Lines of requests just before SIGTERM are written at exit.
        for i in range(5):
            assert sa.call(f"http://b/who?n={i}")[0] == 200
        sa.terminate()
        sa.proc.wait(30)
        assert len(read_log(a_log)) == 7

        # Standard output, errors only.
        s2 = procs.sidecar(
            "a2", procs.app("a2"), "--access-log", "-", "--access-log-status", "4xx,5xx"
        )
        assert s2.call("http://b/who")[0] == 200
        assert s2.call("http://nosuchservice/")[0] == 404

        def stdout_lines() -> list[dict[str, Any]]:
            out = [line for line in s2.output().splitlines() if line.startswith("{")]
            return [json.loads(line) for line in out]

        (only,) = poll(stdout_lines, 15, "a2's access log on standard output")
        assert only["status"] == 404 and only["source"] == "a2.default"
    finally:
        procs.close()


def test_bad_access_log_and_tracing_settings_are_usage_errors() -> None:
    from tests.conftest import run_tether

    for flags, env, error in [
        (["--access-log-status", "2xx,7xx"], {}, "'7xx' is not one of"),
        (["--access-log-sample", "2"], {}, "--access-log-sample: 2.0 is not within 0..1"),
        ([], {"OTEL_TRACES_EXPORTER": "zipkin"}, "only otlp is supported"),
        ([], {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_TRACES_SAMPLER": "x"}, "OTEL_TRACES_SAMPLER"),
    ]:
        out = run_tether(
            "sidecar", "--service", "a", "--app-port", "1", "--access-log", "-", *flags,
            env=dict(os.environ, **env), timeout=30,
        )  # fmt: skip
        assert out.returncode == 2 and error in out.stderr, out.stderr
