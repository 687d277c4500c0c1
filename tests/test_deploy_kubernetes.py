"""`deploy/kubernetes/` and injected pods, checked without a cluster: every document
valid against Kubernetes 1.30 (strict), every `tether` command line accepted by the real
CLI, the webhook configuration pointing at routes the webhook serves, failing open with
a short timeout, and an injected Job's pod shaped so it completes and shuts down in
order (native sidecar; preStop; grace period)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from controlplane.inject.errors import InjectError
from controlplane.inject.manifests import InjectSpec, inject_object
from controlplane.inject.webhook import WebhookServer, WebhookSpec
from tests.test_compose import parse_tether

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy" / "kubernetes"
DATA = Path(__file__).parent / "data" / "inject"
kubernetes_validate = pytest.importorskip(
    "kubernetes_validate", reason="kubernetes-validate is in the test extras"
)


def documents() -> list[dict[str, Any]]:
    docs = []
    for path in sorted(DEPLOY.glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def by_kind(kind: str) -> list[dict[str, Any]]:
    return [d for d in documents() if d["kind"] == kind]


def containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    spec = doc["spec"]["template"]["spec"]
    return [*spec.get("initContainers", ()), *spec["containers"]]


def test_every_document_is_valid() -> None:
    docs = documents()
    assert {d["kind"] for d in docs} >= {
        "Namespace", "ServiceAccount", "StatefulSet", "Deployment", "Service",
        "MutatingWebhookConfiguration", "ClusterRoleBinding",
    }  # fmt: skip
    for doc in docs:
        kubernetes_validate.validate(doc, "1.30.0", strict=True)


def test_command_lines_parse_and_services_match() -> None:
    services = {(d["metadata"]["name"], d["metadata"]["namespace"]): d for d in by_kind("Service")}
    for workload in [*by_kind("Deployment"), *by_kind("StatefulSet")]:
        labels = workload["spec"]["template"]["metadata"]["labels"]
        for c in containers(workload):
            name, ctx = parse_tether(c["args"])
            port_names = {p["name"] for p in c["ports"]}
            for probe in ("readinessProbe", "livenessProbe"):
                assert c[probe]["httpGet"]["port"] in port_names
            svc = services[(workload["metadata"]["name"], workload["metadata"]["namespace"])]
            assert svc["spec"]["selector"].items() <= labels.items()
            assert {p["targetPort"] for p in svc["spec"]["ports"]} <= port_names
            if name == "webhook":
                assert ctx.params["port"] == c["ports"][0]["containerPort"]
                assert ctx.params["registry"] == "tether-registry.tether-system.svc:8500"


def test_webhook_configuration_fails_open_and_points_at_served_routes(tmp_path: Path) -> None:
    (config,) = by_kind("MutatingWebhookConfiguration")
    server = WebhookServer(WebhookSpec(tls_cert=tmp_path / "c", tls_key=tmp_path / "k"))
    routes = {r.resource.canonical for r in server.app.router.routes() if r.method == "POST"}
    paths = set()
    for hook in config["webhooks"]:
        assert hook["failurePolicy"] == "Ignore"  # a down webhook never blocks the cluster
        assert hook["timeoutSeconds"] <= 5
        assert hook["sideEffects"] == "None"
        assert hook["admissionReviewVersions"] == ["v1"]
        assert hook["rules"] == [{"operations": ["CREATE"], "apiGroups": [""],
                                  "apiVersions": ["v1"], "resources": ["pods"],
                                  "scope": "Namespaced"}]  # fmt: skip
        svc = hook["clientConfig"]["service"]
        assert (svc["name"], svc["namespace"], svc["port"]) == (
            "tether-webhook",
            "tether-system",
            443,
        )
        paths.add(svc["path"])
        excluded = [e for e in hook["namespaceSelector"]["matchExpressions"]
                    if e["key"] == "kubernetes.io/metadata.name"]  # fmt: skip
        assert excluded[0]["operator"] == "NotIn"
        assert {"kube-system", "tether-system"} <= set(excluded[0]["values"])
    assert paths == routes == {"/inject", "/inject/namespace-enabled"}


def test_injected_job_completes_and_stops_in_order() -> None:
    job = yaml.safe_load((DATA / "kinds" / "job.yaml").read_text())
    injected, _ = inject_object(job, InjectSpec())
    spec = injected["spec"]["template"]["spec"]
    (sidecar,) = spec["initContainers"]
    # Kubernetes 1.29+: an init container with restartPolicy Always is a sidecar: it
    # starts before the app (once its startupProbe passes), does not keep the Job's pod
    # from completing, and is stopped after every app container has exited.
    assert sidecar["restartPolicy"] == "Always" and "startupProbe" in sidecar
    assert spec["restartPolicy"] == "Never"
    prestop = sidecar["lifecycle"]["preStop"]["exec"]["command"]
    name, ctx = parse_tether(prestop[1:])
    assert name == "prestop" and ctx.params["service"] == "report"
    assert ctx.params["app_port"] is None  # no app port: nothing to wait for
    # Sidecar args parse as `tether sidecar` and make a valid SidecarSpec once the
    # kubelet has expanded $(POD_IP) and friends.
    env = {"POD_IP": "10.1.2.3", "POD_NAMESPACE": "batch", "POD_NAME": "report-x7k2p"}
    args = [re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], a) for a in sidecar["args"]]
    name, ctx = parse_tether(args)
    assert name == "sidecar" and ctx.params["advertise_host"] == "10.1.2.3"
    assert ctx.params["namespace"] == "batch"
    # Without native sidecars: the sidecar container leaves with the app.
    legacy, _ = inject_object(job, InjectSpec(native=False))
    legacy_spec = legacy["spec"]["template"]["spec"]
    container = legacy_spec["containers"][-1]
    name, ctx = parse_tether([*container["command"][1:], *container["args"]])
    assert name == "pod-sidecar" and ctx.params["exit_with_app"] is True
    assert legacy_spec["shareProcessNamespace"] is True


def test_grace_period_covers_the_prestop_wait_and_the_drain() -> None:
    deployment = yaml.safe_load((DATA / "kinds" / "daemonset.yaml").read_text())
    for drain in (10.0, 30.0):
        injected, _ = inject_object(deployment, InjectSpec(drain_seconds=drain))
        spec = injected["spec"]["template"]["spec"]
        assert spec["terminationGracePeriodSeconds"] >= 2 * drain


def test_app_keeps_serving_while_callers_learn_it_is_leaving() -> None:
    """Native sidecars: the kubelet signals the app first, so the app gets a preStop sleep
    while the control plane (which may watch pods) takes the pod out of rotation."""
    job = yaml.safe_load((DATA / "kinds" / "deployment.yaml").read_text())
    injected, _ = inject_object(job, InjectSpec())
    spec = injected["spec"]["template"]["spec"]
    for c in spec["containers"]:
        assert c["lifecycle"]["preStop"] == {"sleep": {"seconds": 5}}
    # Kubernetes' default grace (30 s) covers the sleep, the sidecar's wait and its drain.
    assert spec.get("terminationGracePeriodSeconds", 30) >= 5 + 2 * 10 + 5
    # A container's own preStop is its own way to stop: left alone.
    own = yaml.safe_load((DATA / "kinds" / "deployment.yaml").read_text())
    template = own["spec"]["template"]
    template["spec"]["containers"][0]["lifecycle"] = {"preStop": {"exec": {"command": ["x"]}}}
    template["metadata"].setdefault("annotations", {})
    injected, _ = inject_object(own, InjectSpec())
    (c, *_) = injected["spec"]["template"]["spec"]["containers"]
    assert c["lifecycle"]["preStop"] == {"exec": {"command": ["x"]}}
    # The annotation sets it; 0 turns it off; nonsense is refused naming the annotation.
    template["spec"]["containers"][0].pop("lifecycle")
    template["metadata"]["annotations"]["tether.dev/app-stop-delay"] = "0"
    injected, _ = inject_object(own, InjectSpec())
    assert "lifecycle" not in injected["spec"]["template"]["spec"]["containers"][0]
    template["metadata"]["annotations"]["tether.dev/app-stop-delay"] = "soon"
    with pytest.raises(InjectError, match="app-stop-delay"):
        inject_object(own, InjectSpec())
    # Clusters before 1.29 (no native sidecars) do not know the sleep action either.
    legacy, _ = inject_object(job, InjectSpec(native=False))
    apps = legacy["spec"]["template"]["spec"]["containers"][:-1]
    assert all("lifecycle" not in c for c in apps)


def test_controlplane_may_watch_pods() -> None:
    """The pod watch (controlplane/inject/podwatch.py) needs get/list/watch on pods, bound
    to the control plane's service account."""
    roles = {d["metadata"]["name"]: d for d in by_kind("ClusterRole")}
    bindings = by_kind("ClusterRoleBinding")
    granted = set()
    for b in bindings:
        subjects = {(s["name"], s.get("namespace")) for s in b["subjects"]}
        role = roles.get(b["roleRef"]["name"])
        if ("tether-controlplane", "tether-system") in subjects and role:
            for rule in role["rules"]:
                if "pods" in rule["resources"] and "" in rule["apiGroups"]:
                    granted |= set(rule["verbs"])
    assert granted >= {"get", "list", "watch"}
