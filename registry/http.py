"""The registry's HTTP conventions: Consul's headers, errors, bodies and blocking queries.

Handlers (agent.py, catalog.py, health.py, kv.py, ...) use only what is here to talk
HTTP: `context(request)` for the shared state, `read_body` / `Body` to decode a request
the way Consul does (keys case-insensitive), `block` for `?index=&wait=`, and `reply`
to answer with `X-Consul-Index`. The middleware adds the leader headers, turns
`RegistryError` into Consul's plain-text errors, enforces the body limit and counts
requests for `/v1/agent/metrics`.
"""

from __future__ import annotations

import json
import random
import re
import socket
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web

from registry import nesting
from registry.errors import BadRequestError, RegistryError, TooLargeError
from registry.store import Store

if TYPE_CHECKING:
    from registry.filter import Filter

MAX_BODY = 512 * 1024
DEFAULT_WAIT = 300.0
MAX_WAIT = 600.0
VERSION = "1.20.0"  # the Consul API level we answer as (agent/self Config.Version)


@dataclass
class RegistrySpec:
    """How a registry is run (the `tether registry` flags)."""

    host: str = "127.0.0.1"
    port: int = 8500
    data_dir: Path | None = None
    management_token: str | None = None
    node: str = field(default_factory=socket.gethostname)
    datacenter: str = "dc1"
    fsync: bool = False
    # Consul's session_ttl_min: the shortest TTL a session may ask for.
    session_ttl_min: float = 10.0


class Context:
    """Everything a handler needs; one per running registry."""

    def __init__(self, spec: RegistrySpec, store: Store) -> None:
        from registry.acl import Authorizer
        from registry.catalog import Catalog

        self.spec = spec
        self.store = store
        self.acl = Authorizer(store, spec.management_token)
        advertise = "127.0.0.1" if spec.host in ("", "0.0.0.0", "::") else spec.host
        self.catalog = Catalog(store, spec.node, spec.datacenter, advertise, VERSION)
        self.started = time.time()
        self.address = spec.host
        self.port = spec.port
        self.requests: Counter[tuple[str, str, int]] = Counter()
        self.blocking_in_flight = 0
        # Subsystems (check runner, session reaper, ...) registered by the server.
        self.parts: dict[str, Any] = {}


CONTEXT: web.AppKey[Context] = web.AppKey("registry_context", Context)


def context(request: web.Request) -> Context:
    return request.app[CONTEXT]


# -- responses -------------------------------------------------------------------------


def dumps(data: Any) -> str:
    return json.dumps(data, separators=(",", ":"))


def reply(data: Any, index: int | None = None, status: int = 200) -> web.Response:
    """A JSON answer; `index` becomes X-Consul-Index (reads must pass it)."""
    resp = web.Response(text=dumps(data), status=status, content_type="application/json")
    if index is not None:
        resp.headers["X-Consul-Index"] = str(max(1, index))
    return resp


def reply_true() -> web.Response:
    return reply(True)


# -- request decoding ----------------------------------------------------------------


async def read_body(request: web.Request, *, allow_empty: bool = False) -> Any:
    """The request body as JSON, or a 400 that says why (413 over the limit)."""
    if request.content_length is not None and request.content_length > MAX_BODY:
        raise TooLargeError(f"Request body too large: over {MAX_BODY} bytes")
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge as exc:
        raise TooLargeError(f"Request body too large: over {MAX_BODY} bytes") from exc
    if not raw.strip():
        if allow_empty:
            return None
        raise BadRequestError("Request decode failed: empty body")
    try:
        return nesting.loads(raw)
    except ValueError as exc:  # UnicodeDecodeError and NestingError are ValueErrors
        raise BadRequestError(f"Request decode failed: {exc}") from exc


_MISSING = object()


def _fold(key: str) -> str:
    return key.lower().replace("_", "")


class Body:
    """A JSON object read the way Consul reads it: keys match case-insensitively.

    Every accessor names the offending field in its error, with its path from the root
    (`Check.Interval`), so a bad request says exactly what was wrong.
    """

    def __init__(self, obj: Any, path: str = "") -> None:
        if not isinstance(obj, dict):
            where = path or "body"
            raise BadRequestError(f"Request decode failed: {where}: expected an object")
        self.path = path
        self.raw = obj
        # Consul also accepts snake_case aliases ("tagged_addresses", which py-consul sends).
        self._lower = {_fold(k): k for k in obj if isinstance(k, str)}

    def has(self, name: str) -> bool:
        return _fold(name) in self._lower

    def _where(self, name: str) -> str:
        return f"{self.path}.{name}" if self.path else name

    def _get(self, name: str) -> Any:
        k = self._lower.get(_fold(name))
        return _MISSING if k is None else self.raw[k]

    def _fail(self, name: str, want: str, value: Any) -> BadRequestError:
        got = type(value).__name__
        return BadRequestError(
            f"Request decode failed: {self._where(name)}: expected {want}, got {got}"
        )

    def value(self, name: str, default: Any = None) -> Any:
        v = self._get(name)
        return default if v is _MISSING or v is None else v

    def text(self, name: str, default: str = "") -> str:
        v = self._get(name)
        if v is _MISSING or v is None:
            return default
        if not isinstance(v, str):
            raise self._fail(name, "a string", v)
        return v

    def integer(self, name: str, default: int = 0) -> int:
        v = self._get(name)
        if v is _MISSING or v is None:
            return default
        if isinstance(v, bool) or not isinstance(v, int):
            if isinstance(v, float) and v.is_integer():
                return int(v)
            raise self._fail(name, "an integer", v)
        return v

    def flag(self, name: str, default: bool = False) -> bool:
        v = self._get(name)
        if v is _MISSING or v is None:
            return default
        if not isinstance(v, bool):
            raise self._fail(name, "a boolean", v)
        return v

    def strings(self, name: str) -> list[str]:
        v = self._get(name)
        if v is _MISSING or v is None:
            return []
        if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
            raise self._fail(name, "a list of strings", v)
        return list(v)

    def string_map(self, name: str) -> dict[str, str]:
        v = self._get(name)
        if v is _MISSING or v is None:
            return {}
        if not isinstance(v, dict) or not all(isinstance(x, str) for x in v.values()):
            raise self._fail(name, "an object of strings", v)
        return dict(v)

    def obj(self, name: str) -> Body | None:
        v = self._get(name)
        if v is _MISSING or v is None:
            return None
        if not isinstance(v, dict):
            raise self._fail(name, "an object", v)
        return Body(v, self._where(name))

    def obj_list(self, name: str) -> list[Body]:
        v = self._get(name)
        if v is _MISSING or v is None:
            return []
        if not isinstance(v, list):
            raise self._fail(name, "a list of objects", v)
        return [Body(x, f"{self._where(name)}[{i}]") for i, x in enumerate(v)]

    def duration(self, name: str, default: float | None = None) -> float | None:
        """A Go duration ("10s", "1m30s") or a number of nanoseconds, in seconds."""
        v = self._get(name)
        if v is _MISSING or v is None or v == "":
            return default
        if isinstance(v, bool):
            raise self._fail(name, "a duration", v)
        if isinstance(v, int | float):
            return float(v) / 1e9
        if not isinstance(v, str):
            raise self._fail(name, "a duration", v)
        try:
            return parse_duration(v)
        except ValueError as exc:
            raise BadRequestError(f"Request decode failed: {self._where(name)}: {exc}") from exc


_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")
_UNITS = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "μs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}


def parse_duration(text: str) -> float:
    """Parse a Go duration string ("1m30s", "250ms", "0") into seconds."""
    s = text.strip()
    if s in ("0", "+0", "-0"):
        return 0.0
    sign = 1.0
    if s[:1] in "+-":
        sign = -1.0 if s[0] == "-" else 1.0
        s = s[1:]
    if not s:
        raise ValueError(f"invalid duration {text!r}")
    pos = 0
    total = 0.0
    while pos < len(s):
        m = _DURATION_PART.match(s, pos)
        if m is None:
            raise ValueError(f"invalid duration {text!r}")
        total += float(m.group(1)) * _UNITS[m.group(2)]
        pos = m.end()
    return sign * total


def format_duration(seconds: float) -> str:
    """Seconds as the Go duration string Consul prints ("10s", "1m30s", "500ms")."""
    if seconds == 0:
        return "0s"
    if seconds < 1e-6:
        return f"{round(seconds * 1e9)}ns"
    if seconds < 1e-3:
        return f"{seconds * 1e6:g}µs"
    if seconds < 1:
        ms = seconds * 1000
        return f"{ms:g}ms"
    whole = int(seconds)
    frac = seconds - whole
    h, rem = divmod(whole, 3600)
    m, s = divmod(rem, 60)
    out = ""
    if h:
        out += f"{h}h"
    if h or m:
        out += f"{m}m"
    out += f"{s + frac:g}s"
    return out


# -- query parameters ------------------------------------------------------------------


def query_flag(request: web.Request, name: str) -> bool:
    """Consul's boolean parameters: present without a value means true."""
    if name not in request.query:
        return False
    v = request.query[name].lower()
    return v in ("", "1", "true", "yes")


def query_int(request: web.Request, name: str, default: int | None = None) -> int | None:
    v = request.query.get(name)
    if v is None or v == "":
        return default
    try:
        return int(v)
    except ValueError as exc:
        raise BadRequestError(f"Invalid {name} parameter: {v!r} is not an integer") from exc


def query_wait(request: web.Request) -> float:
    v = request.query.get("wait")
    if v is None or v == "":
        return DEFAULT_WAIT
    try:
        wait = parse_duration(v) if not v.isdigit() else float(v)
    except ValueError as exc:
        raise BadRequestError(f"Invalid wait time: {v!r}") from exc
    return min(max(wait, 0.0), MAX_WAIT)


def query_filter(request: web.Request) -> Filter | None:
    """The compiled `?filter=` expression (a 400 saying where it is malformed), if any."""
    expr = request.query.get("filter")
    if not expr:
        return None
    from registry.filter import compile_filter

    return compile_filter(expr)


def apply_filter(flt: Filter | None, items: list[Any]) -> list[Any]:
    return items if flt is None else [x for x in items if flt.matches(x)]


# Answered by the local agent, which takes no `?dc=` (Consul ignores it there).
_AGENT_LOCAL = ("/v1/agent/", "/v1/event/list")


def check_datacenter(request: web.Request) -> None:
    """`?dc=` naming another datacenter fails as Consul's does (structs.ErrNoDCPath): this
    registry is the only server of its own datacenter and has no path to any other."""
    dc = request.query.get("dc")
    if dc and dc != context(request).spec.datacenter and not request.path.startswith(_AGENT_LOCAL):
        raise RegistryError("No path to datacenter")


async def block(
    request: web.Request,
    resources: Sequence[str],
    *,
    prefixes: Sequence[str] = (),
    index_fn: Callable[[], int] | None = None,
) -> int:
    """Hold a blocking query until its view's index passes `?index=`, or `wait` ends.

    The view's index is the highest index of `resources` (and of anything under
    `prefixes`) unless `index_fn` computes it. Returns the index to answer with.
    """
    ctx = context(request)
    store = ctx.store

    def current() -> int:
        if index_fn is not None:
            return index_fn()
        idx = store.max_index(resources) if resources else 0
        for p in prefixes:
            idx = max(idx, store.prefix_index(p))
        return max(idx, 1)

    min_index = query_int(request, "index", 0) or 0
    if min_index <= 0 or min_index > store.index:
        return current()
    wait = query_wait(request)
    wait += random.uniform(0, wait / 16)
    deadline = time.monotonic() + wait
    ctx.blocking_in_flight += 1
    try:
        while True:
            idx = current()
            if idx > min_index:
                return idx
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return idx
            await store.hub.wait(resources, remaining, prefixes)
            if store.hub.closed:
                return current()
    finally:
        ctx.blocking_in_flight -= 1


# -- middleware ------------------------------------------------------------------------

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _route_name(request: web.Request) -> str:
    info = request.match_info.route.resource
    return info.canonical if info is not None else "unmatched"


@web.middleware
async def consul_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    ctx = context(request)
    try:
        check_datacenter(request)
        resp = await handler(request)
    except RegistryError as exc:
        resp = web.Response(text=exc.message, status=exc.status, content_type="text/plain")
    except web.HTTPRequestEntityTooLarge:
        resp = web.Response(
            text=f"Request body too large: over {MAX_BODY} bytes",
            status=413,
            content_type="text/plain",
        )
    except web.HTTPException as exc:
        exc.headers["X-Consul-KnownLeader"] = "true"
        exc.headers["X-Consul-LastContact"] = "0"
        if request.method == "GET":
            # py-consul reads the index even from a 404 (unknown endpoint) before failing.
            exc.headers["X-Consul-Index"] = str(ctx.store.index)
        ctx.requests[(request.method, _route_name(request), exc.status)] += 1
        raise
    resp.headers["X-Consul-KnownLeader"] = "true"
    resp.headers["X-Consul-LastContact"] = "0"
    if request.method == "GET" and "X-Consul-Index" not in resp.headers:
        resp.headers["X-Consul-Index"] = str(ctx.store.index)
    ctx.requests[(request.method, _route_name(request), resp.status)] += 1
    return resp
