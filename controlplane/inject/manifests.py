"""Kubernetes sidecar injection: the one function (`pod_patch`) that turns a pod into
the JSON Patch adding its sidecar, behind both the admission webhook and `tether inject`.

`pod_patch` reads only the pod (or a workload's pod template: the same `metadata` and
`spec`), the namespace's labels and the injector's `InjectSpec`, and answers with the
RFC 6902 operations or the reason it leaves the pod alone. The webhook sends the
operations to the API server; `tether inject` applies them to each pod template of a
manifest (`inject_documents`), so both give the same pod.

What a patched pod gets:
- the sidecar (`tether sidecar`): a native sidecar (an init container with
  `restartPolicy: Always`, Kubernetes 1.29+), which the kubelet starts before the app
  (its startup probe is the admin `/ready`) and stops after every app container; or,
  with `native=False`, an ordinary container that a shared process namespace lets
  leave once the app's processes have exited (`tether pod-sidecar`), so Jobs complete;
- readiness, liveness and startup probes on the admin port (127.0.0.1 only, so they
  are `exec` probes run inside the sidecar), resources, and a `preStop` hook
  (`tether prestop`) that puts the instance in maintenance (out of rotation) and waits
  until the app has closed its port before the sidecar's own SIGTERM drain;
- the identity bootstrap: a projected service-account token (audience `tether`);
- in every app container, `HTTP_PROXY` to the sidecar and `NO_PROXY` for the loopback
  and the Kubernetes API, unless the container sets them itself;
- with `capture="iptables"`, an init container (NET_ADMIN) that redirects the app's
  outbound TCP to the sidecar's outbound listener;
- the annotation `tether.dev/status: injected`, by which an injected pod is left alone.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from controlplane.inject.errors import AnnotationError, InjectError
from controlplane.inject.jsonpatch import Operation, apply, escape

PREFIX = "tether.dev/"
INJECT = PREFIX + "inject"  # pod annotation or namespace label: enabled | disabled
STATUS = PREFIX + "status"  # written by the injector: injected
SERVICE = PREFIX + "service"  # the mesh service name (default: app labels)
PORT = PREFIX + "port"  # the app port (default: the first containerPort)
LOG_LEVEL = PREFIX + "log-level"
EXCLUDE_OUTBOUND = PREFIX + "exclude-outbound-ports"  # iptables capture leaves them alone
# Seconds an app container keeps serving after its pod's deletion starts, while callers
# learn it is out of rotation (native sidecars; 0: none). See controlplane/inject/podwatch.py.
STOP_DELAY = PREFIX + "app-stop-delay"
RESOURCE_ANNOTATIONS = {
    PREFIX + "proxy-cpu": ("requests", "cpu"),
    PREFIX + "proxy-memory": ("requests", "memory"),
    PREFIX + "proxy-cpu-limit": ("limits", "cpu"),
    PREFIX + "proxy-memory-limit": ("limits", "memory"),
}

SIDECAR_NAME = "tether-proxy"
CAPTURE_NAME = "tether-init"
IDENTITY_VOLUME = "tether-identity"
IDENTITY_DIR = "/var/run/secrets/tether"
OUTBOUND_PORT = 15001
INBOUND_PORT = 15006
ADMIN_PORT = 15000
SIDECAR_UID = 10001  # the image's `tether` user; iptables capture exempts its traffic

LOG_LEVELS = ("debug", "info", "warning", "error")
_QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(m|k|Ki|M|Mi|G|Gi|T|Ti|E|Ei|P|Pi)?$")
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")

# kind -> where its pod template is (None: the document is the pod).
WORKLOADS: dict[str, tuple[str, ...] | None] = {
    "Pod": None,
    "Deployment": ("spec", "template"),
    "StatefulSet": ("spec", "template"),
    "DaemonSet": ("spec", "template"),
    "ReplicaSet": ("spec", "template"),
    "ReplicationController": ("spec", "template"),
    "Job": ("spec", "template"),
    "CronJob": ("spec", "jobTemplate", "spec", "template"),
}


@dataclass(frozen=True)
class InjectSpec:
    """How the injector builds sidecars (the webhook's and `tether inject`'s flags)."""

    image: str = "tether:0.1.0"
    registry: str = "tether-registry.tether-system.svc:8500"  # CONSUL_HTTP_ADDR
    controlplane: str | None = "http://tether-controlplane.tether-system.svc:15010"
    native: bool = True  # native sidecars (Kubernetes 1.29+)
    capture: Literal["proxy", "iptables"] = "proxy"
    drain_seconds: float = 10.0
    # The app containers' preStop sleep with native sidecars (STOP_DELAY overrides).
    app_stop_delay: int = 5
    log_level: str = "info"
    resources: Mapping[str, Mapping[str, str]] = field(
        default_factory=lambda: {
            "requests": {"cpu": "100m", "memory": "64Mi"},
            "limits": {"memory": "256Mi"},
        }
    )
    token_audience: str = "tether"

    @classmethod
    def from_flags(
        cls,
        image: str,
        native: bool,
        capture: str,
        registry: str | None = None,
        controlplane: str | None = None,
    ) -> InjectSpec:
        """The spec of the webhook's and `tether inject`'s flags (None: the default)."""
        spec = cls(
            image=image, native=native, capture="iptables" if capture == "iptables" else "proxy"
        )
        if registry:
            spec = replace(spec, registry=registry)
        if controlplane:
            spec = replace(spec, controlplane=controlplane)
        return spec


@dataclass(frozen=True)
class Injection:
    """The answer for one pod: the patch, or no patch and why."""

    patch: list[Operation]
    reason: str  # "injected", or why the pod is left alone

    @property
    def injected(self) -> bool:
        return bool(self.patch)


def wants_injection(
    annotations: Mapping[str, str], namespace_labels: Mapping[str, str] | None
) -> tuple[bool, str]:
    """Opt-in by the pod's annotation or else the namespace's label; `disabled` wins
    on the pod. `namespace_labels=None` means the caller asked for injection
    (`tether inject`), as a namespace label would."""
    pod = annotations.get(INJECT)
    if pod is not None and pod not in ("enabled", "disabled"):
        raise AnnotationError(
            f"metadata.annotations[{INJECT}]", f"{pod!r} is not enabled or disabled"
        )
    if pod == "disabled":
        return False, f"{INJECT}: disabled on the pod"
    if pod == "enabled":
        return True, f"{INJECT}: enabled on the pod"
    if namespace_labels is None:
        return True, "asked for"
    label = namespace_labels.get(INJECT)
    if label == "enabled":
        return True, f"{INJECT}: enabled on the namespace"
    return False, f"no {INJECT} annotation on the pod or label on its namespace"


def _port(value: str, where: str) -> int:
    if not value.isdigit() or not 0 < int(value) < 65536:
        raise AnnotationError(where, f"{value!r} is not a port (1-65535)")
    return int(value)


def _app_containers(spec: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    containers = spec.get("containers")
    if not isinstance(containers, list) or not containers:
        raise InjectError("spec.containers: a pod needs at least one container")
    return [c for c in containers if isinstance(c, dict)]


def service_name(meta: Mapping[str, Any], name_hint: str) -> str:
    """The mesh service: annotation, else `app.kubernetes.io/name` or `app` label,
    else the workload's (or pod's) name."""
    annotations = meta.get("annotations") or {}
    labels = meta.get("labels") or {}
    if SERVICE in annotations:
        name = str(annotations[SERVICE])
        if not _DNS_LABEL.match(name):
            raise AnnotationError(
                f"metadata.annotations[{SERVICE}]", f"{name!r} is not a DNS label"
            )
        return name
    for key in ("app.kubernetes.io/name", "app"):
        value = labels.get(key)
        if isinstance(value, str) and _DNS_LABEL.match(value):
            return value
    hint = (name_hint or str(meta.get("name") or meta.get("generateName") or "")).strip("-")
    if not _DNS_LABEL.match(hint):
        raise InjectError(
            f"cannot tell the pod's service name: set the {SERVICE} annotation "
            f"or an app.kubernetes.io/name label"
        )
    return hint


def app_port(annotations: Mapping[str, str], containers: Sequence[Mapping[str, Any]]) -> int | None:
    """The port the sidecar hands inbound calls to: the annotation, else the first
    TCP containerPort of the app containers (None: an outbound-only pod)."""
    if PORT in annotations:
        return _port(str(annotations[PORT]), f"metadata.annotations[{PORT}]")
    for c in containers:
        for p in c.get("ports") or ():
            if isinstance(p, dict) and p.get("protocol", "TCP") == "TCP":
                port = p.get("containerPort")
                if isinstance(port, int):
                    return port
    return None


def health_path(containers: Sequence[Mapping[str, Any]], port: int) -> str | None:
    """The app's own HTTP readiness path on `port`, for the registry's app check."""
    for c in containers:
        probe = (c.get("readinessProbe") or {}).get("httpGet") or {}
        if probe.get("port") == port or any(
            isinstance(p, dict)
            and p.get("name") == probe.get("port")
            and p.get("containerPort") == port
            for p in c.get("ports") or ()
        ):
            path = probe.get("path")
            if isinstance(path, str) and path.startswith("/"):
                return path
    return None


def sidecar_resources(
    annotations: Mapping[str, str], spec: InjectSpec
) -> dict[str, dict[str, str]]:
    out = {k: dict(v) for k, v in spec.resources.items()}
    for key, (section, resource) in RESOURCE_ANNOTATIONS.items():
        if key in annotations:
            value = str(annotations[key])
            if not _QUANTITY.match(value):
                raise AnnotationError(
                    f"metadata.annotations[{key}]", f"{value!r} is not a resource quantity"
                )
            out.setdefault(section, {})[resource] = value
    return {k: v for k, v in out.items() if v}


def _probe(path: str, period: int, failures: int) -> dict[str, Any]:
    # The admin listener binds 127.0.0.1 only, which the kubelet's httpGet cannot
    # reach (it dials the pod IP): the probe runs inside the sidecar.
    code = (
        "import urllib.request;"
        f"urllib.request.urlopen('http://127.0.0.1:{ADMIN_PORT}{path}', timeout=2)"
    )
    return {
        "exec": {"command": ["python", "-c", code]},
        "periodSeconds": period,
        "timeoutSeconds": 3,
        "failureThreshold": failures,
    }


def sidecar_container(
    service: str,
    port: int | None,
    path: str | None,
    annotations: Mapping[str, str],
    spec: InjectSpec,
) -> dict[str, Any]:
    """The `tether sidecar` container for one pod."""
    level = str(annotations.get(LOG_LEVEL, spec.log_level)).lower()
    if level not in LOG_LEVELS:
        raise AnnotationError(
            f"metadata.annotations[{LOG_LEVEL}]", f"{level!r} is not one of {', '.join(LOG_LEVELS)}"
        )
    args = [
        "sidecar", "--service", service,
        # An outbound-only pod has no app port: the sidecar's own inbound port stands
        # for it, so the instance registers and its app check never passes.
        "--app-port", str(port or INBOUND_PORT),
        "--inbound-host", "0.0.0.0", "--advertise-host", "$(POD_IP)",
        "--namespace", "$(POD_NAMESPACE)", "--meta", "pod=$(POD_NAME)",
        "--app-check-via", "inbound",
        "--drain-seconds", f"{spec.drain_seconds:g}",
    ]  # fmt: skip
    if path:
        args += ["--app-health-path", path]
    if spec.controlplane:
        args += ["--controlplane", spec.controlplane]
    prestop = ["tether", "prestop", "--service", service, "--address", "$(POD_IP)",
               "--port", str(INBOUND_PORT), "--timeout", f"{spec.drain_seconds:g}"]  # fmt: skip
    if port:
        prestop += ["--app-port", str(port)]
    container: dict[str, Any] = {
        "name": SIDECAR_NAME,
        "image": spec.image,
        "args": args,
        "env": [
            {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
            {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {
                "name": "POD_NAMESPACE",
                "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}},
            },
            {"name": "CONSUL_HTTP_ADDR", "value": spec.registry},
            {"name": "TETHER_LOG_LEVEL", "value": level},
            {"name": "TETHER_IDENTITY_TOKEN", "value": f"{IDENTITY_DIR}/token"},
        ],
        "ports": [
            {"name": "tether-inbound", "containerPort": INBOUND_PORT, "protocol": "TCP"},
        ],
        "resources": sidecar_resources(annotations, spec),
        "startupProbe": _probe("/ready", 1, 120),
        "readinessProbe": _probe("/ready", 5, 2),
        "livenessProbe": _probe("/live", 10, 3),
        "lifecycle": {"preStop": {"exec": {"command": prestop}}},
        "securityContext": {
            "runAsUser": SIDECAR_UID,
            "runAsGroup": SIDECAR_UID,
            "runAsNonRoot": True,
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
        },
        "volumeMounts": [{"name": IDENTITY_VOLUME, "mountPath": IDENTITY_DIR, "readOnly": True}],
    }
    if spec.native:
        container["restartPolicy"] = "Always"
    else:
        # Without native sidecars nothing stops this container when a Job's app
        # finishes: `tether pod-sidecar` sees the app's processes (shared process
        # namespace) and stops the sidecar once they are all gone.
        container["command"] = ["tether", "pod-sidecar", "--exit-with-app", "--"]
        container["args"] = ["tether", *args]
    return container


def capture_container(annotations: Mapping[str, str], spec: InjectSpec) -> dict[str, Any]:
    """The init container that redirects the app's outbound TCP to the sidecar."""
    excluded: list[int] = []
    raw = str(annotations.get(EXCLUDE_OUTBOUND, "")).strip()
    where = f"metadata.annotations[{EXCLUDE_OUTBOUND}]"
    for item in filter(None, (p.strip() for p in raw.split(","))):
        excluded.append(_port(item, where))
    rules = [
        "iptables -t nat -N TETHER_OUTPUT",
        "iptables -t nat -A OUTPUT -p tcp -j TETHER_OUTPUT",
        # The sidecar's own connections (to the registry and other sidecars) go out.
        f"iptables -t nat -A TETHER_OUTPUT -m owner --uid-owner {SIDECAR_UID} -j RETURN",
        "iptables -t nat -A TETHER_OUTPUT -d 127.0.0.0/8 -j RETURN",
        *(f"iptables -t nat -A TETHER_OUTPUT -p tcp --dport {p} -j RETURN" for p in excluded),
        f"iptables -t nat -A TETHER_OUTPUT -p tcp -j REDIRECT --to-ports {OUTBOUND_PORT}",
    ]
    return {
        "name": CAPTURE_NAME,
        "image": spec.image,
        "command": ["sh", "-c", " && ".join(rules)],
        "resources": {"requests": {"cpu": "10m", "memory": "16Mi"}},
        "securityContext": {
            "runAsUser": 0,
            "runAsNonRoot": False,
            "capabilities": {"add": ["NET_ADMIN", "NET_RAW"], "drop": ["ALL"]},
        },
    }


def app_env(container: Mapping[str, Any]) -> list[dict[str, str]]:
    """The proxy variables an app container gets (those it does not set itself)."""
    proxy = f"http://127.0.0.1:{OUTBOUND_PORT}"
    # Loopback and the Kubernetes API go direct; `$(KUBERNETES_SERVICE_HOST)` is the
    # API's cluster IP, which the kubelet expands.
    no_proxy = ",".join(
        ("localhost", "127.0.0.1", "::1", "kubernetes.default.svc",
         "kubernetes.default.svc.cluster.local", "$(KUBERNETES_SERVICE_HOST)")
    )  # fmt: skip
    # A variable the container sets in either spelling is its own choice: both kept.
    have = {str(e.get("name")).upper() for e in container.get("env") or () if isinstance(e, dict)}
    wanted = (
        ("HTTP_PROXY", proxy), ("http_proxy", proxy),
        ("NO_PROXY", no_proxy), ("no_proxy", no_proxy),
    )  # fmt: skip
    return [{"name": n, "value": v} for n, v in wanted if n.upper() not in have]


def app_stop_delay(annotations: Mapping[str, str], spec: InjectSpec) -> int:
    """The app containers' preStop sleep, in seconds (0: none)."""
    if STOP_DELAY not in annotations:
        return spec.app_stop_delay
    raw = str(annotations[STOP_DELAY]).strip()
    if not raw.isdigit() or int(raw) > 300:
        raise AnnotationError(
            f"metadata.annotations[{STOP_DELAY}]", f"{raw!r} is not a whole number of seconds 0-300"
        )
    return int(raw)


def app_stop_ops(containers: Sequence[Mapping[str, Any]], seconds: int) -> list[Operation]:
    """A `preStop` sleep for each app container that has no preStop of its own.

    With native sidecars the kubelet signals the app first. The control plane sees the
    pod's deletion start and takes it out of rotation (controlplane/inject/podwatch.py);
    the sleep keeps the app serving meanwhile, so no caller is sent to a closed port.
    A container's own preStop is left alone: it is the app's own way to stop."""
    ops: list[Operation] = []
    hook = {"sleep": {"seconds": seconds}}
    for i, c in enumerate(containers):
        if not isinstance(c, dict):
            continue
        lifecycle = c.get("lifecycle")
        if not lifecycle:
            ops.append(
                {"op": "add", "path": f"/spec/containers/{i}/lifecycle", "value": {"preStop": hook}}
            )
        elif isinstance(lifecycle, dict) and "preStop" not in lifecycle:
            ops.append(
                {"op": "add", "path": f"/spec/containers/{i}/lifecycle/preStop", "value": hook}
            )
    return ops


def pod_patch(
    pod: Mapping[str, Any],
    spec: InjectSpec,
    namespace_labels: Mapping[str, str] | None = None,
    name_hint: str = "",
) -> Injection:
    """The JSON Patch (paths from the pod's root) that injects `pod`, or why none.

    `pod` is a Pod or a pod template (`metadata`, `spec`). Raises `InjectError` for a
    pod that asks for injection with bad annotations."""
    meta = pod.get("metadata") or {}
    pod_spec = pod.get("spec")
    if not isinstance(meta, dict) or not isinstance(pod_spec, dict):
        raise InjectError("a pod needs metadata and spec")
    annotations = {str(k): str(v) for k, v in (meta.get("annotations") or {}).items()}
    if annotations.get(STATUS) == "injected":
        return Injection([], f"already injected ({STATUS})")
    if any(
        isinstance(c, dict) and c.get("name") == SIDECAR_NAME
        for c in (*(pod_spec.get("containers") or ()), *(pod_spec.get("initContainers") or ()))
    ):
        return Injection([], f"already has a {SIDECAR_NAME} container")
    want, why = wants_injection(annotations, namespace_labels)
    if not want:
        return Injection([], why)
    if pod_spec.get("hostNetwork"):
        return Injection([], "hostNetwork pods share the node's network: not injected")
    apps = _app_containers(pod_spec)
    service = service_name(meta, name_hint)
    port = app_port(annotations, apps)
    path = health_path(apps, port) if port else None
    sidecar = sidecar_container(service, port, path, annotations, spec)

    ops: list[Operation] = []
    if "annotations" not in meta:
        ops.append({"op": "add", "path": "/metadata/annotations", "value": {}})
    ops.append(
        {"op": "add", "path": f"/metadata/annotations/{escape(STATUS)}", "value": "injected"}
    )

    inits: list[dict[str, Any]] = []
    if spec.capture == "iptables":
        inits.append(capture_container(annotations, spec))
    if spec.native:
        inits.append(sidecar)  # after the capture, before the pod's own init containers
    if inits:
        if pod_spec.get("initContainers"):
            for i, c in enumerate(inits):
                ops.append({"op": "add", "path": f"/spec/initContainers/{i}", "value": c})
        else:
            ops.append({"op": "add", "path": "/spec/initContainers", "value": inits})
    for i, c in enumerate(pod_spec["containers"]):
        env = app_env(c)
        if not env:
            continue
        if c.get("env"):
            ops += [{"op": "add", "path": f"/spec/containers/{i}/env/-", "value": e} for e in env]
        else:
            ops.append({"op": "add", "path": f"/spec/containers/{i}/env", "value": env})
    delay = app_stop_delay(annotations, spec)
    if spec.native and delay:
        ops += app_stop_ops(pod_spec["containers"], delay)
    if not spec.native:
        ops.append({"op": "add", "path": "/spec/containers/-", "value": sidecar})
        ops.append({"op": "add", "path": "/spec/shareProcessNamespace", "value": True})
    volume = {
        "name": IDENTITY_VOLUME,
        "projected": {
            "sources": [
                {
                    "serviceAccountToken": {
                        "audience": spec.token_audience,
                        "expirationSeconds": 3600,
                        "path": "token",
                    }
                }
            ]
        },
    }
    if pod_spec.get("volumes"):
        ops.append({"op": "add", "path": "/spec/volumes/-", "value": volume})
    else:
        ops.append({"op": "add", "path": "/spec/volumes", "value": [volume]})
    # The sidecar's preStop waits up to drain_seconds for the app, then drains for as
    # long again: the grace period must cover both.
    grace = int(pod_spec.get("terminationGracePeriodSeconds", 30))
    needed = int(2 * spec.drain_seconds) + 5 + (delay if spec.native else 0)
    if grace < needed:
        ops.append({"op": "add", "path": "/spec/terminationGracePeriodSeconds", "value": needed})
    return Injection(ops, "injected")


# -- manifests: every pod template of a workload, Lists, multi-document YAML ----------


def pod_templates(doc: Any) -> Iterator[tuple[tuple[str | int, ...], str]]:
    """(path to each pod template, `Kind/name` of its workload) in a Kubernetes object."""
    if not isinstance(doc, dict):
        return
    kind = doc.get("kind")
    if kind == "List" or (isinstance(kind, str) and kind.endswith("List")):
        for i, item in enumerate(doc.get("items") or ()):
            for path, name in pod_templates(item):
                yield ("items", i, *path), name
        return
    if not isinstance(kind, str) or kind not in WORKLOADS:
        return
    where = WORKLOADS[kind] or ()
    node: Any = doc
    for key in where:
        node = node.get(key) if isinstance(node, dict) else None
    if isinstance(node, dict):
        yield where, f"{kind}/{(doc.get('metadata') or {}).get('name') or ''}"


def _at(doc: Any, path: Sequence[str | int]) -> Any:
    for key in path:
        doc = doc[key]
    return doc


def inject_object(doc: Any, spec: InjectSpec) -> tuple[Any, list[str]]:
    """`doc` with each pod template injected as the webhook would (a copy), and one
    line per workload saying what happened."""
    notes: list[str] = []
    out = doc
    for path, where in pod_templates(doc):
        template = _at(doc, path)
        try:
            result = pod_patch(template, spec, None, where.partition("/")[2])
        except InjectError as exc:
            raise InjectError(f"{where}: {exc}") from None
        notes.append(f"{where}: {result.reason}")
        if result.injected:
            if out is doc:
                out = copy.deepcopy(doc)
            parent = _at(out, path[:-1]) if path else None
            patched = apply(template, result.patch)
            if parent is None:
                out = patched
            else:
                parent[path[-1]] = patched
    return out, notes
