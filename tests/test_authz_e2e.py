"""Authorization end to end over real processes: a registry, `tether controlplane`, and
`tether sidecar` processes; intentions written with `tether apply` and with py-consul's
intentions API, enforced at the destination's inbound sidecar.

The first test runs the control plane without a CA, so the sidecars speak plaintext
and every caller is anonymous at the inbound sidecar: the default action, `*`
intentions, L7 permissions and isolation. The second runs the mesh CA, so every hop is
mTLS and the inbound sidecar decides by the caller's verified SPIFFE ID: allow and deny
by service, L7 by method, default deny, and an isolated namespace letting in only the
namespace its intention names.
"""

from __future__ import annotations

import http.client
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import consul
import pytest

from tests.conftest import ControlPlaneProcess, RegistryProcess, run_tether
from tests.polling import poll
from tests.sidecar_harness import ProcessSet, Sidecar

pytestmark = pytest.mark.timeout(120)

MESH_DENY = """
apiVersion: tether.dev/v1alpha1
kind: MeshConfig
metadata: {name: mesh}
spec:
  authorization: {defaultAction: deny}
"""

L7 = """
apiVersion: tether.dev/v1alpha1
kind: Intention
metadata: {name: api, namespace: default}
spec:
  sources:
    - name: "*"
      namespace: "*"
      permissions:
        - action: deny
          http: {path: {prefix: /public/secret}}
        - action: allow
          http: {path: {prefix: /public/}, methods: [GET, HEAD]}
        - action: allow
          http:
            headers: [{name: x-role, exact: admin}]
"""

ISOLATED = """
apiVersion: tether.dev/v1alpha1
kind: MeshConfig
metadata: {name: mesh}
spec:
  authorization: {defaultAction: allow}
  mtls:
    namespaces:
      default: {isolated: true}
"""


def request(
    sc: Sidecar, method: str, url: str, headers: dict[str, str] | None = None
) -> tuple[int, str]:
    """One request through the caller's outbound listener: (status, x-tether-error)."""
    conn = http.client.HTTPConnection("127.0.0.1", sc.ports["outbound"], timeout=10)
    try:
        conn.request(method, url, headers=headers or {})
        resp = conn.getresponse()
        resp.read()
        return resp.status, resp.getheader("x-tether-error") or ""
    finally:
        conn.close()


def test_anonymous_callers_default_action_l7_and_isolation(
    registry_process: Callable[..., RegistryProcess], tmp_path: Path
) -> None:
    reg = registry_process()
    env = dict(os.environ, CONSUL_HTTP_ADDR=f"127.0.0.1:{reg.port}")
    cp = ControlPlaneProcess(reg.port, tmp_path / "cp.log")
    procs = ProcessSet(tmp_path, reg.port)
    try:
        cp.start()
        api_app = procs.app("api")
        api = procs.sidecar("api", api_app, "--controlplane", cp.url)
        web = procs.sidecar("web", procs.app("web"))  # no mTLS: an anonymous caller

        def apply(text: str, name: str) -> None:
            path = tmp_path / name
            path.write_text(text)
            done = run_tether("apply", "-f", str(path), "--controlplane", cp.url, env=env,
                              timeout=30)  # fmt: skip
            assert done.returncode == 0, done.stderr

        def status(path: str, method: str = "GET", **headers: str) -> tuple[int, str]:
            fields = {k.replace("_", "-"): v for k, v in headers.items()}
            return request(web, method, f"http://api{path}", fields)

        poll(lambda: status("/anything") == (200, ""), 20, "no policy: every call allowed")

        apply(MESH_DENY, "mesh.yaml")
        poll(lambda: status("/anything") == (403, "forbidden_by_policy"), 20,
             "the default action deny reaches the inbound sidecar")  # fmt: skip
        hits = api_app.hits
        for _ in range(20):
            assert status("/anything") == (403, "forbidden_by_policy")
        assert api_app.hits == hits  # refused before the app
        refusals = [ln for ln in api.output().splitlines() if "authz: refused" in ln]
        assert len(refusals) == 1, refusals  # once per caller and reason
        assert "anonymous (127.0.0.1)" in refusals[0] and "-> default/api" in refusals[0]
        assert "MeshConfig (deny)" in refusals[0]

        apply(L7, "l7.yaml")
        poll(lambda: status("/public/x")[0] == 200, 20, "the L7 intention reaches the sidecar")
        assert status("/public/x?q=1", "HEAD") == (501, "")  # allowed; the app has no HEAD
        assert status("/public/x", "DELETE") == (403, "forbidden_by_policy")
        assert status("/public/secret/key") == (403, "forbidden_by_policy")
        assert status("/private") == (403, "forbidden_by_policy")
        assert status("/private", x_role="admin")[0] == 200
        assert status("/private", x_role="user") == (403, "forbidden_by_policy")

        # The same Intention through Consul's API: `*/*` now denied outright (L4).
        c = consul.Consul(host="127.0.0.1", port=cp.port)
        assert c.connect.intentions.read("*/*", "api")["Permissions"][0]["Action"] == "deny"
        assert c.connect.intentions.upsert("*/*", "api", action="allow") is True
        poll(lambda: status("/private") == (200, ""), 20, "the API's intention is enforced")
        got = run_tether("get", "intention", "api", "-o", "json", "--controlplane", cp.url,
                         env=env, timeout=30)  # fmt: skip
        assert got.returncode == 0, got.stderr
        assert '"action": "allow"' in got.stdout and "permissions" not in got.stdout
        table = run_tether("get", "intentions", "--controlplane", cp.url, env=env, timeout=30)
        assert table.returncode == 0 and "*/*=allow" in table.stdout, table.stdout

        # An isolated namespace: an anonymous caller is from no namespace, and a `*`
        # intention does not name one: refused even with the default action allow.
        apply(ISOLATED, "isolated.yaml")
        poll(lambda: status("/private") == (403, "forbidden_by_policy"), 20,
             "isolation refuses the anonymous caller")  # fmt: skip
        # Callers with a namespace (as the control plane's check sees them): the same
        # namespace is not concerned; another needs an intention naming it.
        assert c.connect.intentions.check("web", "api") is True
        assert c.connect.intentions.check("shop/web", "api") is False
        assert c.connect.intentions.upsert("shop/*", "api", action="allow") is True
        assert c.connect.intentions.check("shop/web", "api") is True
        assert status("/private") == (403, "forbidden_by_policy")  # anonymous: still refused
        want = ["shop/* => default/api (Precedence: 8)", "*/* => default/api (Precedence: 7)"]
        poll(lambda: api.admin("/config_dump")[1]["authorization"]["rules"] == want, 20,
             "the sidecar runs the intentions as the API left them")  # fmt: skip
        _, dump = api.admin("/config_dump")
        assert dump["controlplane"]["nacks"] == 0
        authz = dump["authorization"]
        assert authz["destination"] == "default/api" and authz["isolated"] is True
        assert authz["enforced"] is True and authz["denied"] >= 25
        assert web.admin("/config_dump")[1]["authorization"] is None  # no control plane
    finally:
        procs.close()
        cp.stop()


INTENTIONS = """
apiVersion: tether.dev/v1alpha1
kind: Intention
metadata: {name: api, namespace: default}
spec:
  sources:
    - {name: web, action: allow}
    - {name: billing, action: deny}
    - name: admin
      permissions:
        - {action: allow, http: {methods: [GET]}}
---
apiVersion: tether.dev/v1alpha1
kind: Intention
metadata: {name: ledger, namespace: payments}
spec:
  sources:
    - {name: web, namespace: default, action: allow}
---
apiVersion: tether.dev/v1alpha1
kind: MeshConfig
metadata: {name: mesh}
spec:
  authorization: {defaultAction: deny}
  mtls:
    namespaces:
      payments: {isolated: true}
"""


def test_identity_matrix_over_mtls_sidecars(
    registry_process: Callable[..., RegistryProcess],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every sidecar attached to the control plane speaks mTLS; the inbound sidecar
    decides by the caller's SPIFFE ID."""
    reg = registry_process()
    env = dict(os.environ, CONSUL_HTTP_ADDR=f"127.0.0.1:{reg.port}")
    # The control plane runs the mesh CA (its root key in a 0700 directory), so every
    # sidecar attached to it gets a certificate and the hops between them are mTLS.
    monkeypatch.setenv("TETHER_CA_KEY_DIR", str(tmp_path / "ca"))
    cp = ControlPlaneProcess(reg.port, tmp_path / "cp.log")
    procs = ProcessSet(tmp_path, reg.port)
    try:
        cp.start()
        path = tmp_path / "intentions.yaml"
        path.write_text(INTENTIONS)
        done = run_tether("apply", "-f", str(path), "--controlplane", cp.url, env=env, timeout=30)
        assert done.returncode == 0, done.stderr

        def sidecar(service: str, namespace: str = "default") -> Sidecar:
            return procs.sidecar(service, procs.app(service), "--namespace", namespace,
                                 "--controlplane", cp.url)  # fmt: skip

        api = sidecar("api")
        assert "mtls=on" in api.output(), api.output()
        sidecar("ledger", "payments")
        callers = {name: sidecar(name) for name in ("web", "billing", "admin", "other")}
        shop_web = sidecar("web", "shop")

        def call(sc: Sidecar, url: str, method: str = "GET") -> tuple[int, str]:
            return request(sc, method, url)

        expect: dict[tuple[str, str, str], Any] = {
            ("web", "GET", "http://api/x"): 200,
            ("web", "POST", "http://api/x"): 501,  # allowed; the test app has no POST
            ("billing", "GET", "http://api/x"): 403,
            ("admin", "GET", "http://api/x"): 200,
            ("admin", "POST", "http://api/x"): 403,
            ("other", "GET", "http://api/x"): 403,  # default deny
            ("web", "GET", "http://ledger.payments/x"): 200,  # named explicitly
            ("billing", "GET", "http://ledger.payments/x"): 403,  # isolated
        }
        for (who, method, url), want in expect.items():
            poll(lambda w=who, m=method, u=url, e=want: call(callers[w], u, m)[0] == e, 20,
                 f"{who} {method} {url} -> {want}")  # fmt: skip
        assert call(shop_web, "http://api.default/x") == (403, "forbidden_by_policy")
        assert call(shop_web, "http://ledger.payments/x") == (403, "forbidden_by_policy")
        # The refusals are logged at the destination with both identities.
        refused = [ln for ln in api.output().splitlines() if "authz: refused" in ln]
        assert any("/ns/default/dc/dc1/svc/billing -> default/api" in ln and
                   "Matched L4 intention: default/billing => default/api" in ln
                   for ln in refused), refused  # fmt: skip
        # The app is told who called (the sidecar strips any such header from outside).
        status, _, body = callers["web"].call(
            "http://api/x", {"x-tether-peer-identity": "spiffe://evil/ns/default/dc/dc1/svc/web"}
        )
        assert status == 200
        seen = json.loads(body)["headers"]["x-tether-peer-identity"]
        assert seen.endswith("/ns/default/dc/dc1/svc/web") and not seen.startswith("spiffe://evil")
    finally:
        procs.close()
        cp.stop()
