"""`/v1/acl/*`: policies and tokens through Consul's own endpoints.

Policies carry Rules in Consul's rule language (HCL or JSON), validated on write; tokens
link policies by ID or Name and may carry service and node identities. Reading needs
`acl:read`, changing needs `acl:write` (the management token has both); a token can
always read itself through `/v1/acl/token/self`, and ask what it may do through
`/v1/internal/acl/authorize` (the question the control plane asks for its callers). With
ACLs off every endpoint answers 401 "ACL support disabled", as Consul does. A token or
policy that does not exist is Consul's `acl.ErrNotFound`, which its HTTP layer answers 403
"ACL not found" (clients branch on that, not on 404). Reads and lists are blocking queries
on the `acl` resource.
"""

from __future__ import annotations

import re
import uuid

from aiohttp import web

from registry.acl import (
    ANONYMOUS_ID,
    GLOBAL_MANAGEMENT_ID,
    POLICIES,
    RESOURCE,
    TOKENS,
    Access,
    Authorizer,
    request_token,
)
from registry.acl_rules import PREFIXED_KINDS, SINGLE_KINDS, RuleError, parse_rules
from registry.errors import (
    BadRequestError,
    NotSupportedError,
    PermissionDeniedError,
    RegistryError,
)
from registry.http import Body, block, context, read_body, reply
from registry.store import Obj

_NAME = re.compile(r"^[A-Za-z0-9\-_]{1,128}$")
_UUID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")


class AclDisabledError(RegistryError):
    status = 401

    def __init__(self) -> None:
        super().__init__("ACL support disabled")


def _not_found() -> PermissionDeniedError:
    return PermissionDeniedError("ACL not found")


def _acl(request: web.Request, access: str) -> Authorizer:
    acl = context(request).acl
    if not acl.enabled:
        raise AclDisabledError()
    acl.require(request, "acl", "", "write" if access == "write" else "read")
    return acl


# -- policies --------------------------------------------------------------------------


def _policy_fields(body: Body, current: Obj | None) -> Obj:
    name = body.text("Name", current["Name"] if current else "")
    if not name:
        raise BadRequestError("Invalid Policy: no Name is set")
    if not _NAME.match(name):
        raise BadRequestError(
            "Invalid Policy: invalid Name. Only alphanumeric characters, '-' and '_' are allowed"
        )
    rules = body.text("Rules", current["Rules"] if current else "")
    try:
        parse_rules(rules)
    except RuleError as exc:
        raise BadRequestError(f"Failed to parse ACL rules: {exc}") from exc
    return {
        "Name": name,
        "Description": body.text("Description", current["Description"] if current else ""),
        "Rules": rules,
        "Datacenters": body.strings("Datacenters"),
    }


def _policy_view(p: Obj) -> Obj:
    return {k: v for k, v in p.items() if v is not None}


async def policy_create(request: web.Request) -> web.Response:
    acl = _acl(request, "write")
    body = Body(await read_body(request))
    if body.text("ID"):
        raise BadRequestError("Cannot specify an ID when creating a policy")
    fields = _policy_fields(body, None)
    with context(request).store.write() as txn:
        if acl.policy_by_name(fields["Name"]) is not None:
            raise BadRequestError(
                f"Invalid Policy: A Policy with Name {fields['Name']!r} already exists"
            )
        pol = acl.put_policy(txn, {"ID": str(uuid.uuid4()), **fields})
    return reply(_policy_view(pol))


async def policy_update(request: web.Request) -> web.Response:
    acl = _acl(request, "write")
    pid = request.match_info["id"]
    body = Body(await read_body(request))
    if body.text("ID") and body.text("ID") != pid:
        raise BadRequestError("Policy ID in URL and payload do not match")
    store = context(request).store
    with store.write() as txn:
        current = txn.get(POLICIES, pid)
        if current is None:
            raise _not_found()
        fields = _policy_fields(body, current)
        same_name = acl.policy_by_name(fields["Name"])
        if same_name is not None and same_name["ID"] != pid:
            raise BadRequestError(
                f"Invalid Policy: A policy with name {fields['Name']!r} already exists"
            )
        if pid == GLOBAL_MANAGEMENT_ID and (
            fields["Rules"] != current["Rules"] or fields["Name"] != current["Name"]
        ):
            raise BadRequestError(
                "Changing the Rules or Name of the builtin global-management policy is not "
                "permitted"
            )
        pol = acl.put_policy(txn, {"ID": pid, **fields})
    return reply(_policy_view(pol))


async def policy_read(request: web.Request) -> web.Response:
    _acl(request, "read")
    index = await block(request, [RESOURCE])
    pol = context(request).store.get(POLICIES, request.match_info["id"])
    if pol is None:
        raise _not_found()
    return reply(_policy_view(pol), index)


async def policy_read_by_name(request: web.Request) -> web.Response:
    acl = _acl(request, "read")
    index = await block(request, [RESOURCE])
    pol = acl.policy_by_name(request.match_info["name"])
    if pol is None:
        raise _not_found()
    return reply(_policy_view(pol), index)


async def policy_delete(request: web.Request) -> web.Response:
    _acl(request, "write")
    pid = request.match_info["id"]
    if pid == GLOBAL_MANAGEMENT_ID:
        raise BadRequestError(
            "Delete operation not permitted on the builtin global-management policy"
        )
    store = context(request).store
    with store.write() as txn:
        if txn.get(POLICIES, pid) is None:
            raise _not_found()
        txn.delete(POLICIES, pid)
        txn.touch(RESOURCE)
    return reply(True)


async def policy_list(request: web.Request) -> web.Response:
    _acl(request, "read")
    index = await block(request, [RESOURCE])
    store = context(request).store
    out = [
        {k: v for k, v in _policy_view(p).items() if k != "Rules"}
        for p in sorted(store.table(POLICIES).values(), key=lambda p: p["CreateIndex"])
    ]
    return reply(out, index)


# -- tokens ----------------------------------------------------------------------------


def _links(acl: Authorizer, body: Body) -> list[Obj]:
    out: list[Obj] = []
    for link in body.obj_list("Policies"):
        pid, name = link.text("ID"), link.text("Name")
        if pid:
            if acl.store.get(POLICIES, pid) is None:
                raise BadRequestError(f"No such ACL policy with ID: {pid}")
            out.append({"ID": pid})
        elif name:
            pol = acl.policy_by_name(name)
            if pol is None:
                raise BadRequestError(f"No such ACL policy with name: {name}")
            out.append({"ID": pol["ID"]})
        else:
            raise BadRequestError(f"{link.path}: a policy link needs an ID or a Name")
    return list({link["ID"]: link for link in out}.values())


def _identities(body: Body) -> tuple[list[Obj], list[Obj]]:
    services: list[Obj] = []
    for ident in body.obj_list("ServiceIdentities"):
        name = ident.text("ServiceName")
        if not name or not re.match(r"^[a-z0-9]([a-z0-9\-_]*[a-z0-9])?$", name):
            raise BadRequestError(f"{ident.path}.ServiceName: invalid service name {name!r}")
        item: Obj = {"ServiceName": name}
        if ident.strings("Datacenters"):
            item["Datacenters"] = ident.strings("Datacenters")
        services.append(item)
    nodes: list[Obj] = []
    for ident in body.obj_list("NodeIdentities"):
        name = ident.text("NodeName")
        if not name:
            raise BadRequestError(f"{ident.path}.NodeName: missing")
        nodes.append({"NodeName": name, "Datacenter": ident.text("Datacenter")})
    return services, nodes


def _token_fields(acl: Authorizer, body: Body) -> Obj:
    for unsupported in ("ExpirationTTL", "ExpirationTime"):
        if body.value(unsupported):
            raise BadRequestError(f"{unsupported}: token expiration is not supported")
    services, nodes = _identities(body)
    return {
        "Description": body.text("Description"),
        "Policies": _links(acl, body),
        "ServiceIdentities": services,
        "NodeIdentities": nodes,
        "Local": body.flag("Local"),
    }


def _check_uuid(value: str, field: str) -> None:
    if not _UUID.match(value):
        raise BadRequestError(f"Invalid Token: {field} is not a valid UUID")


async def token_create(request: web.Request) -> web.Response:
    acl = _acl(request, "write")
    body = Body(await read_body(request))
    accessor = body.text("AccessorID") or str(uuid.uuid4())
    secret = body.text("SecretID") or str(uuid.uuid4())
    _check_uuid(accessor, "AccessorID")
    _check_uuid(secret, "SecretID")
    fields = _token_fields(acl, body)
    with context(request).store.write() as txn:
        if txn.get(TOKENS, accessor) is not None:
            raise BadRequestError("Invalid Token: AccessorID is already in use")
        if acl.token_by_secret(secret) is not None or secret == acl.management_token:
            raise BadRequestError("Invalid Token: SecretID is already in use")
        tok = acl.put_token(txn, {"AccessorID": accessor, "SecretID": secret, **fields})
    return reply(acl.token_view(tok))


async def token_update(request: web.Request) -> web.Response:
    acl = _acl(request, "write")
    accessor = request.match_info["id"]
    body = Body(await read_body(request))
    if body.text("AccessorID") and body.text("AccessorID") != accessor:
        raise BadRequestError("Token AccessorID in URL and payload do not match")
    fields = _token_fields(acl, body)
    with context(request).store.write() as txn:
        current = txn.get(TOKENS, accessor)
        if current is None:
            raise _not_found()
        secret = body.text("SecretID")
        if secret and secret != current["SecretID"]:
            raise BadRequestError("Changing a token's SecretID is not permitted")
        tok = acl.put_token(
            txn, {"AccessorID": accessor, "SecretID": current["SecretID"], **fields}
        )
    return reply(acl.token_view(tok))


async def token_clone(request: web.Request) -> web.Response:
    acl = _acl(request, "write")
    body = Body(await read_body(request, allow_empty=True) or {})
    store = context(request).store
    with store.write() as txn:
        src = txn.get(TOKENS, request.match_info["id"])
        if src is None:
            raise _not_found()
        if src["AccessorID"] == ANONYMOUS_ID:
            raise BadRequestError("Cloning the anonymous token is not permitted")
        tok = acl.put_token(
            txn,
            {
                **src,
                "AccessorID": str(uuid.uuid4()),
                "SecretID": str(uuid.uuid4()),
                "Description": body.text("Description", src["Description"]),
            },
        )
    return reply(acl.token_view(tok))


async def token_read(request: web.Request) -> web.Response:
    acl = _acl(request, "read")
    index = await block(request, [RESOURCE])
    tok = context(request).store.get(TOKENS, request.match_info["id"])
    if tok is None:
        raise _not_found()
    view = acl.token_view(tok)
    if not acl.grant(request).allows("acl", "", "write"):
        view["SecretID"] = "<hidden>"  # acl:read shows tokens, not their secrets
    return reply(view, index)


async def token_self(request: web.Request) -> web.Response:
    acl = context(request).acl
    if not acl.enabled:
        raise AclDisabledError()
    secret = request_token(request)
    grant = acl.grant(request)  # 403 "ACL not found" for an unknown secret
    index = await block(request, [RESOURCE])
    tok = grant.token
    if tok is None:
        tok = acl.token_by_secret(secret) if secret else acl.store.get(TOKENS, ANONYMOUS_ID)
    if tok is None:
        raise PermissionDeniedError("ACL not found")
    return reply(acl.token_view(tok), index)


async def token_delete(request: web.Request) -> web.Response:
    _acl(request, "write")
    accessor = request.match_info["id"]
    if accessor == ANONYMOUS_ID:
        raise BadRequestError("Delete operation not permitted on the anonymous token")
    store = context(request).store
    with store.write() as txn:
        tok = txn.get(TOKENS, accessor)
        if tok is None:
            raise _not_found()
        if tok["SecretID"] == request_token(request):
            raise BadRequestError("Deletion of the request's authorization token is not permitted")
        txn.delete(TOKENS, accessor)
        txn.touch(RESOURCE)
    return reply(True)


async def token_list(request: web.Request) -> web.Response:
    acl = _acl(request, "read")
    index = await block(request, [RESOURCE])
    store = context(request).store
    policy = request.query.get("policy")
    # Secrets are shown only to who could mint tokens anyway (Consul hides them too).
    show_secrets = acl.grant(request).allows("acl", "", "write")
    out = []
    for tok in sorted(store.table(TOKENS).values(), key=lambda t: t["CreateIndex"]):
        if policy and not any(link["ID"] == policy for link in tok.get("Policies") or []):
            continue
        view = acl.token_view(tok)
        if not show_secrets:
            view["SecretID"] = "<hidden>"
        out.append(view)
    return reply(out, index)


# -- bootstrap and agent tokens ----------------------------------------------------------


async def bootstrap(request: web.Request) -> web.Response:
    """`PUT /v1/acl/bootstrap`: this registry is bootstrapped at start from
    `--management-token`, so, as Consul after its one bootstrap, it always refuses."""
    acl = context(request).acl
    if not acl.enabled:
        raise AclDisabledError()
    pol = acl.store.get(POLICIES, GLOBAL_MANAGEMENT_ID)
    reset = pol["CreateIndex"] if pol is not None else 0
    raise PermissionDeniedError(
        f"Permission denied: ACL bootstrap no longer allowed (reset index: {reset})"
    )


async def agent_token(request: web.Request) -> web.Response:
    """`PUT /v1/agent/token/<kind>`: 401 with ACLs off, as Consul; else acl:write, then
    refused, since a single-node registry has nothing to use agent tokens for."""
    _acl(request, "write")
    raise NotSupportedError(
        f"PUT {request.path}: agent tokens are not supported by this registry (it makes no"
        " requests of its own to other servers); the management token is --management-token"
    )


# -- what a token may do -------------------------------------------------------------------

# Consul refuses more than this many questions in one call.
MAX_AUTHORIZATIONS = 64
_ACCESS: dict[str, Access] = {"read": "read", "write": "write", "list": "list"}


async def authorize(request: web.Request) -> web.Response:
    """`POST /v1/internal/acl/authorize`: Consul's "may this token do these things".

    The body is a list of `{"Resource", "Segment", "Access"}`; the answer is the same list,
    each with `Allow`. Only the token's own rules are consulted (any valid token may ask
    about itself, as in Consul); an unknown token is a 403 "ACL not found".
    """
    acl = context(request).acl
    if not acl.enabled:
        raise AclDisabledError()
    body = await read_body(request, allow_empty=True)
    if body is None:
        body = []
    if not isinstance(body, list):
        raise BadRequestError("Failed to decode request body: expected a list")
    if len(body) > MAX_AUTHORIZATIONS:
        raise BadRequestError(
            f"Refusing to process more than {MAX_AUTHORIZATIONS} authorizations at once"
        )
    grant = acl.grant(request)
    out = []
    for i, item in enumerate(body):
        ask = Body(item, f"[{i}]")
        kind = ask.text("Resource").lower()
        segment = ask.text("Segment")
        access = _ACCESS.get(ask.text("Access").lower())
        if kind not in PREFIXED_KINDS and kind not in SINGLE_KINDS:
            raise BadRequestError(f"Invalid request[{i}]: unknown resource {kind!r}")
        if access is None:
            raise BadRequestError(f"Invalid request[{i}]: Access must be read, write or list")
        allow = grant.allows(kind, segment, access)
        out.append({"Resource": kind, "Segment": segment, "Access": access, "Allow": allow})
    return reply(out)
