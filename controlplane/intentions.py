"""Consul's intentions API on the control plane, over the `Intention` resources.

Consul 1.9+ keeps intentions as `service-intentions` config entries, one per
destination with a list of sources; Tether keeps them the same way, as `Intention`
resources in the policy store (the registry KV), so there is one source of truth: an
intention written here is what `tether get intention` shows and what the sidecars
enforce, and one applied with `tether apply` is what these endpoints answer.

Routes (py-consul's `connect.intentions`): `GET|PUT|DELETE /v1/connect/intentions/exact`
(`?source=&destination=`, each `name` or `namespace/name`, `*` allowed), `GET
/v1/connect/intentions` (`?filter=`), `GET /v1/connect/intentions/check`, `GET
/v1/connect/intentions/match` (`?by=source|destination&name=...`, repeatable). The
legacy UUID endpoints are not served (py-consul does not implement them either).

Who may: writes need `service:write` on the destination (Consul's `intentions:write`,
which the registry's rule language folds into service write), checked with the
caller's token, and the store's write then carries that same token, so the registry's
ACLs on the policy prefix decide as well (the control plane lends nobody its own
token). Reads need `service:read` on the destination (`exact`, `check`) or on each
name (`match`); the list needs `key_prefix "tether/v1/" read`, as any policy listing.
Errors are Consul's: a status and a plain-text message.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

from aiohttp import web

from controlplane.api import _cp, route
from controlplane.auth import READ_POLICY, Permission, caller_token
from controlplane.ca.routes import consul_api
from controlplane.errors import (
    BadRequestError,
    NotFoundError,
    PermissionDeniedError,
    UnauthorizedError,
)
from controlplane.schema import (
    API_VERSION,
    DEFAULT_NAMESPACE,
    WILDCARD,
    IntentionSourceSpec,
    IntentionSpec,
    Problem,
    Resource,
    ResourceKey,
    SchemaError,
    check_resource,
)
from controlplane.store import ConfigSnapshot
from registry.errors import BadRequestError as FilterError
from registry.filter import compile_filter
from wire.authz import Intentions, Rule, Source, precedence

MAX_BODY = 64 * 1024
BASE = "/v1/connect/intentions"


def register(app: web.Application) -> None:
    """The routes, open at the middleware: each handler checks the caller's token
    against the service it concerns, which only the request names."""
    route(app, "GET", BASE, consul_api(list_intentions), None)
    route(app, "GET", f"{BASE}/exact", consul_api(get_exact), None)
    route(app, "PUT", f"{BASE}/exact", consul_api(put_exact), None)
    route(app, "DELETE", f"{BASE}/exact", consul_api(delete_exact), None)
    route(app, "GET", f"{BASE}/check", consul_api(check), None)
    route(app, "GET", f"{BASE}/match", consul_api(match), None)


# -- names -----------------------------------------------------------------------------------


def parse_entry(text: str, what: str) -> tuple[str, str]:
    """`name` or `namespace/name` (Consul's parseIntentionMatchEntry) → (namespace, name)."""
    ns, sep, name = text.partition("/")
    if not sep:
        ns, name = DEFAULT_NAMESPACE, text
    if not ns or not name or "/" in name:
        raise BadRequestError(f"{what} {text!r} is invalid: expected name or namespace/name")
    return ns, name


def _param(request: web.Request, name: str) -> str:
    values = request.query.getall(name, [])
    if len(values) != 1 or not values[0]:
        raise BadRequestError(f"required query parameter '{name}' not set")
    return values[0]


async def _require(request: web.Request, *wanted: Permission) -> None:
    """Consul answers a missing token as the anonymous token: 403, not 401."""
    try:
        await _cp(request).authorizer.require(caller_token(request.headers), *wanted)
    except UnauthorizedError as exc:
        raise PermissionDeniedError(f"Permission denied: {exc}") from None


def _service(name: str, access: str) -> Permission:
    return Permission("service", name, access)


# -- Consul's JSON ---------------------------------------------------------------------------

_HEADER_KINDS = (("exact", "Exact"), ("prefix", "Prefix"), ("suffix", "Suffix"), ("regex", "Regex"))


def consul_intention(res: Resource, src: IntentionSourceSpec) -> dict[str, Any]:
    """One source of an Intention as Consul's `structs.Intention`."""
    src_ns = src.namespace if src.namespace is not None else res.namespace
    out: dict[str, Any] = {
        "ID": "",
        "Description": src.description,
        "SourceNS": src_ns,
        "SourceName": src.name,
        "DestinationNS": res.namespace,
        "DestinationName": res.name,
        "SourceType": "consul",
        "Action": src.action or "",
        "Precedence": precedence(src_ns, src.name, res.namespace, res.name),
        "CreateIndex": res.metadata.generation,
        "ModifyIndex": res.metadata.generation,
    }
    if src.permissions:
        perms = []
        for p in src.permissions:
            http: dict[str, Any] = {}
            if p.http.path is not None:
                for key, value in (("PathExact", p.http.path.exact),
                                   ("PathPrefix", p.http.path.prefix),
                                   ("PathRegex", p.http.path.regex)):  # fmt: skip
                    if value is not None:
                        http[key] = value
            if p.http.headers:
                headers = []
                for h in p.http.headers:
                    hd: dict[str, Any] = {"Name": h.name}
                    for attr, key in _HEADER_KINDS:
                        if getattr(h, attr) is not None:
                            hd[key] = getattr(h, attr)
                    if h.present:
                        hd["Present"] = True
                    if h.invert:
                        hd["Invert"] = True
                    headers.append(hd)
                http["Header"] = headers
            if p.http.methods:
                http["Methods"] = list(p.http.methods)
            perms.append({"Action": p.action, "HTTP": http})
        out["Permissions"] = perms
    return out


def _lower_keys(value: Any) -> Any:
    """Consul decodes request bodies case-insensitively."""
    if isinstance(value, dict):
        return {str(k).lower(): _lower_keys(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_lower_keys(v) for v in value]
    return value


def source_document(body: Mapping[str, Any], name: str, namespace: str) -> dict[str, Any]:
    """A Consul intention body (keys lower-cased) → one `sources` entry of an Intention."""
    for unsupported in ("sourcepeer", "sourcepartition", "destinationpartition"):
        if body.get(unsupported):
            raise BadRequestError(f"{unsupported} is not supported")
    if body.get("meta"):
        raise BadRequestError("Meta is not supported: intentions are stored as Intention resources")
    stype = body.get("sourcetype") or "consul"
    if stype != "consul":
        raise BadRequestError(f"SourceType must be 'consul', not {stype!r}")
    src: dict[str, Any] = {"name": name, "namespace": namespace}
    if body.get("action"):
        src["action"] = body["action"]
    if body.get("description"):
        src["description"] = body["description"]
    perms = body.get("permissions")
    if perms:
        if not isinstance(perms, list):
            raise BadRequestError("Permissions must be a list")
        src["permissions"] = [_permission_document(p, i) for i, p in enumerate(perms)]
    return src


def _permission_document(perm: Any, i: int) -> dict[str, Any]:
    if not isinstance(perm, dict):
        raise BadRequestError(f"Permissions[{i}] must be an object")
    http_in = perm.get("http")
    if not isinstance(http_in, dict):
        raise BadRequestError(f"Permissions[{i}].HTTP is required")
    http: dict[str, Any] = {}
    paths = {
        k: http_in[f"path{k}"] for k in ("exact", "prefix", "regex") if http_in.get(f"path{k}")
    }
    if paths:
        http["path"] = paths  # more than one: the schema names the problem
    if http_in.get("methods"):
        http["methods"] = http_in["methods"]
    headers = http_in.get("header")
    if headers:
        if not isinstance(headers, list):
            raise BadRequestError(f"Permissions[{i}].HTTP.Header must be a list")
        out = []
        for h in headers:
            if not isinstance(h, dict):
                raise BadRequestError(f"Permissions[{i}].HTTP.Header entries must be objects")
            hd: dict[str, Any] = {"name": h.get("name")}
            for attr, _ in _HEADER_KINDS:
                if h.get(attr):
                    hd[attr] = h[attr]
            if h.get("present"):
                hd["present"] = True
            if h.get("invert"):
                hd["invert"] = True
            out.append(hd)
        http["headers"] = out
    return {"action": perm.get("action"), "http": http}


# -- the store ---------------------------------------------------------------------------------


def _key(dst_ns: str, dst_name: str) -> ResourceKey:
    return ResourceKey("Intention", dst_ns, dst_name)


def _find(res: Resource | None, src_ns: str, src_name: str) -> int | None:
    if res is None:
        return None
    assert isinstance(res.spec, IntentionSpec)
    for i, s in enumerate(res.spec.sources):
        ns = s.namespace if s.namespace is not None else res.namespace
        if (ns, s.name) == (src_ns, src_name):
            return i
    return None


def _decode(doc: dict[str, Any]) -> Resource:
    """The edited Intention, checked as `tether apply` checks it; problems → 400 naming
    the field."""
    try:
        res = Resource.from_dict(doc)
    except SchemaError as exc:
        raise BadRequestError(_problems(exc.problems)) from None
    errors = [p for p in check_resource(res) if p.is_error]
    if errors:
        raise BadRequestError(_problems(errors))
    return res


def _problems(problems: list[Problem]) -> str:
    return "; ".join(f"{p.path}: {p.message}" if p.path else p.message for p in problems)


def _editor(
    dst: tuple[str, str], src: tuple[str, str], new_source: dict[str, Any] | None
) -> Callable[[Resource | None], Resource | None]:
    """An edit of the destination's Intention: put (or, None, remove) one source."""

    def edit(current: Resource | None) -> Resource | None:
        if current is None:
            if new_source is None:
                return None
            doc: dict[str, Any] = {
                "apiVersion": API_VERSION,
                "kind": "Intention",
                "metadata": {"name": dst[1], "namespace": dst[0]},
                "spec": {"sources": []},
            }
        else:
            doc = current.to_dict()
            doc["metadata"].pop("generation", None)
        sources: list[Any] = doc["spec"]["sources"]
        at = _find(current, *src)
        if new_source is None:
            if at is None:
                return current
            del sources[at]
            if not sources:
                return None  # the last source: the Intention goes
        else:
            entry = dict(new_source)
            if entry.get("namespace") == dst[0]:
                del entry["namespace"]  # the Intention's own namespace, as one writes it
            if at is None:
                sources.append(entry)
            else:
                sources[at] = entry
        return _decode(doc)

    return edit


async def _snapshot(request: web.Request) -> ConfigSnapshot:
    snap: ConfigSnapshot = await _cp(request).store.snapshot()
    return snap


def _reply(data: Any, index: int) -> web.Response:
    resp = web.json_response(data, dumps=lambda d: json.dumps(d, indent=None))
    resp.headers["X-Consul-Index"] = str(max(1, index))
    return resp


def _all(snap: ConfigSnapshot) -> list[tuple[Rule, dict[str, Any]]]:
    """Every intention, as a rule and as Consul's JSON, in evaluation order."""
    out = []
    for res in snap.of_kind("Intention"):
        assert isinstance(res.spec, IntentionSpec)
        for src in res.spec.sources:
            ns = src.namespace if src.namespace is not None else res.namespace
            rule = Rule(ns, src.name, res.namespace, res.name, src.action,
                        precedence=precedence(ns, src.name, res.namespace, res.name))  # fmt: skip
            out.append((rule, consul_intention(res, src)))
    out.sort(key=lambda pair: pair[0].sort_key)
    return out


# -- handlers ----------------------------------------------------------------------------------


async def list_intentions(request: web.Request) -> web.StreamResponse:
    await _require(request, READ_POLICY)
    try:
        flt = compile_filter(request.query.get("filter", ""))
    except FilterError as exc:
        raise BadRequestError(str(exc)) from None
    snap = await _snapshot(request)
    try:
        items = flt.select(ixn for _, ixn in _all(snap))
    except FilterError as exc:
        raise BadRequestError(str(exc)) from None
    return _reply(items, snap.index)


async def get_exact(request: web.Request) -> web.StreamResponse:
    src = parse_entry(_param(request, "source"), "source")
    dst = parse_entry(_param(request, "destination"), "destination")
    await _require(request, _service(dst[1], "read"))
    snap = await _snapshot(request)
    res = snap.get(_key(*dst))
    at = _find(res, *src)
    if res is None or at is None:
        raise NotFoundError("Intention not found")
    assert isinstance(res.spec, IntentionSpec)
    return _reply(consul_intention(res, res.spec.sources[at]), snap.index)


async def put_exact(request: web.Request) -> web.StreamResponse:
    src = parse_entry(_param(request, "source"), "source")
    dst = parse_entry(_param(request, "destination"), "destination")
    await _require(request, _service(dst[1], "write"))
    raw = await request.read()
    if len(raw) > MAX_BODY:
        raise BadRequestError(f"the body is larger than {MAX_BODY} bytes")
    try:
        body = json.loads(raw or b"{}")
    except ValueError as exc:
        raise BadRequestError(f"Request decode failed: {exc}") from None
    if not isinstance(body, dict):
        raise BadRequestError("Request decode failed: the body must be a JSON object")
    new_source = source_document(_lower_keys(body), src[1], src[0])
    cp = _cp(request)
    outcome = await cp.store.modify(
        _key(*dst), _editor(dst, src, new_source), token=caller_token(request.headers)
    )
    if outcome.changed:
        await cp.refresh()
    return _reply(True, outcome.version)


async def delete_exact(request: web.Request) -> web.StreamResponse:
    src = parse_entry(_param(request, "source"), "source")
    dst = parse_entry(_param(request, "destination"), "destination")
    await _require(request, _service(dst[1], "write"))
    cp = _cp(request)
    outcome = await cp.store.modify(
        _key(*dst), _editor(dst, src, None), token=caller_token(request.headers)
    )
    if outcome.changed:
        await cp.refresh()
    return _reply(True, outcome.version)


async def check(request: web.Request) -> web.StreamResponse:
    """Would a connection from source to destination be allowed (L4: an L7 intention
    counts as deny, as Consul's check)? The mesh's default action and namespace
    isolation decide as at the inbound sidecar."""
    stype = request.query.get("source-type") or "consul"
    if stype != "consul":
        raise BadRequestError(f"source-type must be 'consul', not {stype!r}")
    src = parse_entry(_param(request, "source"), "source")
    dst = parse_entry(_param(request, "destination"), "destination")
    if WILDCARD in (*src, *dst):
        raise BadRequestError("check takes a service, not a wildcard")
    await _require(request, _service(dst[1], "read"))
    snap = await _snapshot(request)
    policy = Intentions.compile(snap.resources.values()).for_destination(*dst)
    decision = policy.decide(Source(*src), l4_only=True)
    return _reply({"Allowed": decision.allowed}, snap.index)


async def match(request: web.Request) -> web.StreamResponse:
    by = request.query.get("by")
    if by not in ("source", "destination"):
        raise BadRequestError("'by' parameter must be one of 'source' or 'destination'")
    names = request.query.getall("name", [])
    if not names:
        raise BadRequestError("required query parameter 'name' not set")
    entries = [parse_entry(n, "name") for n in names]
    await _require(request, *(_service(name, "read") for _, name in entries))
    snap = await _snapshot(request)
    everything = _all(snap)
    out: dict[str, list[dict[str, Any]]] = {}
    for text, (ns, name) in zip(names, entries, strict=True):
        if by == "destination":
            hits = [ixn for rule, ixn in everything if rule.applies_to(ns, name)]
        else:
            hits = [ixn for rule, ixn in everything if rule.matches(Source(ns, name))]
        out[text] = hits
    return _reply(out, snap.index)
