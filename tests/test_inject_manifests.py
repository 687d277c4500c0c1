"""`tether inject` on Kubernetes manifests: golden files for every workload kind and for
Online Boutique, validated with kubernetes-validate (strict, Kubernetes 1.30), and the
properties the issue asks for (one function with the webhook, nothing added, only
workloads changed, idempotent)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from controlplane.inject.compose import ComposeSpec
from controlplane.inject.errors import InjectError
from controlplane.inject.files import inject_text
from controlplane.inject.jsonpatch import apply
from controlplane.inject.manifests import InjectSpec, pod_patch, pod_templates
from tests.conftest import run_tether

DATA = Path(__file__).parent / "data" / "inject"
KINDS = sorted(p for p in (DATA / "kinds").glob("*.yaml") if ".injected" not in p.name)
K8S_VERSION = "1.30.0"

kubernetes_validate = pytest.importorskip(
    "kubernetes_validate",
    reason="kubernetes-validate is in the test extras (make .venv/.installed)",
)


def validate_all(text: str) -> list[dict[str, Any]]:
    """Every document of `text`, each accepted by the Kubernetes 1.30 schema, strictly."""
    docs = [d for d in yaml.safe_load_all(text) if d is not None]
    for doc in docs:
        # A List has no schema of its own (kubectl reads it client-side): its items do.
        for item in doc["items"] if doc["kind"] == "List" else [doc]:
            kubernetes_validate.validate(item, K8S_VERSION, strict=True)
    return docs


def golden(path: Path, text: str) -> None:
    want = path.with_name(path.name.replace(".yaml", ".injected.yaml"))
    if os.environ.get("TETHER_UPDATE_GOLDEN"):
        want.write_text(text)
    assert text == want.read_text(), f"{want.name} differs (TETHER_UPDATE_GOLDEN=1 rewrites)"


def inject(text: str, **spec: Any) -> str:
    return inject_text(text, InjectSpec(**spec), ComposeSpec()).text


@pytest.mark.parametrize("path", KINDS, ids=lambda p: p.stem)
def test_every_kind_golden_and_valid(path: Path) -> None:
    source = path.read_text()
    validate_all(source)
    out = inject(source)
    golden(path, out)
    before, after = validate_all(source), validate_all(out)
    assert len(before) == len(after)  # no documents added
    templates = [t for d in after for t in pod_templates(d)]
    assert templates
    injected = 0
    for doc in after:
        for where, name in pod_templates(doc):
            template = doc
            for key in where:
                template = template[key]
            annotations = template["metadata"].get("annotations") or {}
            if annotations.get("tether.dev/inject") == "disabled":
                assert "tether.dev/status" not in annotations, name
                continue
            injected += 1
            assert annotations["tether.dev/status"] == "injected"
            sidecars = [
                c for c in template["spec"]["initContainers"] if c["name"] == "tether-proxy"
            ]
            (sidecar,) = sidecars
            assert sidecar["restartPolicy"] == "Always"  # native: Jobs complete
            assert sidecar["lifecycle"]["preStop"]["exec"]["command"][:2] == ["tether", "prestop"]
            for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
                assert "127.0.0.1:15000" in " ".join(sidecar[probe]["exec"]["command"])
            for c in template["spec"]["containers"]:
                env = {e["name"]: e.get("value") for e in c.get("env", ())}
                assert env["HTTP_PROXY"] == "http://127.0.0.1:15001"
                own = env.get("NO_PROXY") == "internal.example"  # the app's own, kept
                assert own or ("NO_PROXY" in env and "no_proxy" in env)
            vols = {v["name"]: v for v in template["spec"]["volumes"]}
            token = vols["tether-identity"]["projected"]["sources"][0]["serviceAccountToken"]
            assert token["audience"] == "tether"
    assert injected
    # Idempotent: injecting the output changes nothing.
    assert inject(out) == out


def test_webhook_and_cli_share_one_function() -> None:
    """What `tether inject` writes for a pod is the webhook's patch applied to it."""
    pod = yaml.safe_load((DATA / "kinds" / "pod.yaml").read_text())
    result = pod_patch(pod, InjectSpec(), {"tether.dev/inject": "enabled"}, "orders")
    assert result.injected
    (cli,) = [d for d in yaml.safe_load_all(inject((DATA / "kinds" / "pod.yaml").read_text()))]
    assert apply(pod, result.patch) == cli
    # The registry checks the app on the path of its own readiness probe.
    args = cli["spec"]["initContainers"][0]["args"]
    assert args[args.index("--app-health-path") + 1] == "/health"
    assert args[args.index("--app-port") + 1] == "8080"


def test_online_boutique_golden_valid_and_only_workloads_change() -> None:
    source = (DATA / "online-boutique.yaml").read_text()
    out = inject(source)
    golden(DATA / "online-boutique.yaml", out)
    before, after = validate_all(source), validate_all(out)
    assert len(after) == len(before) == 35
    changed = [b["kind"] for b, a in zip(before, after, strict=True) if a != b]
    assert changed == ["Deployment"] * 12  # the eleven services and the load generator
    for b, a in zip(before, after, strict=True):
        if b["kind"] != "Deployment":
            assert a == b
    # Documents the injector does not change keep their text: comments and all.
    assert "# [START gke_release_kubernetes_manifests_microservices_demo]" in out
    assert out.count("kind: Service\n") == source.count("kind: Service\n")


def test_no_native_sidecar_and_iptables_capture_valid() -> None:
    source = (DATA / "kinds" / "job.yaml").read_text()
    out = inject(source, native=False, capture="iptables")
    (job,) = validate_all(out)
    spec = job["spec"]["template"]["spec"]
    assert spec["shareProcessNamespace"] is True
    sidecar = spec["containers"][-1]
    assert sidecar["name"] == "tether-proxy" and "restartPolicy" not in sidecar
    # Without native sidecars the sidecar leaves when the app's processes are gone.
    assert sidecar["command"] == ["tether", "pod-sidecar", "--exit-with-app", "--"]
    (init,) = spec["initContainers"]
    assert init["securityContext"]["capabilities"]["add"] == ["NET_ADMIN", "NET_RAW"]
    assert "REDIRECT --to-ports 15001" in init["command"][2]
    assert "--uid-owner 10001 -j RETURN" in init["command"][2]


def test_opt_in_and_opt_out() -> None:
    pod = yaml.safe_load((DATA / "kinds" / "pod.yaml").read_text())
    assert not pod_patch(pod, InjectSpec(), {}).injected  # no label, no annotation
    assert pod_patch(pod, InjectSpec(), {"tether.dev/inject": "enabled"}).injected
    pod["metadata"]["annotations"] = {"tether.dev/inject": "disabled"}
    result = pod_patch(pod, InjectSpec(), {"tether.dev/inject": "enabled"})
    assert not result.injected and "disabled" in result.reason
    pod["metadata"]["annotations"] = {"tether.dev/inject": "enabled"}
    assert pod_patch(pod, InjectSpec(), {}).injected


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("tether.dev/port", "http"),
        ("tether.dev/proxy-cpu", "lots"),
        ("tether.dev/log-level", "chatty"),
        ("tether.dev/inject", "yes"),
        ("tether.dev/exclude-outbound-ports", "5432,x"),
    ],
)
def test_bad_annotation_names_the_field(key: str, value: str) -> None:
    pod = yaml.safe_load((DATA / "kinds" / "pod.yaml").read_text())
    pod["metadata"]["annotations"] = {key: value}
    with pytest.raises(InjectError, match=key.replace(".", r"\.")):
        pod_patch(pod, InjectSpec(capture="iptables"), None)


def test_cli_reads_stdin_and_reports_errors() -> None:
    env = dict(os.environ)
    source = (DATA / "kinds" / "cronjob.yaml").read_text()
    done = run_tether("inject", "-f", "-", env=env, stdin=source)
    assert done.returncode == 0, done.stderr
    assert done.stdout == (DATA / "kinds" / "cronjob.injected.yaml").read_text()
    bad = source.replace("app: cleanup", "app: cleanup\n          annotations:\n"
                         "            tether.dev/port: '99999'")  # fmt: skip
    done = run_tether("inject", "-f", "-", env=env, stdin=bad)
    assert done.returncode == 1
    assert "CronJob/cleanup" in done.stderr and "tether.dev/port" in done.stderr
    done = run_tether("inject", "-f", "-", env=env, stdin="a: [unclosed\n")
    assert done.returncode == 1 and "not valid YAML" in done.stderr
