"""Progressive delivery: the control plane drives a TrafficSplit's canary `analysis`.

A TrafficSplit with `spec.analysis` names a canary subset, a stable one, a schedule of
canary weights (`steps`, each held for `interval`) and thresholds on the canary's
success rate and p99 latency. `CanaryController` ticks every `tick` seconds; for each
such split it reads the canary's numbers (the requests to `svc.ns` subset `canary`
over the stats window, summed over every caller, from the stats the sidecars report:
controlplane/meshstats.py, every replica's merged) and `advance` decides:

- no status for this generation of the spec: start at the first step;
- a threshold broken, once the window holds `minRequests` of the canary's requests:
  roll back (canary 0%, phase RolledBack), at once, whatever the step's age;
- the step held for `interval` with the thresholds met and `minRequests` seen: the next
  step, or, after the last, phase Promoted (the weights stay at the last step).

Each decision is recorded, with the numbers that made it, in the resource's status
(`tether/v1/status/TrafficSplit/<ns>/<name>` in the KV, controlplane/store.py): the
live weights and a bounded history. `apply` never writes there, so re-applying the
user's file leaves a running analysis alone; a changed spec (a new generation) starts
a new analysis. The push server sends sidecars the live weights in place of the
written ones (controlplane/push.py `index_of`), and the controller bumps the config
version with each change so every sidecar gets them.

Several replicas: each analysis is driven by the replica holding its lock, a KV key
acquired with a registry session (TTL, renewed every tick; a replica that dies loses
its session and the lock goes to another). Status writes are check-and-set besides.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from aiohttp import web

from controlplane.schema import ResourceKey, TrafficSplitSpec

if TYPE_CHECKING:
    from controlplane.meshstats import Aggregate
    from controlplane.server import ControlPlane

log = logging.getLogger("tether.canary")

LOCKS = "tether/v1/locks/analysis/"
HISTORY = 50  # history entries kept per analysis
PROGRESSING = "Progressing"
PROMOTED = "Promoted"
ROLLED_BACK = "RolledBack"


@dataclass(frozen=True)
class CanaryNumbers:
    """The canary's requests over the stats window: count, share below 500, p99 (s)."""

    requests: int = 0
    success_rate: float | None = None
    p99: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "successRate": None if self.success_rate is None else round(self.success_rate, 4),
            "p99": None if self.p99 is None else round(self.p99, 4),
        }


def canary_numbers(agg: Aggregate, service: str, namespace: str, subset: str) -> CanaryNumbers:
    """Every caller's requests to `service.namespace` subset `subset`, summed."""
    from controlplane.meshstats import Counts

    total = Counts()
    dest = f"{service}.{namespace}"
    for (_, dst, sub), c in agg.edges.items():
        if dst == dest and sub == subset:
            total.add(c)
    return CanaryNumbers(total.requests, total.success_rate, total.quantile(0.99))


def weights_for(split: TrafficSplitSpec, canary_weight: int) -> dict[str, int]:
    """The split's weights with the canary at `canary_weight` and the stable subset
    holding the rest of what the two hold together."""
    an = split.analysis
    assert an is not None
    others = sum(s.weight for s in split.subsets if s.name not in (an.canary, an.stable))
    out = {}
    for s in split.subsets:
        if s.name == an.canary:
            out[s.name] = canary_weight
        elif s.name == an.stable:
            out[s.name] = 100 - others - canary_weight
        else:
            out[s.name] = s.weight
    return out


def breach(split: TrafficSplitSpec, numbers: CanaryNumbers) -> str | None:
    """Which threshold the canary breaks, in words (None: none, or too few requests)."""
    an = split.analysis
    assert an is not None
    if numbers.requests < an.min_requests:
        return None
    rate = numbers.success_rate
    if an.min_success_rate is not None and rate is not None and rate * 100 < an.min_success_rate:
        return f"success rate {rate * 100:.2f}% below {an.min_success_rate:g}%"
    if an.max_p99 is not None and numbers.p99 is not None and numbers.p99 > an.max_p99:
        return f"p99 {numbers.p99 * 1000:.1f}ms above {an.max_p99 * 1000:g}ms"
    return None


def advance(
    split: TrafficSplitSpec,
    generation: int,
    status: Mapping[str, Any] | None,
    numbers: CanaryNumbers,
    now: float,
) -> dict[str, Any] | None:
    """The analysis's next status (the `analysis` member of the resource's status), or
    None when nothing changes. `now` is wall-clock seconds (the status is shared)."""
    an = split.analysis
    assert an is not None
    cur = status.get("analysis") if status else None
    if not isinstance(cur, Mapping) or cur.get("generation") != generation:
        return {
            "generation": generation,
            "phase": PROGRESSING,
            "step": 0,
            "weights": weights_for(split, an.steps[0]),
            "stepStarted": now,
            "history": [_entry(now, 0, an.steps[0], "started", numbers)],
        }
    if cur.get("phase") != PROGRESSING:
        return None
    step = int(cur.get("step", 0))
    history = list(cur.get("history", ()))
    why = breach(split, numbers)
    if why is not None:
        history.append(_entry(now, step, 0, "rolled back", numbers, why))
        return {
            **cur,
            "phase": ROLLED_BACK,
            "weights": weights_for(split, 0),
            "history": history[-HISTORY:],
        }
    if now - float(cur.get("stepStarted", now)) < an.interval:
        return None
    if numbers.requests < an.min_requests:
        return None  # held until the canary has been seen enough
    if step + 1 >= len(an.steps):
        history.append(_entry(now, step, an.steps[step], "promoted", numbers))
        return {**cur, "phase": PROMOTED, "history": history[-HISTORY:]}
    weight = an.steps[step + 1]
    history.append(_entry(now, step + 1, weight, "advanced", numbers))
    return {
        **cur,
        "step": step + 1,
        "weights": weights_for(split, weight),
        "stepStarted": now,
        "history": history[-HISTORY:],
    }


def _entry(
    now: float, step: int, weight: int, event: str, numbers: CanaryNumbers, reason: str = ""
) -> dict[str, Any]:
    out: dict[str, Any] = {
        "time": round(now, 3),
        "step": step,
        "canaryWeight": weight,
        "event": event,
        **numbers.to_dict(),
    }
    if reason:
        out["reason"] = reason
    return out


def live_weights(status: Mapping[str, Any] | None) -> dict[str, int] | None:
    """The weights an analysis set (what sidecars get instead of the written ones)."""
    cur = status.get("analysis") if status else None
    if not isinstance(cur, Mapping):
        return None
    weights = cur.get("weights")
    if not isinstance(weights, Mapping):
        return None
    return {str(k): int(v) for k, v in weights.items()}


def with_live_weights(doc: dict[str, Any], status: Mapping[str, Any] | None) -> dict[str, Any]:
    """A TrafficSplit document with the analysis's live weights in its subsets (the
    document unchanged if there are none, or they do not fit its subsets)."""
    weights = live_weights(status)
    spec = doc.get("spec")
    if weights is None or not isinstance(spec, dict):
        return doc
    subsets = spec.get("subsets")
    if not isinstance(subsets, list) or {s.get("name") for s in subsets} != set(weights):
        return doc
    new = [{**s, "weight": weights[s["name"]]} for s in subsets]
    return {**doc, "spec": {**spec, "subsets": new}}


class CanaryController:
    """Drives every TrafficSplit analysis whose lock this replica holds."""

    def __init__(
        self,
        cp: ControlPlane,
        numbers: Callable[[], Awaitable[Aggregate]],
        *,
        tick: float = 1.0,
        session_ttl: float = 10.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.cp = cp
        self.numbers = numbers  # the merged stats of every replica
        self.tick = tick
        self.session_ttl = session_ttl
        self.clock = clock
        self.session: str | None = None
        self.held: set[ResourceKey] = set()
        self.decisions = 0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="canary")

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self.session is not None and self.cp.consul is not None:
            with contextlib.suppress(Exception):
                await self.cp.consul.session.destroy(self.session)
            self.session = None

    async def _run(self) -> None:
        await self.cp.synced.wait()
        while True:
            try:
                await self.run_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # A new session next time (the old one expires by its TTL): the registry
                # may have lost it.
                log.warning("canary analysis: %s (retrying)", exc)
                self.session = None
                self.held.clear()
            await asyncio.sleep(self.tick)

    async def _session(self) -> str:
        c = self.cp.consul
        if self.session is not None:
            try:
                await c.session.renew(self.session)
                return self.session
            except Exception:
                self.session = None
                self.held.clear()
        self.session = await c.session.create(
            name="tether-canary", ttl=int(max(self.session_ttl, 10)), lock_delay=0,
            behavior="release",
        )  # fmt: skip
        return self.session

    async def _lock(self, key: ResourceKey, session: str) -> bool:
        path = f"{LOCKS}{key.namespace}/{key.name}"
        ok = bool(await self.cp.consul.kv.put(path, self.cp.spec.host, acquire=session))
        if ok:
            self.held.add(key)
        else:
            self.held.discard(key)
        return ok

    async def run_once(self) -> int:
        """One pass over the analyses; how many statuses it changed."""
        snap = self.cp.snapshot
        for key in snap.orphan_statuses:
            await self.cp.store.delete_status(key)
        splits = [
            r for r in snap.of_kind("TrafficSplit")
            if isinstance(r.spec, TrafficSplitSpec) and r.spec.analysis is not None
        ]  # fmt: skip
        if not splits:
            return 0
        session = await self._session()
        agg = await self.numbers()
        changed = 0
        for res in splits:
            if not await self._lock(res.key, session):
                continue  # another replica drives it
            assert isinstance(res.spec, TrafficSplitSpec) and res.spec.analysis is not None
            got = snap.statuses.get(res.key)
            status, index = got if got is not None else ({}, 0)
            numbers = canary_numbers(agg, res.name, res.namespace, res.spec.analysis.canary)
            nxt = advance(res.spec, res.metadata.generation, status, numbers, self.clock())
            if nxt is None:
                continue
            if not await self.cp.store.write_status(res.key, {**status, "analysis": nxt}, index):
                continue  # changed meanwhile: decided again on the next tick
            self.decisions += 1
            changed += 1
            if live_weights(status) != nxt["weights"]:
                await self.cp.store.bump_version(self.cp.spec.registry.token)
            log.info(
                "canary %s: %s, weights %s", res.key, nxt["history"][-1]["event"], nxt["weights"]
            )
        if changed:
            await self.cp.refresh()
        return changed

    def __repr__(self) -> str:
        return f"<CanaryController held={len(self.held)} decisions={self.decisions}>"


CANARY: web.AppKey[CanaryController] = web.AppKey("canary")


def install(
    cp: ControlPlane, numbers: Callable[[], Awaitable[Aggregate]], tick: float = 1.0
) -> CanaryController:
    """Run a CanaryController while the control plane runs (`cp.app[CANARY]`)."""
    controller = CanaryController(cp, numbers, tick=tick)
    cp.app[CANARY] = controller

    async def _start(_app: Any) -> None:
        controller.start()

    async def _stop(_app: Any) -> None:
        await controller.aclose()

    cp.app.on_startup.append(_start)
    cp.app.on_shutdown.append(_stop)
    return controller
