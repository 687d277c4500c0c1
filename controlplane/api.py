"""The control plane's REST API under `/api/v1/` (documented in docs/api.md).

Every route declares what a caller needs (`ACCESS`, checked by `auth_middleware`
before the handler runs, with the caller's own token: `controlplane.auth`): the index,
version and health are open; reading policy needs `key_prefix "tether/v1/" read`,
changing it `... write`. Reads answer from a fresh registry read. Writes (apply, delete)
validate first and store nothing when any document is invalid (422 with every problem:
file, document, field path, line); they carry the caller's token to the registry, whose
ACLs decide again per key (403 when refused). Errors are JSON: `{"error": code,
"message": text, "problems": [...]}`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

from aiohttp import web

from controlplane.auth import READ_POLICY, WRITE_POLICY, Permission, caller_token
from controlplane.errors import (
    BadRequestError,
    ControlPlaneError,
    NotFoundError,
    ValidationError,
)
from controlplane.schema import (
    API_VERSION,
    CLUSTER_KINDS,
    FUTURE_KINDS,
    KINDS,
    Problem,
    Resource,
    ResourceKey,
    canonical_kind,
    replaced_kind_message,
)
from controlplane.store import ApplyResult
from controlplane.validation import InstanceView, instance_namespace, validate, validate_deletion
from controlplane.validation import identities as document_identities
from tether import json_depth

log = logging.getLogger("tether.controlplane.api")

PREFIX = "/api/v1"
MESH_WIDE_SEGMENT = "_"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


# What each route needs of its caller's token; None: open to anyone who can connect.
# A route missing here is refused (500), so a new route cannot be open by omission.
ACCESS: web.AppKey[dict[web.AbstractRoute, Permission | None]] = web.AppKey("access", dict)


def register(app: web.Application) -> None:
    """Every REST route and what it needs, in one table."""
    app.middlewares.append(errors_middleware)
    app.middlewares.append(auth_middleware)
    app[ACCESS] = {}
    # Open: a version number and liveness say nothing about the policy.
    route(app, "GET", f"{PREFIX}", index, None)
    route(app, "GET", f"{PREFIX}/version", version, None)
    route(app, "GET", f"{PREFIX}/health", health, None)
    route(app, "GET", f"{PREFIX}/resources", list_resources, READ_POLICY)
    route(app, "GET", f"{PREFIX}/resources/{{kind}}", list_resources, READ_POLICY)
    route(
        app, "GET", f"{PREFIX}/resources/{{kind}}/{{namespace}}/{{name}}", get_resource, READ_POLICY
    )
    route(
        app,
        "DELETE",
        f"{PREFIX}/resources/{{kind}}/{{namespace}}/{{name}}",
        delete_resource,
        WRITE_POLICY,
    )
    # A dry run needs what the real one would: the answer is the same but for storing.
    route(app, "POST", f"{PREFIX}/apply", apply, WRITE_POLICY)
    route(app, "POST", f"{PREFIX}/delete", delete_documents, WRITE_POLICY)
    # These show stored documents (diffs, problems against them): reading.
    route(app, "POST", f"{PREFIX}/diff", diff, READ_POLICY)
    route(app, "POST", f"{PREFIX}/validate", validate_only, READ_POLICY)


def route(
    app: web.Application, method: str, path: str, handler: Handler, needs: Permission | None
) -> None:
    """Add a route with what its caller's token needs (None: open; the push WebSocket
    checks at its hello, where it learns which service is asking)."""
    app[ACCESS][app.router.add_route(method, path, handler)] = needs


def _cp(request: web.Request) -> Any:
    from controlplane.server import CONTROL_PLANE

    return request.app[CONTROL_PLANE]


def reply(data: Any, status: int = 200) -> web.Response:
    return web.json_response(data, status=status, dumps=lambda d: json.dumps(d, indent=None))


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ValidationError as exc:
        return reply(
            {
                "error": exc.code,
                "message": str(exc),
                "problems": [p.to_dict() for p in exc.problems],
            },
            exc.status,
        )
    except ControlPlaneError as exc:
        resp = reply({"error": exc.code, "message": str(exc)}, exc.status)
        resp.headers.update(exc.headers)
        return resp
    except web.HTTPRequestEntityTooLarge as exc:
        return reply({"error": "too_large", "message": exc.text or "body too large"}, 413)
    except web.HTTPException as exc:
        if not request.path.startswith(PREFIX):
            raise
        return reply(
            {"error": exc.reason.lower().replace(" ", "_"), "message": exc.reason}, exc.status
        )


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The route's permission, checked with the caller's token before anything is read."""
    match = request.match_info
    if match.http_exception is not None:
        return await handler(request)  # no such route: 404/405 say nothing
    table = request.app[ACCESS]
    if match.route not in table:
        raise ControlPlaneError(f"no access declared for {request.method} {request.path}")
    needs = table[match.route]
    if needs is not None:
        await _cp(request).authorizer.require(caller_token(request.headers), needs)
    return await handler(request)


def _flag(request: web.Request, name: str) -> bool:
    v = request.query.get(name)
    if v is None:
        return False
    return v.lower() in ("", "1", "true", "yes")


def _kind(text: str) -> str:
    kind = canonical_kind(text)
    replaced = replaced_kind_message(kind) if kind is not None else None
    if replaced is not None:
        raise BadRequestError(replaced)
    if kind in FUTURE_KINDS:
        raise BadRequestError(f"kind {kind} is not supported yet")
    if kind is None:
        raise NotFoundError(f"unknown kind {text!r} (known: {', '.join(KINDS)})")
    return kind


def _key(request: web.Request) -> ResourceKey:
    kind = _kind(request.match_info["kind"])
    ns = request.match_info["namespace"]
    if kind in CLUSTER_KINDS:
        if ns not in (MESH_WIDE_SEGMENT, "", "-"):
            raise BadRequestError(f"{kind} is mesh-wide: use {MESH_WIDE_SEGMENT!r} as namespace")
        ns = ""
    return ResourceKey(kind, ns, request.match_info["name"])


# -- reads -------------------------------------------------------------------------------


async def index(request: web.Request) -> web.Response:
    from controlplane.ca.service import CA_SERVICE

    cp = _cp(request)
    ca = request.app.get(CA_SERVICE)
    tls = ca.tls if ca is not None else None
    return reply(
        {
            # The port of the push and CSR signing (TLS, the mesh CA's certificate);
            # null while it is not open, with tlsStarting true until it is.
            "tlsPort": tls.port if tls is not None else None,
            "tlsStarting": bool(ca is not None and ca.tls_wanted and tls is None),
            "apiVersion": API_VERSION,
            "kinds": list(KINDS),
            "version": cp.snapshot.version,
            "endpoints": sorted(
                {
                    str(r.resource.canonical)
                    for r in request.app.router.routes()
                    if r.resource is not None
                }
            ),
        }
    )


async def version(request: web.Request) -> web.Response:
    snap = await _cp(request).store.snapshot()
    return reply({"version": snap.version, "index": snap.index})


async def health(request: web.Request) -> web.Response:
    cp = _cp(request)
    try:
        snap = await cp.store.snapshot()
    except ControlPlaneError as exc:
        return reply({"status": "registry unavailable", "message": str(exc)}, 503)
    return reply({"status": "ok", "version": snap.version, "index": snap.index})


async def list_resources(request: web.Request) -> web.Response:
    kind_text = request.match_info.get("kind") or request.query.get("kind")
    kind = _kind(kind_text) if kind_text else None
    ns = request.query.get("namespace") or None
    snap = await _cp(request).store.snapshot()
    items = [
        _with_status(r.to_dict(), snap.status(k))
        for k, r in sorted(snap.resources.items())
        if (kind is None or k.kind == kind) and (ns is None or k.namespace in (ns, ""))
    ]
    return reply({"version": snap.version, "items": items})


def _with_status(doc: dict[str, Any], status: dict[str, Any] | None) -> dict[str, Any]:
    """A resource's document with the control plane's `status` (a canary analysis's live
    weights and history, controlplane/canary.py), which `apply` never changes."""
    if status:
        doc["status"] = status
    return doc


async def get_resource(request: web.Request) -> web.Response:
    key = _key(request)
    cp = _cp(request)
    res = await cp.store.get(key)
    if res is None:
        raise NotFoundError(f"{key} not found")
    return reply(_with_status(res.to_dict(), cp.snapshot.status(key)))


# -- writes ------------------------------------------------------------------------------


async def read_files(request: web.Request) -> list[tuple[str, str]]:
    """The files of a write: a `{"files": [{"name", "text"}]}` envelope, or the body as
    one YAML/JSON stream named by `?file=`."""
    raw = await request.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadRequestError(f"the body is not UTF-8: {exc}") from exc
    name = request.query.get("file") or "<request>"
    if request.content_type == "application/json":
        try:
            data = json_depth.loads(text)
        except json_depth.JSONDepthError as exc:
            raise BadRequestError(f"the body is not acceptable JSON: {exc}") from exc
        except ValueError:
            data = None
        if isinstance(data, dict) and "files" in data and "kind" not in data:
            files = data["files"]
            if not isinstance(files, list) or not all(
                isinstance(f, dict) and isinstance(f.get("text"), str) for f in files
            ):
                raise BadRequestError('"files" must be a list of {"name": ..., "text": ...}')
            return [
                (str(f.get("name") or f"<file {i + 1}>"), f["text"]) for i, f in enumerate(files)
            ]
    return [(name, text)]


async def _instances(cp: Any, resources: Sequence[Resource]) -> InstanceView | None:
    """The registry's view of the instances of every service the resources configure."""
    view: dict[tuple[str, str], list[Mapping[str, str]]] = {}
    for res in resources:
        if res.kind in CLUSTER_KINDS or (res.namespace, res.name) in view or res.name == "*":
            continue
        try:
            _, nodes = await cp.consul.catalog.service(res.name)
        except Exception as exc:  # the registry's view only adds warnings
            log.info("instances of %s unavailable: %s", res.name, exc)
            return None
        metas = [n.get("ServiceMeta") or {} for n in nodes or ()]
        ns = res.namespace
        view[(ns, res.name)] = [m for m in metas if instance_namespace(m) == ns]
    return view


async def _apply(request: web.Request, *, dry_run: bool) -> web.Response:
    cp = _cp(request)
    files = await read_files(request)
    existing = await cp.store.snapshot()
    first = validate(files, existing.resources)
    if not first.ok:
        raise ValidationError(first.problems)
    instances = await _instances(cp, first.resources)
    result = validate(files, existing.resources, instances)
    warnings = result.warnings
    if instances is None and any(r.kind not in CLUSTER_KINDS for r in result.resources):
        warnings.append(
            Problem(
                "registry catalog unavailable: services and subset selectors not checked",
                severity="warning",
            )
        )
    outcome = await cp.store.apply(
        result.resources, token=caller_token(request.headers), dry_run=dry_run
    )
    if outcome.changed and not dry_run:
        await cp.refresh()
    return reply(_outcome(outcome, warnings))


def _outcome(outcome: ApplyResult, warnings: Sequence[Problem] = ()) -> dict[str, Any]:
    return {
        "dryRun": outcome.dry_run,
        "version": outcome.version,
        "changes": [c.to_dict() for c in outcome.changes],
        "warnings": [w.to_dict() for w in warnings],
    }


async def apply(request: web.Request) -> web.Response:
    return await _apply(request, dry_run=_flag(request, "dryRun") or _flag(request, "dry_run"))


async def diff(request: web.Request) -> web.Response:
    return await _apply(request, dry_run=True)


async def validate_only(request: web.Request) -> web.Response:
    cp = _cp(request)
    files = await read_files(request)
    existing = await cp.store.snapshot()
    result = validate(files, existing.resources)
    if result.ok:
        result = validate(files, existing.resources, await _instances(cp, result.resources))
    return reply(
        {
            "valid": result.ok,
            "resources": [str(r.key) for r in result.resources],
            "problems": [p.to_dict() for p in result.problems],
        },
        200 if result.ok else 422,
    )


async def _delete(request: web.Request, keys: Sequence[ResourceKey]) -> ApplyResult:
    cp = _cp(request)
    dry_run = _flag(request, "dryRun") or _flag(request, "dry_run")
    existing = await cp.store.snapshot()
    problems = validate_deletion(keys, existing.resources)
    if problems:
        raise ValidationError(problems)
    outcome: ApplyResult = await cp.store.delete(
        keys, token=caller_token(request.headers), dry_run=dry_run
    )
    if outcome.changed and not dry_run:
        await cp.refresh()
    return outcome


async def delete_resource(request: web.Request) -> web.Response:
    key = _key(request)
    outcome = await _delete(request, [key])
    if outcome.changes[0].action == "absent":
        raise NotFoundError(f"{key} not found")
    return reply(_outcome(outcome))


async def delete_documents(request: web.Request) -> web.Response:
    files = await read_files(request)
    keys, problems = document_identities(files)
    if problems:
        raise ValidationError(problems)
    return reply(_outcome(await _delete(request, keys)))
