"""Sessions: creation rules, invalidation (locks released or keys deleted) and TTL expiry.

Follows Consul (`state/session.go`, `session_ttl.go`):
- a session belongs to a node and names health checks (default: the node's
  `serfHealth`); it cannot be created on a missing node or with a missing or critical
  check, and it is invalidated in the same commit as one of its checks turning critical
  or being deregistered, or its node being deregistered;
- a session with a TTL is invalidated when not renewed for twice the TTL (Consul's
  `sessionTTLMultiplier`: the TTL is a lower bound, and the grace covers requests in
  flight and clock rates); timers live in memory and restart in full when the registry
  does, as they do on a Consul leader election;
- on invalidation every lock the session holds is released (behavior `release`) or its
  key deleted (`delete`), and each of those keys refuses new locks for the session's
  LockDelay (in memory only, as in Consul).

`Sessions` is a server part: `start()` arms the timers and runs the reaper.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from registry import kv
from registry.errors import BadRequestError
from registry.store import Obj, Store, Txn

log = logging.getLogger(__name__)

TABLE = "sessions"
SERF_CHECK = "serfHealth"
DEFAULT_LOCK_DELAY = 15.0
MAX_LOCK_DELAY = 60.0
TTL_MAX = 86400.0
TTL_MULTIPLIER = 2.0


@dataclass(frozen=True)
class SessionPolicy:
    """Limits on sessions (Consul's `session_ttl_min`; the rest are fixed there too)."""

    ttl_min: float = 10.0
    ttl_max: float = TTL_MAX
    ttl_multiplier: float = TTL_MULTIPLIER


def resource(session_id: str) -> str:
    return f"session:{session_id}"


def ttl_seconds(session: Obj) -> float:
    """The session's TTL in seconds (0 when it has none)."""
    from registry.http import parse_duration

    ttl = session.get("TTL") or ""
    return parse_duration(ttl) if ttl else 0.0


def check_keys(session: Obj) -> list[str]:
    """The `checks` table keys a session depends on."""
    node = session["Node"]
    ids = list(session.get("NodeChecks") or [])
    ids += [c["ID"] for c in session.get("ServiceChecks") or []]
    return [f"{node}/{cid}" for cid in dict.fromkeys(ids)]


def held_keys(txn: Txn, session_id: str) -> list[str]:
    """Keys whose lock `session_id` may hold, as the txn sees them (callers re-check)."""
    found = {k for k, e in txn._store.table(kv.TABLE).items() if e.get("Session") == session_id}
    found.update(
        k for (t, k), e in txn.puts.items() if t == kv.TABLE and e.get("Session") == session_id
    )
    return sorted(found)


class Sessions:
    """Session state operations, lock-delays and the TTL reaper."""

    def __init__(
        self,
        store: Store,
        local_node: str,
        policy: SessionPolicy | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.local_node = local_node
        self.policy = policy or SessionPolicy()
        self.clock = clock
        self._deadlines: dict[str, float] = {}
        self._heap: list[tuple[float, str]] = []
        self._lock_delays: dict[str, float] = {}
        self._by_check: dict[str, set[str]] = {}
        self._by_check_index = -1
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.expired = 0
        now = clock()
        for sid, sess in store.table(TABLE).items():
            self._arm(sid, sess, now)
        store.before_commit(self._cascade)
        store.on_commit(self._track)

    # -- TTL timers ----------------------------------------------------------------------

    def _arm(self, sid: str, session: Obj, now: float) -> None:
        ttl = ttl_seconds(session)
        if ttl <= 0:
            return
        deadline = now + ttl * self.policy.ttl_multiplier
        self._deadlines[sid] = deadline
        heapq.heappush(self._heap, (deadline, sid))
        self._changed.set()

    def _track(self, txn: Txn) -> None:
        """Arm timers of new sessions and drop those of ended ones."""
        now = self.clock()
        for (tbl, key), obj in txn.puts.items():
            if tbl == TABLE and key not in self._deadlines:
                self._arm(key, obj, now)
        for tbl, key in txn.deletes:
            if tbl == TABLE:
                self._deadlines.pop(key, None)

    def renew(self, session_id: str) -> Obj | None:
        """Restart a session's TTL; None if there is no such session."""
        sess = self.store.get(TABLE, session_id)
        if sess is None:
            return None
        self._arm(session_id, sess, self.clock())
        return sess

    def due(self, now: float) -> list[str]:
        """Sessions whose TTL lapsed by `now` (pure: no writes)."""
        out: list[str] = []
        heap = self._heap
        while heap and heap[0][0] <= now:
            deadline, sid = heapq.heappop(heap)
            if self._deadlines.get(sid) == deadline:
                del self._deadlines[sid]
                out.append(sid)
        return out

    def next_deadline(self) -> float | None:
        heap = self._heap
        while heap and self._deadlines.get(heap[0][1]) != heap[0][0]:
            heapq.heappop(heap)
        return heap[0][0] if heap else None

    def expire(self, now: float) -> int:
        """Invalidate every session whose TTL lapsed; returns how many."""
        due = [sid for sid in self.due(now) if self.store.get(TABLE, sid) is not None]
        if due:
            try:
                with self.store.write() as txn:
                    for sid in due:
                        self.destroy(txn, sid)
            except Exception:
                for sid in due:  # not ended: try again on the next pass
                    self._deadlines[sid] = now
                    heapq.heappush(self._heap, (now, sid))
                raise
            self.expired += len(due)
            log.info("sessions expired: %s", ", ".join(due))
        return len(due)

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._reap(), name="session-reaper")

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _reap(self) -> None:
        while True:
            self._changed.clear()
            try:
                self.expire(self.clock())
            except Exception:  # a failed commit must not stop expiry for good
                log.exception("session expiry failed; retrying")
                await asyncio.sleep(1.0)
                continue
            nxt = self.next_deadline()
            timeout = None if nxt is None else max(0.0, nxt - self.clock())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), timeout)

    # -- lock-delay ----------------------------------------------------------------------

    def lock_delayed(self, key: str) -> bool:
        """Whether `key` refuses locks because its last holder's session just ended."""
        until = self._lock_delays.get(key)
        if until is None:
            return False
        if until <= self.clock():
            del self._lock_delays[key]
            return False
        return True

    # -- writes --------------------------------------------------------------------------

    def create(self, txn: Txn, spec: Obj) -> Obj:
        """Validate and stage a new session; `spec` holds the decoded request fields."""
        node = spec["Node"]
        behavior = spec["Behavior"] or "release"
        if behavior not in ("release", "delete"):
            raise BadRequestError(f"Invalid Behavior setting '{behavior}'")
        ttl = spec["TTL"] or ""
        if ttl:
            from registry.http import parse_duration

            try:
                secs = parse_duration(ttl)
            except ValueError as exc:
                raise BadRequestError(f"Invalid Session TTL '{ttl}': {exc}") from exc
            pol = self.policy
            if secs != 0 and not (pol.ttl_min <= secs <= pol.ttl_max):
                raise BadRequestError(
                    f"Invalid Session TTL '{ttl}', must be between "
                    f"[{_fmt(pol.ttl_min)}={_fmt(pol.ttl_max)}]"
                )
        delay = spec["LockDelay"]
        if delay < 0 or delay > MAX_LOCK_DELAY:
            raise BadRequestError(f"Lock delay must be between 0 and {_fmt(MAX_LOCK_DELAY)}")
        if txn.get("nodes", node) is None and node != self.local_node:
            raise BadRequestError("Missing node registration")
        session: Obj = {
            "ID": spec.get("ID") or str(uuid.uuid4()),
            "Name": spec["Name"],
            "Node": node,
            "LockDelay": round(delay * 1e9),
            "Behavior": behavior,
            "TTL": ttl,
            "NodeChecks": spec["NodeChecks"],
            "ServiceChecks": spec["ServiceChecks"] or None,
            "CreateIndex": txn.index,
            "ModifyIndex": txn.index,
        }
        for key in check_keys(session):
            chk = txn.get("checks", key)
            cid = key.partition("/")[2]
            if chk is None:
                # The local agent is alive by definition, registered check or not.
                if cid == SERF_CHECK and node == self.local_node:
                    continue
                raise BadRequestError(f"Missing check '{cid}' registration")
            if chk.get("Status") == "critical":
                raise BadRequestError(f"Check '{cid}' is in critical state")
        if txn.get(TABLE, session["ID"]) is not None:
            raise BadRequestError(f"Session ID '{session['ID']}' already exists")
        txn.put(TABLE, session["ID"], session)
        txn.touch("sessions", resource(session["ID"]))
        return session

    def destroy(self, txn: Txn, session_id: str) -> bool:
        """End a session: release or delete its locks and arm their lock-delay."""
        sess = txn.get(TABLE, session_id)
        if sess is None:
            return False
        delay = sess.get("LockDelay", 0) / 1e9
        until = self.clock() + delay
        for key in held_keys(txn, session_id):
            entry = txn.get(kv.TABLE, key)
            if entry is None or entry.get("Session") != session_id:
                continue
            if sess.get("Behavior") == "delete":
                kv.delete(txn, key)
            else:
                kv.release(txn, entry)
            if delay > 0:
                self._lock_delays[key] = until
        txn.delete(TABLE, session_id)
        txn.touch("sessions", resource(session_id))
        return True

    # -- invalidation by health ----------------------------------------------------------

    def _sessions_by_check(self) -> dict[str, set[str]]:
        idx = self.store.index_of("sessions")
        if idx != self._by_check_index:
            by: dict[str, set[str]] = {}
            for sid, sess in self.store.table(TABLE).items():
                for key in check_keys(sess):
                    by.setdefault(key, set()).add(sid)
            self._by_check = by
            self._by_check_index = idx
        return self._by_check

    def _cascade(self, txn: Txn) -> None:
        """In the same commit: a failing or removed check or node ends its sessions."""
        doomed: set[str] = set()
        by_check: dict[str, set[str]] | None = None
        for (tbl, key), obj in txn.puts.items():
            if tbl == "checks" and obj.get("Status") == "critical":
                by_check = by_check if by_check is not None else self._sessions_by_check()
                doomed.update(by_check.get(key, ()))
        gone_nodes: set[str] = set()
        for tbl, key in txn.deletes:
            if tbl == "checks":
                by_check = by_check if by_check is not None else self._sessions_by_check()
                doomed.update(by_check.get(key, ()))
            elif tbl == "nodes":
                gone_nodes.add(key)
        if gone_nodes:
            for sid, sess in self.store.table(TABLE).items():
                if sess["Node"] in gone_nodes:
                    doomed.add(sid)
        for sid in sorted(doomed):
            if self.destroy(txn, sid):
                log.info("session %s invalidated by a health change", sid)


def _fmt(seconds: float) -> str:
    from registry.http import format_duration

    return format_duration(seconds)
