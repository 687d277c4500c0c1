"""`/v1/agent/*`: the local agent's identity, its services and checks, and maintenance.

The registry is its own single agent: services and checks registered here live on the
node `spec.node` in the catalog, and the check runner executes their TTL, HTTP and TCP
checks. Request bodies are decoded as Consul decodes them (keys case-insensitive,
snake_case aliases accepted); every error names the offending field.
"""

from __future__ import annotations

import hashlib
import re
import time
from typing import Any

from aiohttp import web

from registry.acl import Access, Grant
from registry.catalog import (
    CRITICAL,
    NODE_MAINTENANCE_ID,
    PASSING,
    SERVICE_MAINTENANCE_PREFIX,
    STATUSES,
    WARNING,
)
from registry.errors import BadRequestError, MethodNotAllowedError, NotFoundError
from registry.http import (
    VERSION,
    Body,
    apply_filter,
    block,
    context,
    dumps,
    format_duration,
    query_filter,
    query_flag,
    query_wait,
    read_body,
    reply,
)
from registry.store import Obj

# Check kinds Consul has that this registry does not run; registering one is a 400.
_UNSUPPORTED_CHECKS = {
    "Args": "script",
    "ScriptArgs": "script",
    "Script": "script",
    "DockerContainerID": "docker",
    "GRPC": "gRPC",
    "H2PING": "H2PING",
    "UDP": "UDP",
    "OSService": "OS service",
    "AliasService": "alias",
    "AliasNode": "alias",
}


# -- decoding --------------------------------------------------------------------------


def parse_status(value: str, field: str) -> str:
    if value not in STATUSES:
        raise BadRequestError(
            f"Request decode failed: {field}: invalid status {value!r}"
            " (want passing, warning or critical)"
        )
    return value


def parse_check(body: Body) -> Obj:
    """A check definition (agent form) → a catalog check without node or service fields.

    Exactly one of TTL, HTTP or TCP must be given; HTTP and TCP need an Interval.
    """

    def bad(name: str, problem: str) -> BadRequestError:
        where = f"{body.path}.{name}" if body.path and name else (name or body.path)
        return BadRequestError(f"Invalid check: {where + ': ' if where else ''}{problem}")

    for name, kind in _UNSUPPORTED_CHECKS.items():
        if body.value(name):
            raise bad(
                name, f"{kind} checks are not supported by this registry (use TTL, HTTP or TCP)"
            )
    ttl = body.duration("TTL")
    http = body.text("HTTP")
    tcp = body.text("TCP")
    interval = body.duration("Interval")
    timeout = body.duration("Timeout")
    given = [k for k, v in (("TTL", ttl), ("HTTP", http), ("TCP", tcp)) if v]
    if len(given) != 1:
        got = f" (got {', '.join(given)})" if given else ""
        raise bad("", f"exactly one of TTL, HTTP or TCP is required{got}")
    definition: dict[str, Any] = {}
    if ttl is not None:
        if ttl <= 0:
            raise bad("TTL", "must be > 0")
        kind = "ttl"
        definition["TTL"] = format_duration(ttl)
    else:
        kind = "http" if http else "tcp"
        if interval is None or interval <= 0:
            raise bad("Interval", f"must be > 0 for {kind} checks")
        if timeout is not None and timeout < 0:
            raise bad("Timeout", "must not be negative")
        definition["Interval"] = format_duration(interval)
        if timeout:
            definition["Timeout"] = format_duration(timeout)
        if http:
            if not http.startswith(("http://", "https://")):
                raise bad("HTTP", "not an http(s) URL")
            method = body.text("Method") or "GET"
            if not re.fullmatch(r"[A-Za-z]+", method):
                raise bad("Method", f"invalid HTTP method {method!r}")
            definition["HTTP"] = http
            definition["Method"] = method.upper()
            definition["Header"] = _headers(body)
            definition["Body"] = body.text("Body")
            definition["TLSSkipVerify"] = body.flag("TLSSkipVerify")
        else:
            host, sep, port = tcp.rpartition(":")
            if not sep or not host or not port.isdigit():
                raise bad("TCP", "want host:port")
            definition["TCP"] = tcp
    deregister = body.duration("DeregisterCriticalServiceAfter")
    if deregister:
        definition["DeregisterCriticalServiceAfter"] = format_duration(deregister)
    status = body.text("Status")
    return {
        "CheckID": body.text("CheckID") or body.text("ID"),
        "Name": body.text("Name"),
        "Notes": body.text("Notes"),
        "Status": parse_status(status, f"{body.path}.Status" if body.path else "Status")
        if status
        else "",
        "Output": "",
        "ServiceID": body.text("ServiceID"),
        "Type": kind,
        "Interval": definition.get("Interval", ""),
        "Timeout": definition.get("Timeout", ""),
        "Definition": definition,
    }


def _headers(body: Body) -> dict[str, list[str]]:
    raw = body.value("Header", {})
    field = f"{body.path}.Header" if body.path else "Header"
    if not isinstance(raw, dict) or not all(
        isinstance(v, list) and all(isinstance(x, str) for x in v) for v in raw.values()
    ):
        raise BadRequestError(
            f"Request decode failed: {field}: expected an object of lists of strings"
        )
    for k, vs in raw.items():
        if not re.fullmatch(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+", k) or any(
            "\r" in v or "\n" in v for v in vs
        ):
            raise BadRequestError(f"Request decode failed: {field}: invalid header {k!r}")
    return {str(k): list(v) for k, v in raw.items()}


_META_KEY = re.compile(r"^[a-zA-Z0-9_-]+$")
META_MAX_PAIRS = 64


def validate_meta(meta: dict[str, str], what: str) -> dict[str, str]:
    """Consul's metadata rules (structs.validateMetaPair), with its messages."""
    if len(meta) > META_MAX_PAIRS:
        raise BadRequestError(
            f"Invalid {what}: cannot contain more than {META_MAX_PAIRS} key/value pairs"
        )
    for key, value in meta.items():
        problem = ""
        if not key:
            problem = "Key cannot be blank"
        elif not _META_KEY.match(key):
            problem = f"Key {key!r} contains invalid characters"
        elif len(key) > 128:
            problem = f"Key {key[:20]!r}... is too long (limit: 128 characters)"
        elif key.startswith("consul-"):
            problem = f"Key {key!r}: prefix 'consul-' is reserved for internal use"
        elif len(value) > 512:
            problem = f"Value of {key!r} is too long (limit: 512 characters)"
        if problem:
            raise BadRequestError(f"Invalid {what}: {problem}")
    return meta


def parse_weights(body: Body) -> dict[str, int]:
    w = body.obj("Weights")
    if w is None:
        return {"Passing": 1, "Warning": 1}
    passing = w.integer("Passing", 1)
    warning = w.integer("Warning", 1)
    if passing < 1:
        raise BadRequestError("Invalid Weights: Weights.Passing must be greater than 0")
    if warning < 0:
        raise BadRequestError("Invalid Weights: Weights.Warning must not be negative")
    return {"Passing": passing, "Warning": warning}


def parse_tagged_addresses(body: Body) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    ta = body.obj("TaggedAddresses")
    if ta is None:
        return out
    for name in ta.raw:
        entry = ta.obj(name)
        if entry is None:
            continue
        port = entry.integer("Port")
        if not 0 <= port <= 65535:
            raise BadRequestError(
                f"Request decode failed: TaggedAddresses.{name}.Port: out of range"
            )
        out[name] = {"Address": entry.text("Address"), "Port": port}
    return out


def parse_service(body: Body, *, name_field: str = "Name") -> Obj:
    """A service definition → the catalog's service object (without Node and indexes)."""
    name = body.text(name_field) or body.text("Service" if name_field == "Name" else "Name")
    if not name:
        raise BadRequestError("Missing service name")
    if "/" in name:
        raise BadRequestError(f"Invalid service name {name!r}: '/' is not allowed")
    sid = body.text("ID") or name
    if "/" in sid:
        raise BadRequestError(f"Invalid service ID {sid!r}: '/' is not allowed")
    port = body.integer("Port")
    if not 0 <= port <= 65535:
        raise BadRequestError(f"Request decode failed: Port: {port} is out of range")
    svc: Obj = {
        "ID": sid,
        "Service": name,
        "Tags": body.strings("Tags"),
        "Address": body.text("Address"),
        "Port": port,
        "Meta": validate_meta(body.string_map("Meta"), "Service Meta"),
        "Weights": parse_weights(body),
        "TaggedAddresses": parse_tagged_addresses(body),
        "EnableTagOverride": body.flag("EnableTagOverride"),
        "Kind": body.text("Kind"),
    }
    for extra in ("Proxy", "Connect", "Locality"):
        v = body.value(extra)
        if v is not None:
            if not isinstance(v, dict):
                raise BadRequestError(f"Request decode failed: {extra}: expected an object")
            svc[extra] = v
    if body.text("SocketPath"):
        svc["SocketPath"] = body.text("SocketPath")
    return svc


def parse_enable(request: web.Request) -> bool:
    v = request.query.get("enable")
    if v is None or v == "":
        raise BadRequestError("Missing value for enable")
    low = v.lower()
    if low in ("1", "t", "true"):
        return True
    if low in ("0", "f", "false"):
        return False
    raise BadRequestError(f"Invalid value for enable: {v!r}")


# -- views -----------------------------------------------------------------------------


# Fields of Consul's api.AgentService that are left out when empty (`json:",omitempty"`).
_AGENT_OPTIONAL = ("SocketPath", "TaggedAddresses", "Proxy", "Connect", "Locality")


def agent_service(svc: Obj, datacenter: str) -> Obj:
    """A service as /v1/agent/services shows it: Consul's api.AgentService, with its
    omitempty fields left out when empty (and no catalog indexes: agent state has none)."""
    out: Obj = {"Kind": svc["Kind"]} if svc.get("Kind") else {}
    out.update(
        ID=svc["ID"],
        Service=svc["Service"],
        Tags=svc["Tags"],
        Meta=svc["Meta"],
        Port=svc["Port"],
        Address=svc["Address"],
    )
    for name in _AGENT_OPTIONAL:
        if svc.get(name):
            out[name] = svc[name]
    out.update(
        Weights=svc["Weights"],
        EnableTagOverride=svc["EnableTagOverride"],
        Datacenter=datacenter,
    )
    return out


def check_visible(grant: Grant, chk: Obj) -> bool:
    """ACL filtering of check lists: a service check needs service:read, else node:read."""
    if chk.get("ServiceID"):
        return grant.allows("service", chk["ServiceName"], "read")
    return grant.allows("node", chk["Node"], "read")


# -- handlers: identity ----------------------------------------------------------------


def _member(request: web.Request, *, wan: bool = False) -> Obj:
    """This server as a gossip member: of the LAN pool, or of the WAN pool, where Consul
    names servers `<node>.<datacenter>` and gossips on 8302."""
    ctx = context(request)
    cat = ctx.catalog
    return {
        "Name": f"{cat.node}.{cat.datacenter}" if wan else cat.node,
        "Addr": cat.address,
        "Port": 8302 if wan else 8301,
        "Tags": {
            "role": "consul",
            "dc": cat.datacenter,
            "port": str(ctx.port),
            "build": VERSION,
            "vsn": "2",
            "vsn_min": "2",
            "vsn_max": "3",
        },
        "Status": 1,
        "ProtocolMin": 1,
        "ProtocolMax": 5,
        "ProtocolCur": 2,
        "DelegateMin": 2,
        "DelegateMax": 5,
        "DelegateCur": 4,
    }


async def self_(request: web.Request) -> web.Response:
    ctx = context(request)
    ctx.acl.require(request, "agent", ctx.catalog.node, "read")
    index = await block(request, [f"node:{ctx.catalog.node}"])
    node = ctx.catalog.get_node(ctx.catalog.node) or {}
    return reply(
        {
            "Config": {
                "Datacenter": ctx.catalog.datacenter,
                "PrimaryDatacenter": ctx.catalog.datacenter,
                "NodeName": ctx.catalog.node,
                "NodeID": node.get("ID", ""),
                "Server": True,
                "Revision": "tether",
                "Version": VERSION,
                "BuildDate": "",
            },
            "DebugConfig": {},
            "Coord": None,
            "Member": _member(request),
            "Meta": node.get("Meta", {}),
            "Stats": {},
            "xDS": None,
        },
        index,
    )


async def version(request: web.Request) -> web.Response:
    """`/v1/agent/version`: Consul's api.AgentVersion, at the API level we answer as."""
    return reply({"SHA": "", "BuildDate": "", "HumanVersion": VERSION, "FIPS": ""})


async def members(request: web.Request) -> web.Response:
    ctx = context(request)
    grant = ctx.acl.grant(request)
    index = await block(request, ["nodes"])
    visible = grant.allows("node", ctx.catalog.node, "read")
    member = _member(request, wan=query_flag(request, "wan"))
    return reply([member] if visible else [], index)


# -- handlers: services ----------------------------------------------------------------


async def services(request: web.Request) -> web.Response:
    ctx = context(request)
    grant = ctx.acl.grant(request)
    flt = query_filter(request)
    index = await block(request, ["agent:services"])
    cat = ctx.catalog
    views = [
        agent_service(s, cat.datacenter)
        for s in cat.agent_services()
        if grant.allows("service", s["Service"], "read")
    ]
    return reply({v["ID"]: v for v in apply_filter(flt, views)}, index)


def _local_service(request: web.Request, access: Access) -> tuple[str, Obj | None]:
    """The ID in the path and the local service it names (None if none), once the caller
    may `access` it: by the service's name, or by the ID itself for an unknown one."""
    ctx = context(request)
    cat = ctx.catalog
    sid = request.match_info["service_id"]
    svc = cat.agent_service(sid)
    ctx.acl.require(request, "service", svc["Service"] if svc else sid, access)
    return sid, svc


async def service(request: web.Request) -> web.Response:
    ctx = context(request)
    if request.match_info["service_id"] == "register":
        # PUT /v1/agent/service/register read with GET, as Consul answers it.
        raise MethodNotAllowedError(f"method {request.method} not allowed")
    sid, _ = _local_service(request, "read")
    cat = ctx.catalog
    resource = f"agent:service:{sid}"
    want_hash = request.query.get("hash")
    if want_hash:
        # Consul blocks this endpoint on the content hash as well as on the index.
        deadline = time.monotonic() + query_wait(request)
        while _service_hash(cat.agent_service(sid), cat.datacenter) == want_hash:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not await ctx.store.hub.wait([resource], remaining):
                break
    index = await block(request, [resource])
    svc = cat.agent_service(sid)
    if svc is None:
        raise NotFoundError(f"unknown service ID: {sid}")
    view = agent_service(svc, cat.datacenter)
    view["ContentHash"] = _service_hash(svc, cat.datacenter)
    resp = reply(view, index)
    resp.headers["X-Consul-ContentHash"] = view["ContentHash"]
    return resp


def _service_hash(svc: Obj | None, datacenter: str) -> str:
    if svc is None:
        return ""
    return hashlib.sha256(dumps(agent_service(svc, datacenter)).encode()).hexdigest()[:16]


async def service_register(request: web.Request) -> web.Response:
    ctx = context(request)
    cat = ctx.catalog
    body = Body(await read_body(request))
    svc = parse_service(body)
    ctx.acl.require(request, "service", svc["Service"], "write")
    if not cat.agent_owns_service(cat.node, svc["ID"]):
        raise BadRequestError(
            f"Invalid service ID {svc['ID']!r}: reserved for the server's own service"
        )
    defs = []
    single = body.obj("Check")
    if single is not None:
        defs.append(single)
    defs.extend(body.obj_list("Checks"))
    checks = [parse_check(d) for d in defs]
    for i, chk in enumerate(checks):
        if not chk["CheckID"]:
            chk["CheckID"] = f"service:{svc['ID']}" + (f":{i + 1}" if len(checks) > 1 else "")
        if not chk["Name"]:
            chk["Name"] = f"Service '{svc['Service']}' check"
        if chk["ServiceID"] and chk["ServiceID"] != svc["ID"]:
            raise BadRequestError(
                f"Invalid check {defs[i].path}: ServiceID {chk['ServiceID']!r}"
                f" is not the service being registered ({svc['ID']!r})"
            )
        chk["ServiceID"] = svc["ID"]
    replace = query_flag(request, "replace-existing-checks")
    with ctx.store.write() as txn:
        cat.ensure_local_node(txn)  # back if someone deregistered it, as anti-entropy does
        cat.put_service(txn, cat.node, svc)
        keep = {c["CheckID"] for c in checks}
        for chk in checks:
            _keep_status(txn.get("checks", f"{cat.node}/{chk['CheckID']}"), chk)
            cat.put_check(txn, cat.node, chk)
        if replace:
            for old in cat.txn_service_checks(txn, cat.node, svc["ID"]):
                cid = old["CheckID"]
                if cid not in keep and not cid.startswith(SERVICE_MAINTENANCE_PREFIX):
                    cat.delete_check(txn, cat.node, cid)
    _reset_ttls(request, [c["CheckID"] for c in checks])
    return reply(True)


def _reset_ttls(request: web.Request, check_ids: list[str]) -> None:
    """Restart the TTL clocks of checks just written (when the check runner is installed)."""
    runner = context(request).parts.get("checks")
    if runner is not None:
        for cid in check_ids:
            runner.reset_ttl(cid)


def _keep_status(old: Obj | None, chk: Obj) -> None:
    """Re-registering a check of the same kind keeps its status, so health does not blink."""
    if chk["Status"]:
        return
    if old is not None and old["Type"] == chk["Type"]:
        chk["Status"] = old["Status"]
        chk["Output"] = old["Output"]
    else:
        chk["Status"] = CRITICAL


async def service_deregister(request: web.Request) -> web.Response:
    ctx = context(request)
    cat = ctx.catalog
    sid, svc = _local_service(request, "write")
    if svc is None:
        raise NotFoundError(
            f"Unknown service ID {sid!r}. Ensure that the service ID is passed,"
            " not the service name."
        )
    with ctx.store.write() as txn:
        cat.delete_service(txn, cat.node, sid)
    return reply(True)


async def service_maintenance(request: web.Request) -> web.Response:
    ctx = context(request)
    cat = ctx.catalog
    sid, svc = _local_service(request, "write")
    enable = parse_enable(request)
    if svc is None:
        raise NotFoundError(f"Unknown service ID {sid!r}")
    with ctx.store.write() as txn:
        cat.set_service_maintenance(txn, cat.node, sid, enable, request.query.get("reason", ""))
    return reply(True)


async def node_maintenance(request: web.Request) -> web.Response:
    ctx = context(request)
    cat = ctx.catalog
    ctx.acl.require(request, "node", cat.node, "write")
    enable = parse_enable(request)
    with ctx.store.write() as txn:
        cat.set_node_maintenance(txn, cat.node, enable, request.query.get("reason", ""))
    return reply(True)


# -- handlers: checks ------------------------------------------------------------------


async def checks(request: web.Request) -> web.Response:
    ctx = context(request)
    grant = ctx.acl.grant(request)
    flt = query_filter(request)
    index = await block(request, ["agent:checks"])
    cat = ctx.catalog
    items = apply_filter(flt, [c for c in cat.agent_checks() if check_visible(grant, c)])
    return reply({c["CheckID"]: c for c in items}, index)


async def check_register(request: web.Request) -> web.Response:
    ctx = context(request)
    cat = ctx.catalog
    body = Body(await read_body(request))
    chk = parse_check(body)
    if not chk["Name"]:
        raise BadRequestError("Missing check name")
    chk["CheckID"] = chk["CheckID"] or chk["Name"]
    if not cat.agent_owns_check(cat.node, chk["CheckID"]):
        raise BadRequestError(f"Invalid check ID {chk['CheckID']!r}: reserved for node health")
    svc = cat.agent_service(chk["ServiceID"]) if chk["ServiceID"] else None
    if svc is not None:
        ctx.acl.require(request, "service", svc["Service"], "write")
    else:
        ctx.acl.require(request, "node", cat.node, "write")
    if chk["ServiceID"] and svc is None:
        # Consul >= 1.11 answers 404 here (agent_endpoint.go AgentRegisterCheck).
        raise NotFoundError(f"ServiceID {chk['ServiceID']!r} does not exist")
    with ctx.store.write() as txn:
        cat.ensure_local_node(txn)
        _keep_status(txn.get("checks", f"{cat.node}/{chk['CheckID']}"), chk)
        cat.put_check(txn, cat.node, chk)
    _reset_ttls(request, [chk["CheckID"]])
    return reply(True)


def _local_check(request: web.Request, access: str = "write") -> Obj:
    ctx = context(request)
    cat = ctx.catalog
    cid = request.match_info["check_id"]
    chk = cat.agent_check(cid)
    if chk is not None and chk["ServiceID"]:
        ctx.acl.require(request, "service", chk["ServiceName"], "write")
    else:
        ctx.acl.require(request, "node", cat.node, "write")
    if chk is None:
        raise NotFoundError(f"Unknown check ID {cid!r}")
    return chk


async def check_deregister(request: web.Request) -> web.Response:
    ctx = context(request)
    chk = _local_check(request)
    with ctx.store.write() as txn:
        ctx.catalog.delete_check(txn, ctx.catalog.node, chk["CheckID"])
    return reply(True)


def _update_ttl(request: web.Request, status: str, output: str) -> web.Response:
    ctx = context(request)
    chk = _local_check(request)
    if chk["Type"] != "ttl":
        raise BadRequestError(f"CheckID {chk['CheckID']!r} does not have associated TTL")
    with ctx.store.write() as txn:
        ctx.catalog.set_check_status(txn, ctx.catalog.node, chk["CheckID"], status, output)
    _reset_ttls(request, [chk["CheckID"]])
    return reply(True)


async def check_pass(request: web.Request) -> web.Response:
    return _update_ttl(request, PASSING, request.query.get("note", ""))


async def check_warn(request: web.Request) -> web.Response:
    return _update_ttl(request, WARNING, request.query.get("note", ""))


async def check_fail(request: web.Request) -> web.Response:
    return _update_ttl(request, CRITICAL, request.query.get("note", ""))


async def check_update(request: web.Request) -> web.Response:
    """`PUT /v1/agent/check/update/<id>` with `{Status, Output}`."""
    body = Body(await read_body(request))
    status = parse_status(body.text("Status"), "Status")
    return _update_ttl(request, status, body.text("Output"))


# -- handlers: local service health ------------------------------------------------------

_HEALTH_CODES = {PASSING: 200, WARNING: 429, CRITICAL: 503, "maintenance": 503}
_SEVERITY = {PASSING: 0, WARNING: 1, CRITICAL: 2, "maintenance": 3}


def aggregated_status(checks: list[Obj]) -> str:
    """Consul's HealthChecks.AggregatedStatus: maintenance > critical > warning > passing."""
    worst = PASSING
    for chk in checks:
        cid = chk["CheckID"]
        if cid == NODE_MAINTENANCE_ID or cid.startswith(SERVICE_MAINTENANCE_PREFIX):
            return "maintenance"
        if _SEVERITY.get(chk["Status"], 2) > _SEVERITY[worst]:
            worst = chk["Status"] if chk["Status"] in _SEVERITY else CRITICAL
    return worst


def _local_health(request: web.Request, svc: Obj) -> Obj:
    cat = context(request).catalog
    checks = cat.instance_checks(cat.node, svc["ID"])
    return {
        "AggregatedStatus": aggregated_status(checks),
        "Service": agent_service(svc, cat.datacenter),
        "Checks": checks,
    }


def _health_reply(request: web.Request, data: Any, status: str, index: int) -> web.Response:
    code = _HEALTH_CODES.get(status, 503)
    if request.query.get("format") == "text":
        resp = web.Response(text=status, status=code, content_type="text/plain")
        resp.headers["X-Consul-Index"] = str(max(1, index))
        return resp
    return reply(data, index, status=code)


async def health_by_id(request: web.Request) -> web.Response:
    """`/v1/agent/health/service/id/<id>`: 200 passing, 429 warning, 503 critical."""
    cat = context(request).catalog
    sid, _ = _local_service(request, "read")
    index = await block(request, [f"agent:service:{sid}", "agent:checks"])
    svc = cat.agent_service(sid)
    if svc is None:
        if request.query.get("format") == "text":
            raise NotFoundError(f"ServiceId {sid} not found")
        return reply(f"ServiceId {sid} not found", index, status=404)
    entry = _local_health(request, svc)
    return _health_reply(request, entry, entry["AggregatedStatus"], index)


async def health_by_name(request: web.Request) -> web.Response:
    """`/v1/agent/health/service/name/<name>`: every local instance; the worst decides."""
    ctx = context(request)
    cat = ctx.catalog
    name = request.match_info["name"]
    ctx.acl.require(request, "service", name, "read")
    index = await block(request, ["agent:services", "agent:checks"])
    entries = [_local_health(request, s) for s in cat.agent_services()]
    entries = [e for e in entries if e["Service"]["Service"] == name]
    if not entries:
        if request.query.get("format") == "text":
            raise NotFoundError(f"ServiceName {name} Not Found")
        return reply(f"ServiceName {name} Not Found", index, status=404)
    worst = max((e["AggregatedStatus"] for e in entries), key=lambda s: _SEVERITY.get(s, 2))
    return _health_reply(request, entries, worst, index)
