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
than any index handed out before, so indexes never go backwards.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from registry.errors import StoreError
from registry.watch import WatchHub

Obj = dict[str, Any]

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
        self._index = 1
        self._base_index = 1
        self._commit_hooks: list[Callable[[Txn], None]] = []
        self.writes = 0
        self.write_seconds = 0.0
        self._db: sqlite3.Connection | None = None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            # NORMAL survives a process crash (kill -9); FULL also survives power loss.
            db.execute(f"PRAGMA synchronous={'FULL' if fsync else 'NORMAL'}")
            db.executescript(_SCHEMA)
            self._db = db
            self._load()

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
        """The highest index of any resource starting with `prefix` (for prefix watches)."""
        best = self._base_index
        for res, idx in self._resource_index.items():
            if idx > best and res.startswith(prefix):
                best = idx
        return best

    # -- writes ------------------------------------------------------------------------

    def on_commit(self, hook: Callable[[Txn], None]) -> None:
        """Run `hook(txn)` after every commit (metrics, derived state)."""
        self._commit_hooks.append(hook)

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
        if self._db is not None:
            self._persist(txn)
        for (tbl, key), obj in txn.puts.items():
            self._tables.setdefault(tbl, {})[key] = obj
        for tbl, key in txn.deletes:
            self._tables.get(tbl, {}).pop(key, None)
        self._index = txn.index
        for res in txn.touched:
            self._resource_index[res] = txn.index
        self.writes += 1
        self.write_seconds += time.perf_counter() - started
        for hook in self._commit_hooks:
            hook(txn)
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
