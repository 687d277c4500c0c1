"""The KV store's state operations: get, list, set, check-and-set, locks and deletes.

No HTTP here: `kv_api` and `txn_api` call these. Writes stage changes in the caller's
`Txn` (so a transaction sees its own writes and nothing is visible before commit) and
follow Consul's state store (`kvs.go`) to the letter: a set keeps the lock, a CAS with
index 0 only creates, a lock needs a live session and bumps LockIndex only when the
holder changes, an unlock by a non-holder is a no-op `false`, a CAS delete of a missing
key succeeds.

Every write touches `kv:<key>` (the per-key index; its index after a delete is the
tombstone prefix watchers see) and `kv` (the table index a missing key reports).
`Graveyard` forgets old tombstones so that deleted keys do not cost memory forever.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
from collections.abc import Callable

from registry.errors import BadRequestError
from registry.store import Obj, Store, Txn

TABLE = "kv"
TABLE_RESOURCE = "kv"
MAX_VALUE = 512 * 1024  # Consul's kv_max_value_size default


def resource(key: str) -> str:
    return f"kv:{key}"


def encode(value: bytes | None) -> str | None:
    """Raw bytes as the stored base64 Value (an empty value is null, as in Consul)."""
    if not value:
        return None
    return base64.b64encode(value).decode("ascii")


def decode_b64(value: str | None, where: str) -> str | None:
    """Check a client's base64 Value and normalise it; a bad one is a 400 naming `where`."""
    if value is None or value == "":
        return None
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise BadRequestError(f"{where}: Value is not valid base64: {exc}") from exc
    if len(raw) > MAX_VALUE:
        from registry.errors import TooLargeError

        raise TooLargeError(
            f"{where}: Value ({len(raw)} bytes) too large, max size: {MAX_VALUE} bytes"
        )
    return encode(raw)


def view(entry: Obj) -> Obj:
    """An entry as Consul answers it (`Session` only while locked)."""
    out = {
        "LockIndex": entry["LockIndex"],
        "Key": entry["Key"],
        "Flags": entry["Flags"],
        "Value": entry["Value"],
        "CreateIndex": entry["CreateIndex"],
        "ModifyIndex": entry["ModifyIndex"],
    }
    if entry.get("Session"):
        out["Session"] = entry["Session"]
    return out


# -- reads -----------------------------------------------------------------------------


def get(store: Store, key: str) -> Obj | None:
    return store.get(TABLE, key)


def entries(store: Store, prefix: str) -> list[Obj]:
    """Every entry under `prefix`, sorted by key."""
    table = store.table(TABLE)
    return [table[k] for k in store.keys(TABLE, prefix)]


def keys(
    store: Store,
    prefix: str,
    separator: str = "",
    visible: Callable[[str], bool] | None = None,
) -> list[str]:
    """Keys under `prefix` that `visible` lets through, each cut after the first
    `separator` past the prefix (filtering comes first, as in Consul)."""
    found = store.keys(TABLE, prefix)
    if visible is not None:
        found = [k for k in found if visible(k)]
    if not separator:
        return found
    out: list[str] = []
    n = len(prefix)
    for key in found:
        cut = key.find(separator, n)
        if cut >= 0:
            key = key[: cut + len(separator)]
        if not out or out[-1] != key:
            out.append(key)
    return out


def table_index(store: Store) -> int:
    """The index of the last KV write anywhere (what a missing key reports)."""
    return store.index_of(TABLE_RESOURCE)


def key_index(store: Store, key: str) -> int:
    """A single key's index: its ModifyIndex, or the table index when it is missing."""
    entry = store.get(TABLE, key)
    return entry["ModifyIndex"] if entry is not None else table_index(store)


def tree_index(store: Store, prefix: str) -> int:
    """The highest index under `prefix`, deletions included (Consul's graveyard)."""
    if not prefix:
        return table_index(store)
    return store.prefix_index(resource(prefix))


def txn_keys(txn: Txn, prefix: str) -> list[str]:
    """Keys under `prefix` as the txn sees them: committed plus staged, minus deleted."""
    found = set(txn._store.keys(TABLE, prefix))
    found.update(k for (t, k) in txn.puts if t == TABLE and k.startswith(prefix))
    return sorted(k for k in found if txn.get(TABLE, k) is not None)


# -- writes ----------------------------------------------------------------------------


def _check_key(key: str) -> None:
    if not key:
        raise BadRequestError("Missing key name")


def _write(txn: Txn, entry: Obj) -> Obj:
    txn.put(TABLE, entry["Key"], entry)
    txn.touch(TABLE_RESOURCE, resource(entry["Key"]))
    return entry


def put(txn: Txn, key: str, value: str | None, flags: int) -> Obj:
    """Set a key, keeping any lock on it (Consul does not enforce locks on writes)."""
    _check_key(key)
    old = txn.get(TABLE, key)
    return _write(
        txn,
        {
            "Key": key,
            "Flags": flags,
            "Value": value,
            "CreateIndex": old["CreateIndex"] if old is not None else txn.index,
            "ModifyIndex": txn.index,
            "LockIndex": old["LockIndex"] if old is not None else 0,
            "Session": old["Session"] if old is not None else "",
        },
    )


def cas(txn: Txn, key: str, value: str | None, flags: int, index: int) -> Obj | None:
    """Set only if the key's ModifyIndex is `index` (0: only if it does not exist)."""
    _check_key(key)
    old = txn.get(TABLE, key)
    if index == 0 and old is not None:
        return None
    if index != 0 and (old is None or old["ModifyIndex"] != index):
        return None
    return put(txn, key, value, flags)


def check_session(txn: Txn, session: str) -> None:
    if not session:
        raise BadRequestError("missing session")
    if txn.get("sessions", session) is None:
        raise BadRequestError(f'invalid session "{session}"')


def lock(txn: Txn, key: str, value: str | None, flags: int, session: str) -> Obj | None:
    """Acquire the key's lock for `session` and set its value; None if another holds it."""
    _check_key(key)
    check_session(txn, session)
    old = txn.get(TABLE, key)
    if old is None:
        create, lock_index = txn.index, 1
    elif old["Session"] == session:
        create, lock_index = old["CreateIndex"], old["LockIndex"]
    elif old["Session"]:
        return None
    else:
        create, lock_index = old["CreateIndex"], old["LockIndex"] + 1
    return _write(
        txn,
        {
            "Key": key,
            "Flags": flags,
            "Value": value,
            "CreateIndex": create,
            "ModifyIndex": txn.index,
            "LockIndex": lock_index,
            "Session": session,
        },
    )


def unlock(txn: Txn, key: str, value: str | None, flags: int, session: str) -> Obj | None:
    """Release the lock `session` holds and set the value; None if it does not hold it."""
    _check_key(key)
    if not session:
        raise BadRequestError("missing session")
    old = txn.get(TABLE, key)
    if old is None or old["Session"] != session:
        return None
    return _write(
        txn,
        {
            "Key": key,
            "Flags": flags,
            "Value": value,
            "CreateIndex": old["CreateIndex"],
            "ModifyIndex": txn.index,
            "LockIndex": old["LockIndex"],
            "Session": "",
        },
    )


def release(txn: Txn, entry: Obj) -> None:
    """Drop a lock because its session ended (value kept, LockIndex kept)."""
    _write(txn, {**entry, "Session": "", "ModifyIndex": txn.index})


def delete(txn: Txn, key: str) -> bool:
    """Delete a key; False (and no write at all) if it does not exist."""
    if txn.get(TABLE, key) is None:
        return False
    txn.delete(TABLE, key)
    txn.touch(TABLE_RESOURCE, resource(key))
    return True


def delete_cas(txn: Txn, key: str, index: int) -> bool:
    """Delete only if ModifyIndex is `index`; a missing key counts as done (Consul)."""
    old = txn.get(TABLE, key)
    if old is None:
        return True
    if old["ModifyIndex"] != index:
        return False
    return delete(txn, key)


def delete_tree(txn: Txn, prefix: str) -> int:
    """Delete every key under `prefix`; returns how many."""
    found = txn_keys(txn, prefix)
    for key in found:
        delete(txn, key)
    return len(found)


class Graveyard:
    """Forgets KV tombstones (Consul's tombstone GC), a server part.

    Every `interval` it forgets the per-key indexes of keys that were already deleted at
    the previous sweep, so a tombstone lives between one and two intervals. Prefix
    indexes stay monotonic (`Store.forget` keeps a floor), so a watcher never sees one
    go backwards; at worst one wakes with unchanged data, as with Consul after a reap.
    """

    def __init__(self, store: Store, interval: float = 300.0) -> None:
        self.store = store
        self.interval = interval
        self._seen: set[str] = set()
        self._task: asyncio.Task[None] | None = None
        self.reaped = 0

    def sweep(self) -> int:
        table = self.store.table(TABLE)
        now = {r for r in self.store.resources("kv:") if r[3:] not in table}
        old = self._seen & now
        self.store.forget(old)
        self._seen = now - old
        self.reaped += len(old)
        return len(old)

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="kv-graveyard")

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            self.sweep()

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
