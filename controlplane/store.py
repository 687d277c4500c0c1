"""Policy resources kept in the registry KV with check-and-set, so replicas stay stateless.

Layout, all under one prefix (`tether/v1/`)::

    tether/v1/resources/<Kind>/<namespace>/<name>   one resource, its document as JSON
                                                    (mesh-wide kinds: namespace `_`)
    tether/v1/version                               the config version, a decimal counter

An apply (or delete) reads what it changes, then writes all of it and the incremented
version in one transaction (`PUT /v1/txn`) whose every operation is a check-and-set on
the ModifyIndex just read (`cas` with Index 0 to create, `delete-cas`): the batch lands
whole, with its version, or not at all. A transaction that loses a race is re-read and
re-applied on the new state (short jittered backoff) and reported as `ConflictError`
after `max_attempts` losses: never silently lost. Content equal to what is stored is not
written. Batches over 63 resources go in several transactions (Consul's limit is 64
operations). Against a registry without `/v1/txn` it falls back to one CAS write per key
(`?cas=`), then a CAS increment of the version.

Writes carry the caller's token (the registry's ACLs decide); reads use the control
plane's own client. A record in KV that does not decode (written by hand, or by a newer
version) is skipped with a log line, never fatal.
"""

from __future__ import annotations

import asyncio
import base64
import difflib
import json
import logging
import random
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
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
# What the control plane records about a resource (a canary analysis's live weights and
# history): apart from the resource, so an apply never overwrites it.
STATUS = PREFIX + "status/"
_MESH_WIDE = "_"
# Resources per transaction: Consul takes 64 operations per txn, one is the version.
TXN_RESOURCES = 63

Action = Literal["created", "configured", "unchanged", "deleted", "absent"]


def resource_key_path(key: ResourceKey) -> str:
    return f"{RESOURCES}{key.kind}/{key.namespace or _MESH_WIDE}/{key.name}"


def status_key_path(key: ResourceKey) -> str:
    return f"{STATUS}{key.kind}/{key.namespace or _MESH_WIDE}/{key.name}"


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
        name = resource_key_path(self.key).removeprefix(RESOURCES)  # as the KV and the API name it
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
    # Each resource's status (controlplane/canary.py), as JSON data, and its ModifyIndex.
    statuses: Mapping[ResourceKey, tuple[dict[str, Any], int]] = field(default_factory=dict)
    # Statuses left by resources since deleted (controlplane/canary.py removes them, so
    # a resource created again under the name starts afresh).
    orphan_statuses: frozenset[ResourceKey] = frozenset()

    def status(self, key: ResourceKey) -> dict[str, Any] | None:
        got = self.statuses.get(key)
        return got[0] if got is not None else None

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
        return (
            self.version == other.version
            and dict(self.resources) == dict(other.resources)
            and {k: v[0] for k, v in self.statuses.items()}
            == {k: v[0] for k, v in other.statuses.items()}
        )


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


@contextmanager
def _registry_call() -> Iterator[None]:
    """A call to the registry: its client's failures become the control plane's errors."""
    try:
        yield
    except _REGISTRY_ERRORS as exc:
        raise _registry_error(exc) from exc


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
        # Atomic applies through /v1/txn; off (key by key) if the registry has none.
        self.transactions = True

    # -- reads ---------------------------------------------------------------------------

    async def snapshot(self, index: int | None = None, wait: str | None = None) -> ConfigSnapshot:
        """Everything under the prefix in one read; with `index`, a blocking query."""
        with _registry_call():
            idx, entries = await self.reader.kv.get(PREFIX, recurse=True, index=index, wait=wait)
        version = 0
        resources: dict[ResourceKey, Resource] = {}
        statuses: dict[ResourceKey, tuple[dict[str, Any], int]] = {}
        for entry in entries or ():
            path = entry.get("Key", "")
            if path == VERSION_KEY:
                version = _parse_version(entry.get("Value"))
                continue
            if path.startswith(STATUS):
                skey = key_of_path(RESOURCES + path.removeprefix(STATUS))
                status = _status(path, entry.get("Value"))
                if skey is not None and status is not None:
                    statuses[skey] = (status, int(entry.get("ModifyIndex", 0)))
                continue
            key = key_of_path(path)
            if key is None:
                continue
            res = _decode(path, entry.get("Value"))
            if res is not None and res.key == key:
                resources[key] = res
            elif res is not None:
                log.warning("skipping %s: it holds %s", path, res.key)
        orphans = frozenset(k for k in statuses if k not in resources)
        statuses = {k: v for k, v in statuses.items() if k in resources}
        return ConfigSnapshot(version, int(idx or 0), resources, statuses, orphans)

    async def get(self, key: ResourceKey) -> Resource | None:
        res, _ = await self._read(resource_key_path(key))
        return res

    async def version(self) -> int:
        with _registry_call():
            _, entry = await self.reader.kv.get(VERSION_KEY)
        return _parse_version(entry.get("Value") if entry else None)

    async def _read(self, path: str) -> tuple[Resource | None, int]:
        """The resource at `path` and its ModifyIndex (0 when absent, the CAS to create)."""
        with _registry_call():
            _, entry = await self.reader.kv.get(path, consistency="consistent")
        if entry is None:
            return None, 0
        return _decode(path, entry.get("Value")), int(entry["ModifyIndex"])

    # -- writes --------------------------------------------------------------------------

    async def apply(
        self, resources: Sequence[Resource], *, token: str | None = None, dry_run: bool = False
    ) -> ApplyResult:
        """Create or replace each resource; the version is bumped once if any changed."""
        return await self._change([(r.key, r) for r in resources], token, dry_run)

    async def delete(
        self, keys: Iterable[ResourceKey], *, token: str | None = None, dry_run: bool = False
    ) -> ApplyResult:
        return await self._change([(k, None) for k in keys], token, dry_run)

    async def delete_one(
        self, key: ResourceKey, *, token: str | None = None, dry_run: bool = False
    ) -> ApplyResult:
        result = await self.delete([key], token=token, dry_run=dry_run)
        if result.changes[0].action == "absent":
            raise NotFoundError(f"{key} not found")
        return result

    async def modify(
        self,
        key: ResourceKey,
        edit: Callable[[Resource | None], Resource | None],
        *,
        token: str | None = None,
    ) -> ApplyResult:
        """Read-modify-write of one resource: `edit(current)` is the new resource (None:
        delete it). A race lost to another writer re-runs `edit` on the fresh state, so
        what the other writer did is kept (the Consul intentions API edits one source of
        an Intention this way). `edit` may raise to refuse; nothing is written then."""
        path = resource_key_path(key)
        for attempt in range(self.max_attempts):
            seen, _ = await self._read(path)
            change, op = await self._plan(key, edit(seen))
            fresh = change.old
            if (fresh is None) != (seen is None) or (
                fresh is not None
                and seen is not None
                and fresh.metadata.generation != seen.metadata.generation
            ):
                self.cas_retries += 1
                continue  # changed between the two reads: edit the newer one
            if op is None:
                return ApplyResult([change], await self.version())
            current, index = await self._read_version()
            bump = {
                "KV": {
                    "Verb": "cas",
                    "Key": VERSION_KEY,
                    "Index": index,
                    "Value": base64.b64encode(str(current + 1).encode()).decode(),
                }
            }
            outcome = await self._txn([op, bump], token) if self.transactions else None
            if outcome is None:  # no /v1/txn: one CAS write, then the counter
                self.transactions = False
                new = change.new
                done = (
                    await self._put(new, token)
                    if new is not None
                    else await self._delete(key, token)
                )
                return ApplyResult([done], await self.bump_version(token))
            if outcome:
                return ApplyResult([change], current + 1)
            self.cas_retries += 1
            await self._backoff(attempt)
        raise ConflictError(f"lost {self.max_attempts} check-and-set races in a row")

    async def _change(
        self,
        wanted: Sequence[tuple[ResourceKey, Resource | None]],
        token: str | None,
        dry_run: bool,
    ) -> ApplyResult:
        if dry_run:
            plans = [await self._plan(key, res) for key, res in wanted]
            return ApplyResult([c for c, _ in plans], await self.version(), True)
        if self.transactions:
            changes: list[Change] = []
            version = 0
            for start in range(0, max(len(wanted), 1), TXN_RESOURCES):
                got, version = await self._change_atomically(
                    wanted[start : start + TXN_RESOURCES], token
                )
                if not self.transactions:
                    break  # learnt on the first chunk: nothing was written yet
                changes += got
            if self.transactions:
                return ApplyResult(changes, version)
        # A registry without /v1/txn: one CAS write per key, then the counter.
        changes = []
        for key, res in wanted:
            if res is None:
                changes.append(await self._delete(key, token))
            else:
                changes.append(await self._put(res, token))
        result = ApplyResult(changes, 0)
        result.version = await self.bump_version(token) if result.changed else await self.version()
        return result

    async def _plan(self, key: ResourceKey, res: Resource | None) -> tuple[Change, Any]:
        """The change `res` (None: deletion) makes to what is stored, and its txn op."""
        path = resource_key_path(key)
        old, index = await self._read(path)
        if res is None:
            if index == 0:
                return Change(key, "absent"), None
            op = {"KV": {"Verb": "delete-cas", "Key": path, "Index": index}}
            return Change(key, "deleted", old, None), op
        if old is not None and old.same_content(res):
            return Change(key, "unchanged", old, old), None
        new = res.with_generation((old.metadata.generation if old is not None else 0) + 1)
        body = json.dumps(new.to_dict(), separators=(",", ":")).encode()
        op = {
            "KV": {
                "Verb": "cas",
                "Key": path,
                "Index": index,
                "Value": base64.b64encode(body).decode("ascii"),
            }
        }
        return Change(key, "created" if index == 0 else "configured", old, new), op

    async def _change_atomically(
        self, wanted: Sequence[tuple[ResourceKey, Resource | None]], token: str | None
    ) -> tuple[list[Change], int]:
        """Every write of `wanted` and the version bump in one transaction, each op a CAS
        on what was just read: all land together or, on a lost race, none (re-planned)."""
        for attempt in range(self.max_attempts):
            plans = [await self._plan(key, res) for key, res in wanted]
            ops = [op for _, op in plans if op is not None]
            if not ops:
                return [c for c, _ in plans], await self.version()
            current, index = await self._read_version()
            bump = {
                "KV": {
                    "Verb": "cas",
                    "Key": VERSION_KEY,
                    "Index": index,
                    "Value": base64.b64encode(str(current + 1).encode()).decode(),
                }
            }
            outcome = await self._txn([*ops, bump], token)
            if outcome is None:  # no /v1/txn here: the caller falls back
                return [], 0
            if outcome:
                return [c for c, _ in plans], current + 1
            self.cas_retries += 1
            await self._backoff(attempt)
        raise ConflictError(f"lost {self.max_attempts} check-and-set races in a row")

    async def _txn(self, ops: list[Any], token: str | None) -> bool | None:
        """True: applied; False: rolled back by a stale index; None: no txn endpoint."""
        headers = self.writer.prepare_headers(token)
        with _registry_call():
            code, body = await self.writer.http.put(
                _raw_response, "/v1/txn", data=json.dumps(ops), headers=headers
            )
        if code == 200:
            return True
        if code in (404, 405):
            log.warning("the registry has no /v1/txn: writing key by key")
            self.transactions = False
            return None
        if code == 403:
            raise PermissionDeniedError(f"the registry refused the token: {body}".strip())
        if code == 409:
            try:
                errors = json.loads(body).get("Errors") or []
            except (ValueError, AttributeError):
                errors = []
            whats = [str(e.get("What", "")) for e in errors if isinstance(e, dict)]
            denied = [w for w in whats if "permission denied" in w.lower()]
            if denied:
                raise PermissionDeniedError(f"the registry refused the token: {denied[0]}")
            return False
        raise RegistryUnavailableError(f"registry answered {code} to a transaction: {body}")

    async def _read_version(self) -> tuple[int, int]:
        with _registry_call():
            _, entry = await self.reader.kv.get(VERSION_KEY, consistency="consistent")
        if entry is None:
            return 0, 0
        return _parse_version(entry.get("Value")), int(entry["ModifyIndex"])

    async def _put(self, res: Resource, token: str | None) -> Change:
        path = resource_key_path(res.key)
        for attempt in range(self.max_attempts):
            old, index = await self._read(path)
            if old is not None and old.same_content(res):
                return Change(res.key, "unchanged", old, old)
            generation = (old.metadata.generation if old is not None else 0) + 1
            new = res.with_generation(generation)
            action: Action = "created" if index == 0 else "configured"
            body = json.dumps(new.to_dict(), separators=(",", ":"))
            if await self._write(path, body, index, token):
                return Change(res.key, action, old, new)
            await self._backoff(attempt)
        raise ConflictError(f"{res.key}: lost {self.max_attempts} check-and-set races in a row")

    async def _delete(self, key: ResourceKey, token: str | None) -> Change:
        path = resource_key_path(key)
        for attempt in range(self.max_attempts):
            old, index = await self._read(path)
            if index == 0:
                return Change(key, "absent")
            with _registry_call():
                ok = await self.writer.kv.delete(path, cas=index, token=token)
            if ok:
                return Change(key, "deleted", old, None)
            await self._backoff(attempt)
        raise ConflictError(f"{key}: lost {self.max_attempts} check-and-set races in a row")

    async def write_status(self, key: ResourceKey, status: Mapping[str, Any], cas: int) -> bool:
        """Replace a resource's status if it is still at ModifyIndex `cas` (0: absent);
        False when another writer got there first. Written with the control plane's own
        token: the status is the control plane's record, not a user's change."""
        body = json.dumps(status, separators=(",", ":"), sort_keys=True)
        with _registry_call():
            ok = await self.reader.kv.put(status_key_path(key), body, cas=cas)
        return bool(ok)

    async def delete_status(self, key: ResourceKey) -> None:
        with _registry_call():
            await self.reader.kv.delete(status_key_path(key))

    async def bump_version(self, token: str | None = None) -> int:
        """CAS-increment the config version; every replica's bump counts."""
        attempts = self.max_attempts * 4
        for attempt in range(attempts):
            current, index = await self._read_version()
            if await self._write(VERSION_KEY, str(current + 1), index, token):
                return current + 1
            await self._backoff(attempt)
        raise ConflictError(f"config version: lost {attempts} check-and-set races in a row")

    async def _write(self, path: str, body: str, cas: int, token: str | None) -> bool:
        with _registry_call():
            ok = await self.writer.kv.put(path, body, cas=cas, token=token)
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


def _status(path: str, raw: Any) -> dict[str, Any] | None:
    try:
        data = json.loads(raw or b"{}")
    except (ValueError, UnicodeDecodeError):
        log.warning("skipping %s: not JSON", path)
        return None
    return data if isinstance(data, dict) else None


def _decode(path: str, raw: Any) -> Resource | None:
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
        return Resource.from_dict(json.loads(text or "null"))
    except (ValueError, SchemaError, UnicodeDecodeError) as exc:
        log.warning("skipping %s: not a valid resource: %s", path, exc)
        return None


def _raw_response(response: Any) -> tuple[int, str]:
    return int(response.code), str(response.body)
