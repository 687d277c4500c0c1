"""The admission webhook over real HTTPS: AdmissionReview (admission.k8s.io/v1) JSON in,
a JSON Patch out, for a pod with and without the annotation, one already injected, a
namespace that opted in, and a Job's pod; bad input is refused with 400."""

from __future__ import annotations

import base64
import datetime
import json
import ssl
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from controlplane.inject.jsonpatch import apply
from controlplane.inject.webhook import WebhookServer, WebhookSpec
from tether.http_limits import ListenerLimits

DATA = Path(__file__).parent / "data" / "inject"
SERVICE_DNS = "tether-webhook.tether-system.svc"


def self_signed(tmp: Path) -> tuple[Path, Path]:
    """A certificate for the webhook's Service name, as `deploy/kubernetes/` would mount."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, SERVICE_DNS)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(SERVICE_DNS)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp / "tls.crt", tmp / "tls.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


class Client:
    """An API server's view of the webhook: HTTPS, the certificate checked by name."""

    def __init__(self, server: WebhookServer, session: aiohttp.ClientSession, ca: Path) -> None:
        self.server = server
        self.session = session
        self.ssl = ssl.create_default_context(cafile=str(ca))

    async def post(self, path: str, body: Any, raw: bytes | None = None) -> tuple[int, Any]:
        # The certificate names the Service; the connection goes to 127.0.0.1.
        url = f"https://127.0.0.1:{self.server.port}{path}"
        data = raw if raw is not None else json.dumps(body).encode()
        async with self.session.post(
            url,
            data=data,
            headers={"Content-Type": "application/json", "Host": SERVICE_DNS},
            ssl=self.ssl,
            server_hostname=SERVICE_DNS,
        ) as resp:
            text = await resp.text()
            try:
                return resp.status, json.loads(text)
            except ValueError:
                return resp.status, text  # the listener's own answers are plain text

    async def review(self, pod: dict[str, Any], path: str = "/inject", **request: Any) -> Any:
        uid = str(uuid.uuid4())
        body = {
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "request": {
                "uid": uid,
                "kind": {"group": "", "version": "v1", "kind": "Pod"},
                "resource": {"group": "", "version": "v1", "resource": "pods"},
                "namespace": "shop",
                "operation": "CREATE",
                "object": pod,
                "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller"},
                "dryRun": False,
                **request,
            },
        }
        status, answer = await self.post(path, body)
        assert status == 200, answer
        assert answer["apiVersion"] == "admission.k8s.io/v1"
        assert answer["kind"] == "AdmissionReview"
        assert answer["response"]["uid"] == uid
        return answer["response"]


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[Client]:
    cert, key = self_signed(tmp_path)
    server = WebhookServer(WebhookSpec(tls_cert=cert, tls_key=key, host="127.0.0.1", port=0))
    await server.start()
    try:
        async with aiohttp.ClientSession() as session:
            yield Client(server, session, cert)
    finally:
        await server.aclose()


def pod(name: str = "orders-7d9c", annotations: dict[str, str] | None = None) -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load((DATA / "kinds" / "pod.yaml").read_text())
    doc["metadata"]["name"] = name
    doc["metadata"]["namespace"] = "shop"
    if annotations is not None:
        doc["metadata"]["annotations"] = annotations
    return doc


def patched(original: dict[str, Any], response: dict[str, Any]) -> Any:
    assert response["allowed"] is True
    assert response["patchType"] == "JSONPatch"
    return apply(original, json.loads(base64.b64decode(response["patch"])))


async def test_pod_with_annotation_is_injected(client: Client) -> None:
    original = pod(annotations={"tether.dev/inject": "enabled"})
    result = patched(original, await client.review(original))
    (sidecar,) = result["spec"]["initContainers"]
    assert sidecar["name"] == "tether-proxy" and sidecar["restartPolicy"] == "Always"
    assert result["metadata"]["annotations"]["tether.dev/status"] == "injected"
    env = {e["name"]: e["value"] for e in result["spec"]["containers"][0]["env"]}
    assert env["HTTP_PROXY"] == "http://127.0.0.1:15001"
    # The same pod through the webhook again (a reinvocation): left alone.
    again = await client.review(result)
    assert again["allowed"] is True and "patch" not in again


async def test_pod_without_annotation_is_left_alone(client: Client) -> None:
    response = await client.review(pod())
    assert response == {"uid": response["uid"], "allowed": True}


async def test_namespace_opt_in_and_pod_opt_out(client: Client) -> None:
    original = pod()
    result = patched(original, await client.review(original, "/inject/namespace-enabled"))
    assert result["spec"]["initContainers"][0]["name"] == "tether-proxy"
    opted_out = pod(annotations={"tether.dev/inject": "disabled"})
    response = await client.review(opted_out, "/inject/namespace-enabled")
    assert response["allowed"] is True and "patch" not in response


async def test_job_pod_gets_a_native_sidecar(client: Client) -> None:
    job = yaml.safe_load((DATA / "kinds" / "job.yaml").read_text())
    template = job["spec"]["template"]
    meta = {**template["metadata"], "generateName": "report-"}
    meta["annotations"] = {"tether.dev/inject": "enabled"}
    original = {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": template["spec"]}
    result = patched(original, await client.review(original))
    spec = result["spec"]
    assert spec["restartPolicy"] == "Never"
    (sidecar,) = spec["initContainers"]
    # An init container with restartPolicy Always: the kubelet stops it once the Job's
    # container has exited, so the pod completes.
    assert sidecar["restartPolicy"] == "Always"
    assert [c["name"] for c in spec["containers"]] == ["report"]
    args = sidecar["args"]
    assert args[args.index("--service") + 1] == "report"


async def test_bad_annotation_is_denied_with_its_name(client: Client) -> None:
    response = await client.review(
        pod(annotations={"tether.dev/inject": "enabled", "tether.dev/port": "http"})
    )
    assert response["allowed"] is False
    assert response["status"]["code"] == 400
    assert "tether.dev/port" in response["status"]["message"]


async def test_other_operations_and_kinds_pass(client: Client) -> None:
    annotated = pod(annotations={"tether.dev/inject": "enabled"})
    response = await client.review(annotated, operation="UPDATE")
    assert response["allowed"] is True and "patch" not in response
    response = await client.review(
        annotated, kind={"group": "apps", "version": "v1", "kind": "Deployment"}
    )
    assert response["allowed"] is True and "patch" not in response


async def test_bad_input_is_400(client: Client) -> None:
    status, body = await client.post("/inject", None, raw=b"{not json")
    assert status == 400 and "not JSON" in body["error"]
    status, body = await client.post("/inject", {"kind": "AdmissionReview", "apiVersion": "v1"})
    assert status == 400 and "apiVersion" in body["error"]
    status, body = await client.post(
        "/inject", {"kind": "AdmissionReview", "apiVersion": "admission.k8s.io/v1"}
    )
    assert status == 400 and "request.uid" in body["error"]
    status, _ = await client.post("/inject", None, raw=b"[" + b"0," * (2 << 20) + b"0]")
    assert status == 413


async def test_connection_cap(tmp_path: Path) -> None:
    """Beyond the cap a connection gets 503 and is closed (tether/http_limits.py); once
    connections are released, the webhook serves again."""
    import asyncio

    cert, key = self_signed(tmp_path)
    limits = ListenerLimits(max_connections=4)
    server = WebhookServer(
        WebhookSpec(tls_cert=cert, tls_key=key, host="127.0.0.1", port=0, limits=limits)
    )
    await server.start()
    ctx = ssl.create_default_context(cafile=str(cert))
    held = []

    async def connect() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        r, w = await asyncio.open_connection(
            "127.0.0.1", server.port, ssl=ctx, server_hostname=SERVICE_DNS
        )
        held.append(w)
        return r, w

    try:
        for _ in range(4):
            await connect()
        r, _ = await connect()
        answer = await asyncio.wait_for(r.read(), 10)
        assert answer.startswith(b"HTTP/1.1 503 "), answer
        assert server.site is not None and server.site.gate.refused == 1
        for w in held:
            w.close()
        held.clear()
        deadline = asyncio.get_running_loop().time() + 10
        while server.site.gate.open:
            assert asyncio.get_running_loop().time() < deadline, "connections not released"
            await asyncio.sleep(0.02)
        r, w = await connect()
        w.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert (await asyncio.wait_for(r.read(), 10)).startswith(b"HTTP/1.1 200 ")
    finally:
        for w in held:
            w.close()
        await server.aclose()


async def test_deep_json_is_refused(client: Client) -> None:
    status, body = await client.post("/inject", None, raw=b"[" * 10000 + b"]" * 10000)
    assert status == 400 and "nested deeper" in body["error"]


def test_tether_webhook_command(tmp_path: Path) -> None:
    """`tether webhook` as a process: serves the review; a missing key is a clear error."""
    import os
    import subprocess
    import sys
    import urllib.request

    from tests.conftest import ROOT, run_tether, stop_group, wait_for_port
    from tether.ports import free_port

    cert, key = self_signed(tmp_path)
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "tether.cli", "webhook", "--host", "127.0.0.1", "--port",
         str(port), "--tls-cert", str(cert), "--tls-key", str(key), "--image", "tether:test"],
        cwd=ROOT, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_for_port(port, proc=proc)
        original = pod(annotations={"tether.dev/inject": "enabled"})
        review = {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
                  "request": {"uid": "u-1", "kind": {"group": "", "version": "v1", "kind": "Pod"},
                              "operation": "CREATE", "object": original}}  # fmt: skip
        ctx = ssl.create_default_context(cafile=str(cert))
        ctx.check_hostname = False  # the certificate names the Service, we dial 127.0.0.1
        req = urllib.request.Request(
            f"https://127.0.0.1:{port}/inject", data=json.dumps(review).encode(),
            headers={"Content-Type": "application/json"},
        )  # fmt: skip
        with urllib.request.urlopen(req, context=ctx, timeout=10) as resp:
            answer = json.loads(resp.read())
        result = patched(original, answer["response"])
        assert result["spec"]["initContainers"][0]["image"] == "tether:test"
    finally:
        stop_group(proc)
    done = run_tether("webhook", "--port", "0", "--tls-cert", str(cert), "--tls-key",
                      str(tmp_path / "missing.key"), env=dict(os.environ))  # fmt: skip
    assert done.returncode == 1 and "missing.key" in done.stderr
