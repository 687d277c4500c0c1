"""The check runner: runs the local agent's TTL, HTTP and TCP checks and records results.

It follows the `checks` table through a commit hook: a check registered, changed or
removed on the local node starts, restarts or stops its runner, whoever wrote it. A
status update that the runner itself commits keeps the same definition, so it does not
restart anything.

- TTL: a timer per check; expiry sets it critical ("TTL expired"). Pass/warn/fail call
  `reset_ttl`, which re-arms the timer even when the status did not change (such a write
  commits nothing, so the hook cannot see it).
- HTTP: a request every Interval (at least 1 s, as in Consul) with Timeout (default
  10 s): 2xx is passing, 429 warning, anything else or no answer critical.
- TCP: a connect every Interval; success is passing, failure critical.

On start every TTL/HTTP/TCP check of the local node is set critical again, as a Consul
agent does on restart: no result from before the restart is trusted.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time

import aiohttp

from registry.catalog import CRITICAL, PASSING, WARNING, Catalog
from registry.errors import RegistryError
from registry.http import parse_duration
from registry.store import Obj, Store, Txn

log = logging.getLogger(__name__)

MIN_INTERVAL = 1.0
DEFAULT_TIMEOUT = 10.0
OUTPUT_MAX = 4096
RUN_KINDS = ("ttl", "http", "tcp")


def http_status(code: int) -> str:
    """Consul's mapping of an HTTP check's response code to a check status."""
    if 200 <= code < 300:
        return PASSING
    if code == 429:
        return WARNING
    return CRITICAL


def _signature(chk: Obj) -> str:
    return str(chk["Type"]) + json.dumps(chk.get("Definition") or {}, sort_keys=True)


def runnable(kind: str, definition: Obj) -> bool:
    """Whether a stored definition has what its kind needs to run."""
    try:
        if kind == "ttl":
            return parse_duration(definition["TTL"]) > 0
        parse_duration(definition["Interval"])
        if definition.get("Timeout"):
            parse_duration(definition["Timeout"])
        return bool(definition["HTTP" if kind == "http" else "TCP"])
    except (KeyError, TypeError, ValueError, AttributeError):
        return False


class _Running:
    """One check being run: its definition signature and its timer or probe task."""

    def __init__(self, sig: str) -> None:
        self.sig = sig
        self.timer: asyncio.TimerHandle | None = None
        self.task: asyncio.Task[None] | None = None
        self.ttl = 0.0
        self.critical_since: float | None = None

    def stop(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
        if self.task is not None:
            self.task.cancel()


class CheckRunner:
    def __init__(self, store: Store, catalog: Catalog, rng: random.Random | None = None) -> None:
        self.store = store
        self.catalog = catalog
        self._rng = rng or random.Random()
        self._running: dict[str, _Running] = {}
        self._session: aiohttp.ClientSession | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._reaper: asyncio.Task[None] | None = None
        self._closed = False

    def __repr__(self) -> str:
        kinds: dict[str, int] = {}
        for cid in self._running:
            chk = self.catalog.get_check(self.catalog.node, cid)
            kind = chk["Type"] if chk is not None else "?"
            kinds[kind] = kinds.get(kind, 0) + 1
        return f"<CheckRunner node={self.catalog.node!r} running={kinds}>"

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._session = aiohttp.ClientSession(
            # A fresh connection per probe, as Consul does (DisableKeepAlives): a pooled
            # connection would keep "passing" an app that no longer accepts connections.
            connector=aiohttp.TCPConnector(force_close=True),
            headers={"User-Agent": "Consul Health Check", "Accept": "text/plain, text/*, */*"},
            cookie_jar=aiohttp.DummyCookieJar(),
        )
        node = self.catalog.node
        with self.store.write() as txn:
            for chk in self.catalog.node_checks(node):
                if chk["Type"] in RUN_KINDS:
                    self.catalog.set_check_status(
                        txn, node, chk["CheckID"], CRITICAL, "Registry restarted: no result yet"
                    )
        for chk in self.catalog.node_checks(node):
            # After a restart, spread the first probes over an interval (as Consul does)
            # rather than firing thousands at once; new checks probe at once.
            self._sync(chk, stagger=True)
        self.store.on_commit(self._on_commit)
        self._reaper = asyncio.ensure_future(self._reap_loop())

    async def aclose(self) -> None:
        self._closed = True
        for run in self._running.values():
            run.stop()
        tasks = [r.task for r in self._running.values() if r.task is not None]
        if self._reaper is not None:
            self._reaper.cancel()
            tasks.append(self._reaper)
        self._running.clear()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        if self._session is not None:
            await self._session.close()
            self._session = None

    # -- following the table -------------------------------------------------------------

    def _on_commit(self, txn: Txn) -> None:
        if self._closed:
            return
        node = self.catalog.node
        for (tbl, _key), obj in txn.puts.items():
            if tbl == "checks" and obj["Node"] == node:
                self._sync(obj)
        for tbl, key in txn.deletes:
            if tbl == "checks" and key.startswith(node + "/"):
                run = self._running.pop(key[len(node) + 1 :], None)
                if run is not None:
                    run.stop()

    def _sync(self, chk: Obj, stagger: bool = False) -> None:
        cid = chk["CheckID"]
        run = self._running.get(cid)
        sig = _signature(chk)
        if run is not None:
            if chk["Status"] != CRITICAL:
                run.critical_since = None
            elif run.critical_since is None:
                run.critical_since = time.monotonic()
            if run.sig == sig:
                return
            run.stop()
            del self._running[cid]
        if chk["Type"] not in RUN_KINDS or self._loop is None:
            return
        definition = chk.get("Definition") or {}
        if not runnable(chk["Type"], definition):
            # e.g. a catalog registration that names a type but no definition for it
            log.warning("check %s: %s definition not runnable: %r", cid, chk["Type"], definition)
            return
        run = _Running(sig)
        run.critical_since = time.monotonic() if chk["Status"] == CRITICAL else None
        self._running[cid] = run
        if chk["Type"] == "ttl":
            run.ttl = parse_duration(definition["TTL"])
            run.timer = self._loop.call_later(run.ttl, self._expire, cid, sig)
        else:
            delay = 0.0
            if stagger:
                delay = self._rng.uniform(
                    0, max(parse_duration(definition["Interval"]), MIN_INTERVAL)
                )
            run.task = self._loop.create_task(
                self._probe_loop(cid, sig, chk["Type"], definition, delay)
            )

    def reset_ttl(self, check_id: str) -> None:
        """Restart a TTL check's clock (after pass/warn/fail or a re-registration)."""
        run = self._running.get(check_id)
        if run is None or run.timer is None or self._loop is None:
            return
        run.timer.cancel()
        run.timer = self._loop.call_later(run.ttl, self._expire, check_id, run.sig)

    # -- results -------------------------------------------------------------------------

    def _record(self, check_id: str, sig: str, status: str, output: str) -> None:
        """Commit a result unless the check changed or went away meanwhile."""
        run = self._running.get(check_id)
        if run is None or run.sig != sig or self._closed:
            return
        try:
            with self.store.write() as txn:
                self.catalog.set_check_status(
                    txn, self.catalog.node, check_id, status, output[:OUTPUT_MAX]
                )
        except RegistryError as exc:
            log.warning("check %s: could not record result: %s", check_id, exc)

    def _expire(self, check_id: str, sig: str) -> None:
        chk = self.catalog.get_check(self.catalog.node, check_id)
        if chk is None or chk["Status"] == CRITICAL:
            return  # nothing to flip: rewriting the output would only wake watchers
        output = "TTL expired"
        if chk["Output"] and not chk["Output"].startswith("TTL expired"):
            output += " (last output before timeout follows): " + chk["Output"]
        elif chk["Output"]:
            output = chk["Output"]
        self._record(check_id, sig, CRITICAL, output)

    async def _probe_loop(
        self, check_id: str, sig: str, kind: str, definition: Obj, delay: float
    ) -> None:
        await asyncio.sleep(delay)
        interval = max(parse_duration(definition["Interval"]), MIN_INTERVAL)
        timeout = parse_duration(definition.get("Timeout") or "0") or DEFAULT_TIMEOUT
        while True:
            started = time.monotonic()
            try:
                if kind == "http":
                    status, output = await self._probe_http(definition, timeout)
                else:
                    status, output = await probe_tcp(definition["TCP"], timeout)
            except Exception as exc:  # a probe must never stop its check
                log.exception("check %s: probe failed", check_id)
                status, output = CRITICAL, f"check failed: {exc!r}"
            self._record(check_id, sig, status, output)
            await asyncio.sleep(max(0.0, interval - (time.monotonic() - started)))

    async def _probe_http(self, definition: Obj, timeout: float) -> tuple[str, str]:
        assert self._session is not None
        url = definition["HTTP"]
        method = definition.get("Method") or "GET"
        headers: list[tuple[str, str]] = [
            (k, v) for k, vs in (definition.get("Header") or {}).items() for v in vs
        ]
        try:
            async with self._session.request(
                method,
                url,
                headers=headers,
                data=(definition.get("Body") or None),
                timeout=aiohttp.ClientTimeout(total=timeout),
                ssl=not definition.get("TLSSkipVerify"),
            ) as resp:
                body = await resp.content.read(OUTPUT_MAX)
                text = body.decode("utf-8", "replace")
                return (
                    http_status(resp.status),
                    f"HTTP {method} {url}: {resp.status} {resp.reason} Output: {text}",
                )
        except TimeoutError:
            return CRITICAL, f"{method} {url}: timed out after {timeout:g}s"
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            return CRITICAL, f"{method} {url}: {exc or type(exc).__name__}"

    # -- DeregisterCriticalServiceAfter --------------------------------------------------

    async def _reap_loop(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            try:
                self.reap(time.monotonic())
            except RegistryError as exc:
                log.warning("reaping critical services failed: %s", exc)

    def reap(self, now: float) -> list[str]:
        """Deregister services whose check has been critical past its deadline."""
        node = self.catalog.node
        doomed: list[str] = []
        for cid, run in list(self._running.items()):
            if run.critical_since is None:
                continue
            chk = self.catalog.get_check(node, cid)
            if chk is None or not chk["ServiceID"]:
                continue
            after = (chk.get("Definition") or {}).get("DeregisterCriticalServiceAfter")
            if after and now - run.critical_since >= parse_duration(after):
                doomed.append(chk["ServiceID"])
        if doomed:
            with self.store.write() as txn:
                for sid in doomed:
                    self.catalog.delete_service(txn, node, sid)
            log.info("deregistered services critical for too long: %s", doomed)
        return doomed


async def probe_tcp(address: str, timeout: float) -> tuple[str, str]:
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, int(port)), timeout)
    except TimeoutError:
        return CRITICAL, f"dial tcp {address}: i/o timeout after {timeout:g}s"
    except (OSError, ValueError) as exc:
        return CRITICAL, f"dial tcp {address}: {exc}"
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return PASSING, f"TCP connect {address}: Success"
