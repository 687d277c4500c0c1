"""The registry's state: tables of JSON objects, a Raft-style index, and durable commits.

Every table is a dict of key -> object held in memory (reads never touch the disk) and,
unless the table is volatile, mirrored in SQLite (WAL mode). A write is a `Txn`: it
takes the next index, stages puts and deletes, and on commit writes them to SQLite in
one transaction *before* memory changes, so a failed commit changes nothing and an
acknowledged one survives `kill -9`.

Blocking queries need an index per resource ("service:orders", "kv:a/b", ...). A txn
names the resources it changes with `touch`; on commit they take the txn's index and
the `WatchHub` wakes whoever waits on them. Resource indexes are not persisted: after a
restart every resource reports the global index loaded from disk, which is never lower
than any index handed out before, so indexes never go backwards. A deleted object's
resource keeps the index of its deletion (Consul's tombstone), so a prefix's index
(`prefix_index`, kept over a sorted list of resource names) sees deletions too.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from bisect import bisect_left, insort
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from registry.errors import DataDirError, StoreError
from registry.watch import WatchHub

log = logging.getLogger(__name__)

Obj = dict[str, Any]

_ABSENT: Any = object()


def prefix_end(prefix: str) -> str | None:
    """The least string greater than every string starting with `prefix` (None: no bound)."""
    while prefix:
        last = ord(prefix[-1])
        if last < 0x10FFFF:
            return prefix[:-1] + chr(last + 1)
        prefix = prefix[:-1]
    return None


def sorted_range(names: list[str], prefix: str) -> list[str]:
    """The entries of the sorted list `names` that start with `prefix`."""
    lo = bisect_left(names, prefix)
    end = prefix_end(prefix)
    hi = len(names) if end is None else bisect_left(names, end, lo)
    return names[lo:hi]


_SCHEMA = """
CREATE TABLE IF NOT EXISTS objects (
    tbl TEXT NOT NULL,
    key TEXT NOT NULL,
    value TEXT NOT NULL,
    PRIMARY KEY (tbl, key)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS meta (
    name TEXT PRIMARY KEY,
    value TEXT NOT NULL
) WITHOUT ROWID;
"""


class Txn:
    """A staged write. Use through `Store.write()`; nothing is visible until commit."""

    def __init__(self, store: Store, index: int) -> None:
        self._store = store
        self.index = index
        self.puts: dict[tuple[str, str], Obj] = {}
        self.deletes: set[tuple[str, str]] = set()
        self.touched: set[str] = set()

    def get(self, tbl: str, key: str) -> Obj | None:
        """Read through the staged changes, so a txn sees its own writes."""
        k = (tbl, key)
        if k in self.deletes:
            return None
        if k in self.puts:
            return self.puts[k]
        return self._store.get(tbl, key)

    def put(self, tbl: str, key: str, obj: Obj) -> None:
        self.deletes.discard((tbl, key))
        self.puts[(tbl, key)] = obj

    def delete(self, tbl: str, key: str) -> None:
        self.puts.pop((tbl, key), None)
        if self._store.get(tbl, key) is not None:
            self.deletes.add((tbl, key))

    def touch(self, *resources: str) -> None:
        self.touched.update(resources)

    @property
    def empty(self) -> bool:
        return not (self.puts or self.deletes or self.touched)


class Store:
    """In-memory tables with an optional SQLite mirror; see the module docstring."""

    def __init__(
        self,
        path: Path | None = None,
        *,
        volatile: Iterable[str] = (),
        fsync: bool = False,
    ) -> None:
        self.path = path
        self.volatile = frozenset(volatile)
        self.hub = WatchHub()
        self._tables: dict[str, dict[str, Obj]] = {}
        self._resource_index: dict[str, int] = {}
        self._resource_names: list[str] = []
        # The highest index of a forgotten resource: prefix indexes never drop below it.
        self._prefix_floor = 0
        # Sorted keys of the tables someone scanned by prefix (built on first use).
        self._ordered: dict[str, list[str]] = {}
        self._index = 1
        self._base_index = 1
        self._commit_hooks: list[Callable[[Txn], None]] = []
        self._stage_hooks: list[Callable[[Txn], None]] = []
        self.writes = 0
        self.write_seconds = 0.0
        self.last_write_seconds = 0.0
        self._db: sqlite3.Connection | None = None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
            try:
                db.execute("PRAGMA journal_mode=WAL")
                # NORMAL survives a process crash (kill -9); FULL also survives power loss.
                db.execute(f"PRAGMA synchronous={'FULL' if fsync else 'NORMAL'}")
                db.executescript(_SCHEMA)
                self._db = db
                self._load()
            except (sqlite3.DatabaseError, ValueError, KeyError, TypeError) as exc:
                # Reading every object at start is what finds a damaged file: say so once,
                # with what to do, instead of a traceback from deep inside SQLite.
                db.close()
                self._db = None
                raise DataDirError(
                    f"the registry's state in {path} is unreadable ({exc}): restore the file"
                    " from a backup, or start with a fresh --data-dir"
                ) from exc

    # -- reads -------------------------------------------------------------------------

    @property
    def index(self) -> int:
        """The highest index committed (the Raft index of a Consul server)."""
        return self._index

    def get(self, tbl: str, key: str) -> Obj | None:
        return self._tables.get(tbl, {}).get(key)

    def table(self, tbl: str) -> Mapping[str, Obj]:
        """The live table; callers must not mutate it or the objects in it."""
        return self._tables.setdefault(tbl, {})

    def index_of(self, resource: str) -> int:
        """The index at which `resource` last changed (the load index if not since)."""
        return self._resource_index.get(resource, self._base_index)

    def max_index(self, resources: Iterable[str]) -> int:
        return max((self.index_of(r) for r in resources), default=self._base_index)

    def prefix_index(self, prefix: str) -> int:
        """The highest index of any resource starting with `prefix` (for prefix watches).

        Costs the number of resources under the prefix, not the number of resources.
        """
        best = max(self._base_index, self._prefix_floor)
        index = self._resource_index
        for res in sorted_range(self._resource_names, prefix):
            idx = index[res]
            if idx > best:
                best = idx
        return best

    def resources(self, prefix: str) -> list[str]:
        """The names of the resources with an index that start with `prefix`, in order."""
        return sorted_range(self._resource_names, prefix)

    def forget(self, resources: Iterable[str]) -> None:
        """Drop the indexes of resources that name nothing any more (Consul's tombstone
        reaping). Prefix indexes never go backwards: they stay at or above the highest
        index forgotten, as Consul's fall back to the table index."""
        names = self._resource_names
        for res in resources:
            idx = self._resource_index.pop(res, None)
            if idx is None:
                continue
            self._prefix_floor = max(self._prefix_floor, idx)
            i = bisect_left(names, res)
            if i < len(names) and names[i] == res:
                del names[i]

    def keys(self, tbl: str, prefix: str = "") -> list[str]:
        """The committed keys of `tbl` that start with `prefix`, in order.

        The first call for a table builds a sorted index of its keys that every commit
        then keeps current, so a prefix scan costs the keys it returns.
        """
        order = self._ordered.get(tbl)
        if order is None:
            order = sorted(self._tables.get(tbl, {}))
            self._ordered[tbl] = order
        return sorted_range(order, prefix) if prefix else list(order)

    # -- writes ------------------------------------------------------------------------

    def on_commit(self, hook: Callable[[Txn], None]) -> None:
        """Run `hook(txn)` after every commit (metrics, derived state)."""
        self._commit_hooks.append(hook)

    def before_commit(self, hook: Callable[[Txn], None]) -> None:
        """Run `hook(txn)` on every non-empty txn before it commits; it may stage more.

        For consequences that must be atomic with their cause, as in Consul's state
        store: a check turning critical invalidates the sessions that name it in the
        same commit. A hook that raises aborts the whole txn.
        """
        self._stage_hooks.append(hook)

    @contextmanager
    def write(self) -> Iterator[Txn]:
        """Stage a write; it commits when the block exits without an exception.

        The block must not await: the index is taken at the start and the event loop
        runs one write at a time, which is what makes check-and-set exact.
        """
        txn = Txn(self, self._index + 1)
        yield txn
        self._commit(txn)

    def _commit(self, txn: Txn) -> None:
        if txn.empty:
            return
        started = time.perf_counter()
        for stage in self._stage_hooks:
            stage(txn)
        if self._db is not None:
            self._persist(txn)
        for (tbl, key), obj in txn.puts.items():
            table = self._tables.setdefault(tbl, {})
            order = self._ordered.get(tbl)
            if order is not None and key not in table:
                insort(order, key)
            table[key] = obj
        for tbl, key in txn.deletes:
            if self._tables.get(tbl, {}).pop(key, _ABSENT) is not _ABSENT:
                order = self._ordered.get(tbl)
                if order is not None:
                    i = bisect_left(order, key)
                    if i < len(order) and order[i] == key:
                        del order[i]
        self._index = txn.index
        for res in txn.touched:
            if res not in self._resource_index:
                insort(self._resource_names, res)
            self._resource_index[res] = txn.index
        self.writes += 1
        self.last_write_seconds = time.perf_counter() - started
        self.write_seconds += self.last_write_seconds
        for hook in self._commit_hooks:
            try:
                hook(txn)
            except Exception:
                # The write is durable already: a broken follower must not fail it or
                # keep the watchers below from waking.
                log.exception("commit hook %r failed at index %d", hook, txn.index)
        if txn.touched:
            self.hub.notify(txn.touched)

    def _persist(self, txn: Txn) -> None:
        assert self._db is not None
        db = self._db
        try:
            db.execute("BEGIN IMMEDIATE")
            rows = [
                (tbl, key, json.dumps(obj, separators=(",", ":")))
                for (tbl, key), obj in txn.puts.items()
                if tbl not in self.volatile
            ]
            if rows:
                db.executemany(
                    "INSERT OR REPLACE INTO objects (tbl, key, value) VALUES (?, ?, ?)", rows
                )
            dels = [(tbl, key) for tbl, key in txn.deletes if tbl not in self.volatile]
            if dels:
                db.executemany("DELETE FROM objects WHERE tbl = ? AND key = ?", dels)
            db.execute(
                "INSERT OR REPLACE INTO meta (name, value) VALUES ('index', ?)", (str(txn.index),)
            )
            db.execute("COMMIT")
        except sqlite3.Error as exc:
            try:
                db.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            raise StoreError(f"store commit failed: {exc}") from exc

    def _load(self) -> None:
        assert self._db is not None
        row = self._db.execute("SELECT value FROM meta WHERE name = 'index'").fetchone()
        if row is not None:
            self._index = max(1, int(row[0]))
        for tbl, key, value in self._db.execute("SELECT tbl, key, value FROM objects"):
            self._tables.setdefault(tbl, {})[key] = json.loads(value)
        self._base_index = self._index

    def size_bytes(self) -> int:
        """Bytes on disk (database plus WAL), for metrics."""
        if self.path is None:
            return 0
        total = 0
        for suffix in ("", "-wal"):
            p = Path(str(self.path) + suffix)
            if p.exists():
                total += p.stat().st_size
        return total

    def close(self) -> None:
        self.hub.close()
        if self._db is not None:
            self._db.close()
            self._db = None
