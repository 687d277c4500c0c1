"""`tether up` end to end: the local mesh answers through its sidecars, and Ctrl-C
(SIGINT) drains and stops every process it started."""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import free_port
from tests.sidecar_harness import ROOT, alive, descendants, poll

pytestmark = [pytest.mark.timeout(120), pytest.mark.slow]


def test_up_serves_and_sigint_stops_everything(tmp_path: Path) -> None:
    log = tmp_path / "up.log"
    cp_port = free_port()
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tether.cli", "up", "--registry-port", str(free_port()),
             "--controlplane-port", str(cp_port),
             "--no-view", "--drain-seconds", "2", "--rate", "5"],
            cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    started: set[int] = set()
    try:
        poll(
            lambda: proc.poll() is None and "tether up: ready" in log.read_text(),
            90,
            "tether up ready",
            interval=0.2,
        )
        text = log.read_text()
        started = descendants(proc.pid)
        # registry + control plane + 6 apps + 6 sidecars, each its own child
        assert len(started) >= 14, text
        # examples/policies/ went in through the control plane's API at start.
        assert "policies | trafficsplit default/orders created" in text, text
        conn = http.client.HTTPConnection("127.0.0.1", cp_port, timeout=15)
        conn.request("GET", "/api/v1/resources/TrafficSplit/default/orders")
        split = json.loads(conn.getresponse().read())
        conn.close()
        assert [s["weight"] for s in split["spec"]["subsets"]] == [90, 10], split
        m = re.search(r"curl -x http://127\.0\.0\.1:(\d+) http://frontend/", text)
        assert m is not None, text
        conn = http.client.HTTPConnection("127.0.0.1", int(m.group(1)), timeout=15)
        conn.request("GET", "http://frontend/?order=7")
        resp = conn.getresponse()
        body = json.loads(resp.read())
        conn.close()
        # frontend → orders → inventory, every hop through the sidecars.
        assert resp.status == 200, body
        assert body["frontend"] == "frontend-1"
        assert body["order"]["service"] == "orders" and body["order"]["stock"]["item"]

        # Every sidecar holds the control plane's push connection.
        admin = re.search(r"frontend-1 .* admin=127\.0\.0\.1:(\d+)", text)
        assert admin is not None, text

        def pushed() -> bool:
            conn = http.client.HTTPConnection("127.0.0.1", int(admin.group(1)), timeout=5)
            conn.request("GET", "/config_dump")
            dump = json.loads(conn.getresponse().read())
            conn.close()
            kinds = {r["kind"] for r in dump["policy"]["resources"]}
            # connected, and running (and having acked) a snapshot with the split
            return bool(dump["controlplane"]["connected"] and dump["controlplane"]["acks"]
                        and "TrafficSplit" in kinds)  # fmt: skip

        poll(pushed, 15, "frontend's sidecar acked the policies")

        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0
        out = log.read_text()
        assert "tether up: stopped" in out
        poll(lambda: not any(alive(p) for p in started), 10, "children gone")
        with pytest.raises(ProcessLookupError):
            os.killpg(proc.pid, 0)  # nothing left in tether up's own group either
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        for pid in started | descendants(proc.pid):
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
