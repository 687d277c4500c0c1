"""Out of rotation as soon as an injected pod's deletion starts.

In Kubernetes the registry, not the cluster's Endpoints, decides where callers send a
request, so nothing would take a terminating pod out of rotation before its app stops
listening. With native sidecars the kubelet stops the app first and the sidecar last,
so the sidecar's own `preStop` (`tether prestop`) runs too late to help. The control
plane therefore watches pods through the Kubernetes API (`controlplane.kube`): when a
pod that was injected (`tether.dev/status: injected`) gets a `deletionTimestamp`, it
puts the pod's instances in maintenance in the registry (Consul's
`/v1/agent/service/maintenance/:id`), which removes them from every caller's
`?passing` discovery at once. The injector gives the app container a short `preStop`
sleep (when it has no hook of its own), so the app keeps serving while callers learn.

The pod's instances are the registry's services whose `Meta.pod` is the pod's name in
the pod's namespace (the injected sidecar registers `--meta pod=$(POD_NAME)`). Every
replica of the control plane does this; maintenance is idempotent.

It runs when the control plane finds a Kubernetes API server (`KubeConfig.from_env`);
`TETHER_K8S_WATCH_PODS=0` turns it off. It needs `get`, `list` and `watch` on pods
(deploy/kubernetes/controlplane.yaml's ClusterRole).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from controlplane.inject.manifests import STATUS
from controlplane.kube import Gone, KubeClient, KubeConfig, KubeError

if TYPE_CHECKING:
    from controlplane.server import ControlPlane

log = logging.getLogger("tether.controlplane.podwatch")

PODS = "/api/v1/pods"
# Uids of pods already taken out of rotation (forgotten when the pod is deleted); a
# bound so that a stream of odd events cannot grow it without limit.
MAX_REMEMBERED = 100_000


def terminating_injected(pod: Mapping[str, Any]) -> tuple[str, str, str] | None:
    """(uid, namespace, name) of an injected pod whose deletion has started, else None."""
    meta = pod.get("metadata")
    if not isinstance(meta, dict) or not meta.get("deletionTimestamp"):
        return None
    annotations = meta.get("annotations") or {}
    if not isinstance(annotations, dict) or annotations.get(STATUS) != "injected":
        return None
    name, uid = meta.get("name"), meta.get("uid") or meta.get("name")
    if not isinstance(name, str) or not isinstance(uid, str):
        return None
    return uid, str(meta.get("namespace") or "default"), name


def pod_instances(services: Mapping[str, Any], namespace: str, name: str) -> list[str]:
    """Ids of the registry's services registered by the sidecar of pod `namespace/name`."""
    out = []
    for sid, svc in services.items():
        meta = (svc or {}).get("Meta") or {}
        if meta.get("pod") == name and meta.get("namespace", "default") == namespace:
            out.append(sid)
    return sorted(out)


class PodWatcher:
    def __init__(
        self,
        kube: KubeClient,
        consul: Any,
        *,
        retry: float = 1.0,
        max_retry: float = 30.0,
        server_timeout: int = 300,
    ) -> None:
        self.kube = kube
        self.consul = consul
        self.retry = retry
        self.max_retry = max_retry
        self.server_timeout = server_timeout
        self.done: set[str] = set()
        self.pending: dict[str, asyncio.Task[None]] = {}
        # Instances taken out of rotation, for the tests and the log.
        self.drained = 0
        self.synced = asyncio.Event()

    async def run(self) -> None:
        delay = self.retry
        while True:
            try:
                await self._list_and_watch()
                delay = self.retry
            except Gone:
                continue  # list again from now
            except KubeError as exc:
                log.warning("pod watch: %s; again in %.0fs", exc, delay)
                await asyncio.sleep(delay * (0.5 + random.random()))
                delay = min(delay * 2, self.max_retry)

    async def _list_and_watch(self) -> None:
        pods = await self.kube.list(PODS)
        version = str((pods.get("metadata") or {}).get("resourceVersion") or "")
        for pod in pods.get("items") or ():
            if isinstance(pod, dict):
                self._seen(pod)
        self.synced.set()
        while True:
            async for event in self.kube.watch(PODS, version, server_timeout=self.server_timeout):
                obj = event["object"]
                version = str((obj.get("metadata") or {}).get("resourceVersion") or version)
                kind = event.get("type")
                if kind in ("ADDED", "MODIFIED"):
                    self._seen(obj)
                elif kind == "DELETED":
                    uid = (obj.get("metadata") or {}).get("uid")
                    self.done.discard(str(uid))

    def _seen(self, pod: Mapping[str, Any]) -> None:
        found = terminating_injected(pod)
        if found is None:
            return
        uid, namespace, name = found
        if uid in self.done or uid in self.pending:
            return
        if len(self.done) >= MAX_REMEMBERED:
            self.done.clear()
        task = asyncio.create_task(self._drain(uid, namespace, name), name=f"drain-{name}")
        self.pending[uid] = task
        task.add_done_callback(lambda _: self.pending.pop(uid, None))

    async def _drain(self, uid: str, namespace: str, name: str) -> None:
        delay = self.retry
        for _ in range(8):
            try:
                services = await asyncio.wait_for(self.consul.agent.services(), 5.0)
                ids = pod_instances(services or {}, namespace, name)
                for sid in ids:
                    await asyncio.wait_for(
                        self.consul.agent.service.maintenance(
                            sid, "true", reason=f"pod {namespace}/{name} terminating"
                        ),
                        5.0,
                    )
                self.done.add(uid)
                self.drained += len(ids)
                if ids:
                    log.info("pod %s/%s terminating: %s out of rotation", namespace, name, ids)
                return
            except Exception as exc:  # the registry away for a moment: try again
                log.warning("pod %s/%s: maintenance not set: %s", namespace, name, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.max_retry)

    async def aclose(self) -> None:
        for task in list(self.pending.values()):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


def install(cp: ControlPlane) -> None:
    """Watch pods while the control plane runs, when it runs under Kubernetes."""
    state: dict[str, Any] = {}

    async def start(_: Any) -> None:
        config = KubeConfig.from_env()
        if config is None or os.environ.get("TETHER_K8S_WATCH_PODS", "1") == "0":
            return
        kube = KubeClient(config)
        watcher = PodWatcher(kube, cp.consul)
        state.update(kube=kube, watcher=watcher)
        state["task"] = asyncio.create_task(watcher.run(), name="controlplane-podwatch")
        cp.pod_watcher = watcher
        log.info("watching pods at %s: terminating injected pods leave rotation", config.url)

    async def stop(_: Any) -> None:
        task = state.pop("task", None)
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if "watcher" in state:
            await state.pop("watcher").aclose()
        if "kube" in state:
            await state.pop("kube").close()

    cp.app.on_startup.append(start)
    cp.app.on_cleanup.append(stop)
