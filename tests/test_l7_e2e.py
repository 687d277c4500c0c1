"""Route rules' L7 fields end to end: `tether apply` stores them, the control plane pushes
them, and a real caller sidecar applies them to real requests: fault aborts (within
stated statistical bounds) and delays, rate limits with Retry-After, redirects, path and
Host rewrites, and mirroring to a shadow that hangs without slowing the caller."""

from __future__ import annotations

import base64
import http.client
import json
import os
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ControlPlaneProcess, RegistryProcess, run_tether
from tests.sidecar_harness import App, ProcessSet, Sidecar, poll

pytestmark = pytest.mark.timeout(120)

POLICY = """
apiVersion: tether.dev/v1alpha1
kind: Route
metadata: {name: b}
spec:
  rules:
    - match: {path: {prefix: /flaky}}
      fault:
        abort: {status: 503, percentage: 50}
    - match: {path: {prefix: /held}}
      fault:
        delay: {fixed: 30s}
        headers: [{name: x-hold, exact: "yes"}]
    - match: {path: {prefix: /limited}}
      rateLimit: {requests: 3, interval: 1m}
    - match: {path: {prefix: /old}}
      redirect: {status: 301, host: example.com, path: /new}
    - match: {path: {prefix: /api}}
      rewrite: {prefix: /v2, host: b-internal}
    - match: {path: {prefix: /shadowed}}
      mirror: {service: c, percentage: 100}
    - match: {path: {prefix: /per-user}}
      rateLimit: {requests: 2, interval: 1m, at: inbound, key: header, header: x-user}
"""


class HangingApp(App):
    """A shadow that answers its health check but holds every other request."""

    def __init__(self, name: str) -> None:
        self.seen: list[dict[str, Any]] = []
        self.release = threading.Event()
        super().__init__(name)
        handler = self.server.RequestHandlerClass
        app = self
        original = handler.do_GET  # type: ignore[attr-defined]

        def do_get(h: Any) -> None:
            if h.path != "/health":
                app.seen.append({"path": h.path, **{k.lower(): v for k, v in h.headers.items()}})
                app.release.wait(60)
            original(h)

        handler.do_GET = do_get  # type: ignore[attr-defined]

    def close(self) -> None:
        self.release.set()
        super().close()


def call(
    sc: Sidecar, path: str, headers: dict[str, str] | None = None, timeout: float = 10.0
) -> tuple[int, dict[str, str], bytes]:
    return sc.call(f"http://b{path}", headers, timeout=timeout)


def test_l7_route_fields_through_real_sidecars(
    registry_process: Callable[..., RegistryProcess],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The control plane runs its CA: every sidecar gets an identity, calls (and copies to
    # the shadow) go over mTLS.
    monkeypatch.setenv("TETHER_CA_ENCRYPTION_KEY", base64.b64encode(bytes(range(1, 33))).decode())
    reg = registry_process()
    env = dict(os.environ, CONSUL_HTTP_ADDR=f"127.0.0.1:{reg.port}")
    cp = ControlPlaneProcess(reg.port, tmp_path / "cp.log")
    procs = ProcessSet(tmp_path, reg.port)
    shadow = HangingApp("c")
    procs.closers.append(shadow.close)
    try:
        cp.start()
        b_app = procs.app("b")
        sb = procs.sidecar("b", b_app, "--controlplane", cp.url)
        procs.sidecar("c", shadow, "--controlplane", cp.url)
        sa = procs.sidecar("a", procs.app("a"), "--controlplane", cp.url)
        policy = tmp_path / "b.yaml"
        policy.write_text(POLICY)
        applied = run_tether("apply", "-f", str(policy), "--controlplane", cp.url, env=env,
                             timeout=30)  # fmt: skip
        assert applied.returncode == 0, applied.stderr
        poll(lambda: call(sa, "/flaky")[0] == 503, 20, "the pushed policy is in force")

        # Fault abort at 50%: over 400 requests, within 5 standard deviations (±50).
        codes = [call(sa, "/flaky")[0] for _ in range(400)]
        aborted = codes.count(503)
        assert set(codes) <= {200, 503}
        assert abs(aborted - 200) <= 50, aborted
        status, headers, body = call(sa, "/flaky")
        while status != 503:
            status, headers, body = call(sa, "/flaky")
        assert headers["x-tether-error"] == "fault_abort"
        assert json.loads(body)["error"] == "fault_abort"

        # Delay only with the header: held far past the client's patience; without it,
        # answered at once.
        assert call(sa, "/held")[0] == 200
        with pytest.raises((TimeoutError, socket.timeout)):
            call(sa, "/held", {"x-hold": "yes"}, timeout=2.0)

        # Rate limit: 3 a minute at this caller, then 429 with Retry-After.
        assert [call(sa, "/limited")[0] for _ in range(3)] == [200, 200, 200]
        status, headers, body = call(sa, "/limited")
        assert status == 429
        assert headers["x-tether-error"] == "rate_limited"
        assert int(headers["retry-after"]) >= 1

        # Redirect: answered by the sidecar, never reaching b.
        hits = b_app.hits
        status, headers, _ = call(sa, "/old/page?x=1")
        assert status == 301
        assert headers["location"] == "http://example.com/new"
        assert b_app.hits == hits

        # Rewrite: b's app sees the new path (query kept) and Host.
        status, _, body = call(sa, "/api/items?id=7")
        assert status == 200
        seen = json.loads(body)
        assert seen["path"] == "/v2/items"
        assert seen["headers"]["host"] == "b-internal"

        # Mirror to a shadow that never answers: every call still answers at once
        # (a client timeout far below the shadow's hold), the copies arrive marked.
        for i in range(5):
            status, _, body = call(sa, f"/shadowed/{i}", timeout=3.0)
            assert status == 200 and json.loads(body)["name"] == "b"
        poll(lambda: len(shadow.seen) >= 5, 10, "the shadow received the copies")
        copy = shadow.seen[0]
        # Over mTLS: the shadow's sidecar names the caller (its SPIFFE ID).
        caller = copy["x-tether-peer-identity"]
        assert caller.startswith("spiffe://") and "/ns/default/" in caller
        assert caller.endswith("/svc/a")
        assert copy["path"].startswith("/shadowed/")
        assert copy["x-tether-mirror"] == "1"
        assert copy["host"] == "b-shadow"
        mirrors = sa.admin("/config_dump")[1]["mirrors"]
        assert mirrors["busy"] == 0 and mirrors["too_large"] == 0

        # An inbound limit per x-user, at b's own sidecar: alice's third call is refused
        # there (the caller's sidecar passes it on), bob has his own bucket.
        def acked() -> bool:
            resources = sb.admin("/config_dump")[1]["policy"]["resources"]
            return any(r["kind"] == "Route" for r in resources)

        poll(acked, 15, "b's sidecar has the policy")
        alice, bob = {"x-user": "alice"}, {"x-user": "bob"}
        assert [call(sa, "/per-user", alice)[0] for _ in range(2)] == [200, 200]
        status, headers, _ = call(sa, "/per-user", alice)
        assert (status, headers["x-tether-error"]) == (429, "rate_limited")
        assert int(headers["retry-after"]) >= 1
        assert call(sa, "/per-user", bob)[0] == 200
        assert "rate_limited" in admin_text(sb, "/stats/prometheus")

        # The local replies are counted by reason at the caller's sidecar.
        def counted() -> bool:
            text = admin_text(sa, "/stats/prometheus")
            return "fault_abort" in text and "rate_limited" in text

        poll(counted, 10, "fault_abort and rate_limited counted")
    finally:
        procs.close()
        cp.stop()


def admin_text(sc: Sidecar, path: str) -> str:
    conn = http.client.HTTPConnection("127.0.0.1", sc.ports["admin"], timeout=5)
    try:
        conn.request("GET", path)
        return conn.getresponse().read().decode()
    finally:
        conn.close()
