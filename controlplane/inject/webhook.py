"""The Kubernetes mutating admission webhook: AdmissionReview (admission.k8s.io/v1) in,
the sidecar's JSON Patch (`manifests.pod_patch`) out, over HTTPS.

Two paths, because an AdmissionReview does not carry the namespace's labels: the
webhook configuration (`deploy/kubernetes/webhook.yaml`) sends pods of namespaces
labelled `tether.dev/inject: enabled` to `/inject/namespace-enabled`, and pods of every
other namespace (but `disabled` ones and the system's) to `/inject`, where only the
pod's own annotation opts in. Pods only, on CREATE; everything else is allowed as it
is. A pod with a bad `tether.dev/*` annotation is refused with a message naming it.

The webhook keeps no state and changes nothing but the pod in the review it answers.
Its listener has the caps and timeouts of every Tether listener (`tether/http_limits.py`:
256 connections, a request head within 30 s, a body within 10 s) and a body size
limit of 3 MiB; the
configuration's `failurePolicy: Ignore` and `timeoutSeconds: 5` keep a webhook that is
down from blocking a cluster (pods are then created without a sidecar).
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from controlplane.inject.errors import CertificateError, InjectError
from controlplane.inject.manifests import InjectSpec, pod_patch
from tether import json_depth
from tether.http_limits import LimitedSite, ListenerLimits
from tether.http_limits import serve as serve_http

log = logging.getLogger("tether.webhook")

MAX_BODY = 3 << 20  # the API server sends at most ~1.5 MiB objects
NAMESPACE_ENABLED = {"tether.dev/inject": "enabled"}
# Its only callers are the API servers: a few connections each, reviews answered at once.
WEBHOOK_LIMITS = ListenerLimits(max_connections=256, idle_timeout=30.0, body_timeout=10.0)


@dataclass
class WebhookSpec:
    """Where and how the webhook serves (its flags)."""

    tls_cert: Path
    tls_key: Path
    host: str = "0.0.0.0"
    port: int = 8443
    limits: ListenerLimits = WEBHOOK_LIMITS
    inject: InjectSpec = field(default_factory=InjectSpec)


def review_response(review: Any, spec: InjectSpec, namespace_enabled: bool) -> dict[str, Any]:
    """The AdmissionReview answering `review` (raises `InjectError` for a bad review)."""
    if not isinstance(review, dict) or review.get("kind") != "AdmissionReview":
        raise InjectError("kind: not an AdmissionReview")
    if review.get("apiVersion") != "admission.k8s.io/v1":
        raise InjectError(f"apiVersion: {review.get('apiVersion')!r} is not admission.k8s.io/v1")
    request = review.get("request")
    if not isinstance(request, dict) or not isinstance(request.get("uid"), str):
        raise InjectError("request.uid: missing")
    response: dict[str, Any] = {"uid": request["uid"], "allowed": True}
    kind = request.get("kind") or {}
    pod = request.get("object")
    if (
        kind.get("kind") == "Pod"
        and kind.get("group", "") == ""
        and request.get("operation") == "CREATE"
        and not request.get("subResource")
        and isinstance(pod, dict)
    ):
        labels = NAMESPACE_ENABLED if namespace_enabled else {}
        meta = pod.get("metadata") or {}
        hint = str(meta.get("name") or meta.get("generateName") or "")
        try:
            result = pod_patch(pod, spec, labels, hint)
        except InjectError as exc:
            response["allowed"] = False
            response["status"] = {
                "code": 400,
                "reason": "BadRequest",
                "message": f"tether sidecar injection: {exc}",
            }
        else:
            if result.injected:
                response["patchType"] = "JSONPatch"
                response["patch"] = base64.b64encode(
                    json.dumps(result.patch, separators=(",", ":")).encode()
                ).decode()
            where = f"{request.get('namespace', '')}/{hint}"
            log.info("pod %s: %s", where, result.reason)
    return {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "response": response}


class WebhookServer:
    """The HTTPS webhook; `port` is the bound port after `start`."""

    def __init__(self, spec: WebhookSpec) -> None:
        self.spec = spec
        self.port = spec.port
        self._runner: web.AppRunner | None = None
        self.site: LimitedSite | None = None
        app = web.Application(client_max_size=MAX_BODY)
        app.router.add_post("/inject", self._inject)
        app.router.add_post("/inject/namespace-enabled", self._inject_namespace)
        app.router.add_get("/healthz", self._healthz)
        self.app = app

    def tls_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            ctx.load_cert_chain(self.spec.tls_cert, self.spec.tls_key)
        except (OSError, ssl.SSLError) as exc:
            raise CertificateError(
                f"--tls-cert {self.spec.tls_cert}, --tls-key {self.spec.tls_key}: {exc}"
            ) from None
        return ctx

    async def start(self) -> None:
        ctx = self.tls_context()  # a bad certificate fails here, before listening
        self._runner, self.site = await serve_http(
            self.app, self.spec.host, self.spec.port, self.spec.limits, ssl_context=ctx
        )
        self.port = self.site.port

    async def aclose(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _review(self, request: web.Request, namespace_enabled: bool) -> web.Response:
        try:
            body = json_depth.loads(await request.text())
        except web.HTTPRequestEntityTooLarge:
            return web.json_response({"error": f"the body is over {MAX_BODY} bytes"}, status=413)
        except json_depth.JSONDepthError as exc:
            return web.json_response({"error": str(exc)}, status=400)
        except (ValueError, UnicodeDecodeError):
            return web.json_response({"error": "the body is not JSON"}, status=400)
        try:
            answer = review_response(body, self.spec.inject, namespace_enabled)
        except InjectError as exc:
            return web.json_response({"error": str(exc)}, status=400)
        return web.json_response(answer)

    async def _inject(self, request: web.Request) -> web.Response:
        return await self._review(request, False)

    async def _inject_namespace(self, request: web.Request) -> web.Response:
        return await self._review(request, True)

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    def __repr__(self) -> str:
        return f"<WebhookServer https://{self.spec.host}:{self.port}>"


async def serve(spec: WebhookSpec) -> None:
    """Run the webhook until cancelled."""
    server = WebhookServer(spec)
    await server.start()
    print(f"tether webhook: listening https://{spec.host}:{server.port}", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await server.aclose()
