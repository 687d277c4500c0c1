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
        # tether/demo/policies/ went in through the control plane's API at start.
        assert "policies | trafficsplit default/orders created" in text, text
        conn = http.client.HTTPConnection("127.0.0.1", cp_port, timeout=15)
        conn.request("GET", "/api/v1/resources/TrafficSplit/default/orders")
        split = json.loads(conn.getresponse().read())
        conn.close()
        assert [s["weight"] for s in split["spec"]["subsets"]] == [90, 10], split
        # Every sidecar got a certificate from the control plane's CA: mTLS between them.
        assert text.count("mtls=on") == 6, text
        # In from outside through frontend's ingress listener, then mTLS between sidecars.
        m = re.search(r"try: curl http://127\.0\.0\.1:(\d+)/", text)
        assert m is not None, text
        conn = http.client.HTTPConnection("127.0.0.1", int(m.group(1)), timeout=15)
        conn.request("GET", "/?order=7")
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

        def all_acked() -> bool:  # what `tether status` shows
            conn = http.client.HTTPConnection("127.0.0.1", cp_port, timeout=5)
            conn.request("GET", "/api/v1/sidecars")
            sidecars = json.loads(conn.getresponse().read())["sidecars"]
            conn.close()
            return len(sidecars) == 6 and all(
                s["state"] == "acked" and s["acked_version"] for s in sidecars
            )

        poll(all_acked, 15, "every sidecar acked", interval=0.2)
        # `tether status`: one number (the config version `apply` printed), and in sync.
        st = subprocess.run(
            [sys.executable, "-m", "tether.cli", "status", "--controlplane",
             f"http://127.0.0.1:{cp_port}"],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert st.returncode == 0, st.stderr
        assert st.stdout.count(" in sync ") == 6 and "; config version 1" in st.stdout, st.stdout
        assert "applied" in text and "config version 1" in text

        def order(n: int) -> tuple[int, dict[str, str]]:
            conn = http.client.HTTPConnection("127.0.0.1", int(m.group(1)), timeout=15)
            conn.request("GET", f"http://frontend/?order={n}")
            resp = conn.getresponse()
            body = json.loads(resp.read())
            conn.close()
            return resp.status, body.get("order", body)

        # frontend is in zone-a: its orders calls stay there (both versions run in both
        # zones, so the 90/10 split does not pull calls out of the zone) ...
        answers = [order(n) for n in range(40)]
        assert all(status == 200 for status, _ in answers), answers
        assert sum(o["zone"] == "zone-a" for _, o in answers) >= 38, answers
        # ... and fail over to zone-b when zone-a's orders apps die (their checks fail),
        # killed as the listing suggests.
        hint = re.search(r"failover: kill ([\d ]+?)   \(the orders apps in zone-a", text)
        assert hint is not None, text
        pids = [int(p) for p in hint.group(1).split()]
        assert len(pids) == 2 and set(pids) <= started, (pids, started)
        for pid in pids:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            assert b"tether.demo.orders" in argv and b"zone-a" in argv, argv
            os.kill(pid, signal.SIGKILL)

        def zone_a_out() -> bool:
            conn = http.client.HTTPConnection("127.0.0.1", int(admin.group(1)), timeout=5)
            conn.request("GET", "/clusters")
            clusters = json.loads(conn.getresponse().read())["clusters"]
            conn.close()
            (orders,) = [c for c in clusters if c["name"] == "orders.default"]
            health = {ep["health"] for ep in orders["endpoints"] if ep["zone"] == "zone-a"}
            return health == {"critical"}

        poll(zone_a_out, 20, "zone-a's orders instances critical", interval=0.2)
        # The sidecars of the killed apps say so (their app check turned critical).
        poll(
            lambda: (
                len(re.findall(r"app check of orders-\S+ turned critical", log.read_text())) >= 2
            ),
            20,
            "the sidecars logged their apps' checks turning critical",
            interval=0.2,
        )
        answers = [order(n) for n in range(20)]
        assert all(s == 200 and o["zone"] == "zone-b" for s, o in answers), answers

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
