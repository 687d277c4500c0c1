"""Policy resources kept in the registry KV with check-and-set, so replicas stay stateless.

Layout, all under one prefix (`tether/v1/`)::

    tether/v1/resources/<Kind>/<namespace>/<name>   one resource, its document as JSON
                                                    (mesh-wide kinds: namespace `_`)
    tether/v1/version                               the config version, a decimal counter

Every write is a check-and-set (`?cas=<ModifyIndex>`, `cas=0` to create) through
`consul.aio.Consul`, so any number of control-plane replicas can write against one
registry or a Consul cluster. A write that loses a race is re-read and re-applied on
the new state (with a short jittered backoff), and reported as `ConflictError` after
`max_attempts` losses: never silently lost. After an apply or delete that changed
something, the version counter is CAS-incremented once, so it counts changes across
all replicas.

Writes carry the caller's token (the registry's ACLs decide); reads use the control
plane's own client. A record in KV that does not decode (written by hand, or by a newer
version) is skipped with a log line, never fatal.
"""

from __future__ import annotations

import asyncio
import difflib
import json
import logging
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import aiohttp
import consul
import yaml

from controlplane.errors import (
    ConflictError,
    ControlPlaneError,
    NotFoundError,
    PermissionDeniedError,
    RegistryUnavailableError,
)
from controlplane.schema import Resource, ResourceKey, SchemaError

log = logging.getLogger("tether.controlplane.store")

PREFIX = "tether/v1/"
RESOURCES = PREFIX + "resources/"
VERSION_KEY = PREFIX + "version"
_MESH_WIDE = "_"

Action = Literal["created", "configured", "unchanged", "deleted", "absent"]


def resource_key_path(key: ResourceKey) -> str:
    return f"{RESOURCES}{key.kind}/{key.namespace or _MESH_WIDE}/{key.name}"


def key_of_path(path: str) -> ResourceKey | None:
    parts = path.removeprefix(RESOURCES).split("/")
    if not path.startswith(RESOURCES) or len(parts) != 3 or not all(parts):
        return None
    kind, ns, name = parts
    return ResourceKey(kind, "" if ns == _MESH_WIDE else ns, name)


def _yaml(res: Resource | None) -> list[str]:
    if res is None:
        return []
    doc = res.to_dict()
    doc["metadata"].pop("generation", None)
    return yaml.safe_dump(doc, sort_keys=False).splitlines(keepends=True)


@dataclass(frozen=True)
class Change:
    """What an apply or delete did (or, dry, would do) to one resource."""

    key: ResourceKey
    action: Action
    old: Resource | None = None
    new: Resource | None = None

    def diff(self) -> str:
        """A unified diff of the documents (server-set metadata left out)."""
        if self.action in ("unchanged", "absent"):
            return ""
        name = f"{self.key.kind}/{self.key.namespace or '-'}/{self.key.name}"
        lines = difflib.unified_diff(
            _yaml(self.old),
            _yaml(self.new),
            fromfile=f"a/{name}" if self.old else "/dev/null",
            tofile=f"b/{name}" if self.new else "/dev/null",
        )
        return "".join(lines)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "kind": self.key.kind,
            "namespace": self.key.namespace,
            "name": self.key.name,
            "action": self.action,
        }
        res = self.new or self.old
        if res is not None:
            out["generation"] = res.metadata.generation
        diff = self.diff()
        if diff:
            out["diff"] = diff
        return out


@dataclass(frozen=True)
class ConfigSnapshot:
    """Every resource in force and the config version, as read in one registry read.

    `index` is the registry's X-Consul-Index of that read (it moves with any write
    under the prefix); `version` is the counter, which moves once per change.
    """

    version: int = 0
    index: int = 0
    resources: Mapping[ResourceKey, Resource] = field(default_factory=dict)

    def get(self, key: ResourceKey) -> Resource | None:
        return self.resources.get(key)

    def of_kind(self, kind: str, namespace: str | None = None) -> list[Resource]:
        return sorted(
            (
                r
                for k, r in self.resources.items()
                if k.kind == kind and (namespace is None or k.namespace == namespace)
            ),
            key=lambda r: r.key,
        )

    def same_content(self, other: ConfigSnapshot) -> bool:
        return self.version == other.version and dict(self.resources) == dict(other.resources)


@dataclass
class ApplyResult:
    changes: list[Change]
    version: int
    dry_run: bool = False

    @property
    def changed(self) -> bool:
        return any(c.action not in ("unchanged", "absent") for c in self.changes)


def _registry_error(exc: BaseException) -> ControlPlaneError:
    if isinstance(exc, consul.ACLPermissionDenied):
        return PermissionDeniedError(f"the registry refused the token: {exc}".strip())
    return RegistryUnavailableError(f"registry unavailable: {exc or type(exc).__name__}")


_REGISTRY_ERRORS = (
    consul.ConsulException,
    consul.Timeout,
    aiohttp.ClientError,
    OSError,
    asyncio.TimeoutError,
)


class PolicyStore:
    """Reads and CAS-writes resources and the version counter in the registry KV.

    `reader` reads with the control plane's own token; `writer` (a client without a
    default token) writes with the caller's, so the registry's ACLs decide who may
    change policy. With one client for both, writes without a caller token use its
    default token.
    """

    def __init__(
        self,
        reader: Any,
        writer: Any | None = None,
        *,
        max_attempts: int = 16,
        rng: random.Random | None = None,
    ) -> None:
        self.reader = reader
        self.writer = writer if writer is not None else reader
        self.max_attempts = max_attempts
        self.rng = rng or random.Random()
        # How many CAS writes lost a race and were retried (observability, tests).
        self.cas_retries = 0

    # -- reads ---------------------------------------------------------------------------

    async def snapshot(self, index: int | None = None, wait: str | None = None) -> ConfigSnapshot:
        """Everything under the prefix in one read; with `index`, a blocking query."""
        try:
            idx, entries = await self.reader.kv.get(PREFIX, recurse=True, index=index, wait=wait)
        except _REGISTRY_ERRORS as exc:
            raise _registry_error(exc) from exc
        version = 0
        resources: dict[ResourceKey, Resource] = {}
        for entry in entries or ():
            path = entry.get("Key", "")
            if path == VERSION_KEY:
                version = _parse_version(entry.get("Value"))
                continue
            key = key_of_path(path)
            if key is None:
                continue
            res = _decode(path, entry.get("Value"))
            if res is not None and res.key == key:
                resources[key] = res
            elif res is not None:
                log.warning("skipping %s: it holds %s", path, res.key)
        return ConfigSnapshot(version, int(idx or 0), resources)

    async def get(self, key: ResourceKey) -> Resource | None:
        res, _ = await self._read(resource_key_path(key))
        return res

    async def version(self) -> int:
        try:
            _, entry = await self.reader.kv.get(VERSION_KEY)
        except _REGISTRY_ERRORS as exc:
            raise _registry_error(exc) from exc
        return _parse_version(entry.get("Value") if entry else None)

    async def _read(self, path: str) -> tuple[Resource | None, int]:
        """The resource at `path` and its ModifyIndex (0 when absent, the CAS to create)."""
        try:
            _, entry = await self.reader.kv.get(path, consistency="consistent")
        except _REGISTRY_ERRORS as exc:
            raise _registry_error(exc) from exc
        if entry is None:
            return None, 0
        return _decode(path, entry.get("Value")), int(entry["ModifyIndex"])

    # -- writes --------------------------------------------------------------------------

    async def apply(
        self, resources: Sequence[Resource], *, token: str | None = None, dry_run: bool = False
    ) -> ApplyResult:
        """Create or replace each resource (CAS); then bump the version once if any changed."""
        changes = [await self._put(res, token, dry_run) for res in resources]
        return await self._finish(changes, token, dry_run)

    async def delete(
        self, keys: Iterable[ResourceKey], *, token: str | None = None, dry_run: bool = False
    ) -> ApplyResult:
        changes = [await self._delete(key, token, dry_run) for key in keys]
        return await self._finish(changes, token, dry_run)

    async def delete_one(
        self, key: ResourceKey, *, token: str | None = None, dry_run: bool = False
    ) -> ApplyResult:
        result = await self.delete([key], token=token, dry_run=dry_run)
        if result.changes[0].action == "absent":
            raise NotFoundError(f"{key} not found")
        return result

    async def _finish(self, changes: list[Change], token: str | None, dry_run: bool) -> ApplyResult:
        result = ApplyResult(changes, 0, dry_run)
        if result.changed and not dry_run:
            result.version = await self.bump_version(token)
        else:
            result.version = await self.version()
        return result

    async def _put(self, res: Resource, token: str | None, dry_run: bool) -> Change:
        path = resource_key_path(res.key)
        for attempt in range(self.max_attempts):
            old, index = await self._read(path)
            if old is not None and old.same_content(res):
                return Change(res.key, "unchanged", old, old)
            generation = (old.metadata.generation if old is not None else 0) + 1
            new = res.with_generation(generation)
            action: Action = "created" if index == 0 else "configured"
            if dry_run:
                return Change(res.key, action, old, new)
            body = json.dumps(new.to_dict(), separators=(",", ":"))
            if await self._write(path, body, index, token):
                return Change(res.key, action, old, new)
            await self._backoff(attempt)
        raise ConflictError(f"{res.key}: lost {self.max_attempts} check-and-set races in a row")

    async def _delete(self, key: ResourceKey, token: str | None, dry_run: bool) -> Change:
        path = resource_key_path(key)
        for attempt in range(self.max_attempts):
            old, index = await self._read(path)
            if index == 0:
                return Change(key, "absent")
            if dry_run:
                return Change(key, "deleted", old, None)
            try:
                ok = await self.writer.kv.delete(path, cas=index, token=token)
            except _REGISTRY_ERRORS as exc:
                raise _registry_error(exc) from exc
            if ok:
                return Change(key, "deleted", old, None)
            await self._backoff(attempt)
        raise ConflictError(f"{key}: lost {self.max_attempts} check-and-set races in a row")

    async def bump_version(self, token: str | None = None) -> int:
        """CAS-increment the config version; every replica's bump counts."""
        attempts = self.max_attempts * 4
        for attempt in range(attempts):
            try:
                _, entry = await self.reader.kv.get(VERSION_KEY, consistency="consistent")
            except _REGISTRY_ERRORS as exc:
                raise _registry_error(exc) from exc
            current = _parse_version(entry.get("Value") if entry else None)
            index = int(entry["ModifyIndex"]) if entry else 0
            if await self._write(VERSION_KEY, str(current + 1), index, token):
                return current + 1
            await self._backoff(attempt)
        raise ConflictError(f"config version: lost {attempts} check-and-set races in a row")

    async def _write(self, path: str, body: str, cas: int, token: str | None) -> bool:
        try:
            ok = await self.writer.kv.put(path, body, cas=cas, token=token)
        except _REGISTRY_ERRORS as exc:
            raise _registry_error(exc) from exc
        if not ok:
            self.cas_retries += 1
        return bool(ok)

    async def _backoff(self, attempt: int) -> None:
        await asyncio.sleep(self.rng.uniform(0, min(0.002 * 2**attempt, 0.2)))


def _parse_version(raw: Any) -> int:
    if isinstance(raw, bytes):
        raw = raw.decode("utf-8", "replace")
    try:
        return int(raw or 0)
    except (TypeError, ValueError):
        log.warning("config version %r is not a number; counting from 0", raw)
        return 0


def _decode(path: str, raw: Any) -> Resource | None:
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
        return Resource.from_dict(json.loads(text or "null"))
    except (ValueError, SchemaError, UnicodeDecodeError) as exc:
        log.warning("skipping %s: not a valid resource: %s", path, exc)
        return None
