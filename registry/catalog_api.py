"""`/v1/catalog/*`: register and deregister nodes, services and checks; read the catalog.

Every read takes `?index=&wait=` (blocking on exactly the resource it shows), `?filter=`,
`?dc=` and, where Consul has it, `?node-meta=key:value` and `?tag=`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from aiohttp import web

from registry.agent_api import parse_service, parse_status, validate_meta
from registry.catalog import CRITICAL, Catalog
from registry.errors import BadRequestError, RegistryError
from registry.http import (
    Body,
    apply_filter,
    block,
    context,
    query_filter,
    read_body,
    reply,
)
from registry.store import Obj

if TYPE_CHECKING:
    from registry.acl import Grant
    from registry.filter import Filter


def node_meta_query(request: web.Request) -> dict[str, str]:
    """`?node-meta=key:value` (repeatable): the node Meta every result must have."""
    out: dict[str, str] = {}
    for item in request.query.getall("node-meta", []):
        key, sep, value = item.partition(":")
        if not sep or not key:
            raise BadRequestError(f"Invalid node-meta parameter {item!r}: want key:value")
        out[key] = value
    return out


def node_matches(node: Obj | None, meta: dict[str, str]) -> bool:
    if not meta:
        return True
    if node is None:
        return False
    have = node.get("Meta") or {}
    return all(have.get(k) == v for k, v in meta.items())


@dataclass(frozen=True, slots=True)
class ServiceRead:
    """A read of one service's instances or checks (catalog and health): its query, its
    caller's grant, and the index it answers at once it has blocked."""

    name: str
    tags: list[str]
    meta: dict[str, str]
    flt: Filter | None
    grant: Grant
    index: int

    def shows(self, node_name: str, node: Obj | None) -> bool:
        """Whether an entry on `node` is in the answer: the node has the `?node-meta=`
        asked for and the caller may read it."""
        return node_matches(node, self.meta) and self.grant.allows("node", node_name, "read")


async def read_service(request: web.Request, *, connect: bool = False) -> ServiceRead:
    """Check and parse a read of `<name>`'s instances, then block on them: on
    `connect:<name>` for its Connect proxies, else on `service:<name>`."""
    ctx = context(request)
    name = request.match_info["name"]
    ctx.acl.require(request, "service", name, "read")
    flt = query_filter(request)
    meta = node_meta_query(request)
    tags = request.query.getall("tag", [])
    grant = ctx.acl.grant(request)
    index = await block(request, [f"connect:{name}" if connect else f"service:{name}"])
    return ServiceRead(name, tags, meta, flt, grant, index)


def service_node(svc: Obj, node: Obj | None) -> Obj:
    """An instance as /v1/catalog/service shows it: its node's fields, then its own."""
    n = node or {}
    out: Obj = {
        "ID": n.get("ID", ""),
        "Node": svc["Node"],
        "Address": n.get("Address", ""),
        "Datacenter": n.get("Datacenter", ""),
        "TaggedAddresses": n.get("TaggedAddresses", {}),
        "NodeMeta": n.get("Meta", {}),
        "ServiceKind": svc.get("Kind", ""),
        "ServiceID": svc["ID"],
        "ServiceName": svc["Service"],
        "ServiceTags": svc["Tags"],
        "ServiceAddress": svc["Address"],
        "ServiceWeights": svc["Weights"],
        "ServiceMeta": svc["Meta"],
        "ServicePort": svc["Port"],
        "ServiceSocketPath": svc.get("SocketPath", ""),
        "ServiceEnableTagOverride": svc["EnableTagOverride"],
        "ServiceProxy": svc.get("Proxy", {}),
        "ServiceConnect": svc.get("Connect", {}),
        "ServiceLocality": svc.get("Locality"),
        "CreateIndex": svc["CreateIndex"],
        "ModifyIndex": svc["ModifyIndex"],
    }
    if svc["TaggedAddresses"]:  # `json:",omitempty"` in structs.ServiceNode
        out["ServiceTaggedAddresses"] = svc["TaggedAddresses"]
    return out


def _parse_catalog_check(body: Body, node: str) -> Obj:
    cid = body.text("CheckID") or body.text("ID") or body.text("Name")
    if not cid:
        raise BadRequestError(f"Invalid check {body.path}: missing CheckID or Name")
    status = body.text("Status")
    definition = body.obj("Definition")
    cnode = body.text("Node")
    if cnode and cnode != node:
        raise BadRequestError(f"Invalid check {body.path}: Node {cnode!r} is not {node!r}")
    return {
        "CheckID": cid,
        "Name": body.text("Name") or cid,
        "Notes": body.text("Notes"),
        "Status": parse_status(status, f"{body.path}.Status") if status else CRITICAL,
        "Output": body.text("Output"),
        "ServiceID": body.text("ServiceID"),
        "Type": body.text("Type"),
        "Interval": "",
        "Timeout": "",
        "Definition": dict(definition.raw) if definition is not None else {},
    }


async def register(request: web.Request) -> web.Response:
    ctx = context(request)
    cat: Catalog = ctx.catalog
    body = Body(await read_body(request))
    node = body.text("Node")
    if not node:
        raise BadRequestError("Must provide node")
    if "/" in node:
        raise BadRequestError(f"Invalid node name {node!r}: '/' is not allowed")
    dc = body.text("Datacenter")
    if dc and dc != cat.datacenter:
        raise RegistryError("No path to datacenter")
    skip_node = body.flag("SkipNodeUpdate") and cat.get_node(node) is not None
    address = body.text("Address")
    if not address and not skip_node:
        raise BadRequestError("Must provide address")
    tagged = body.string_map("TaggedAddresses")
    meta = validate_meta(body.string_map("NodeMeta"), "Node Meta")
    node_id = body.text("ID")
    sbody = body.obj("Service")
    svc = parse_service(sbody, name_field="Service") if sbody is not None else None
    checks = []
    single = body.obj("Check")
    if single is not None:
        checks.append(_parse_catalog_check(single, node))
    checks.extend(_parse_catalog_check(c, node) for c in body.obj_list("Checks"))
    ctx.acl.require(request, "node", node, "write")
    if svc is not None:
        ctx.acl.require(request, "service", svc["Service"], "write")
    for chk in checks:
        sid = chk["ServiceID"]
        in_request = svc is not None and svc["ID"] == sid
        if sid and not in_request and cat.get_service(node, sid) is None:
            raise BadRequestError(f"Invalid check {chk['CheckID']!r}: unknown ServiceID {sid!r}")
    with ctx.store.write() as txn:
        if not skip_node:
            cat.ensure_node(
                txn,
                node,
                address,
                node_id=node_id,
                tagged_addresses=tagged,
                meta=meta,
            )
        if svc is not None:
            cat.put_service(txn, node, svc)
        for chk in checks:
            cat.put_check(txn, node, chk)
    return reply(True)


async def deregister(request: web.Request) -> web.Response:
    ctx = context(request)
    cat = ctx.catalog
    body = Body(await read_body(request))
    node = body.text("Node")
    if not node:
        raise BadRequestError("Must provide node")
    sid = body.text("ServiceID")
    cid = body.text("CheckID")
    if sid:
        svc = cat.get_service(node, sid)
        ctx.acl.require(request, "service", svc["Service"] if svc else sid, "write")
    else:
        ctx.acl.require(request, "node", node, "write")
    with ctx.store.write() as txn:
        if sid:
            cat.delete_service(txn, node, sid)
        elif cid:
            cat.delete_check(txn, node, cid)
        else:
            cat.delete_node(txn, node)
    return reply(True)


async def datacenters(request: web.Request) -> web.Response:
    ctx = context(request)
    # Nothing ever touches this resource: a blocking read just waits out `wait`.
    index = await block(request, ["datacenters"])
    return reply([ctx.catalog.datacenter], index)


async def nodes(request: web.Request) -> web.Response:
    ctx = context(request)
    grant = ctx.acl.grant(request)
    flt = query_filter(request)
    meta = node_meta_query(request)
    index = await block(request, ["nodes"])
    items = [
        n
        for n in ctx.catalog.nodes()
        if node_matches(n, meta) and grant.allows("node", n["Node"], "read")
    ]
    return reply(apply_filter(flt, items), index)


async def services(request: web.Request) -> web.Response:
    ctx = context(request)
    grant = ctx.acl.grant(request)
    flt = query_filter(request)
    meta = node_meta_query(request)
    index = await block(request, ["services", "nodes"] if meta else ["services"])
    cat = ctx.catalog
    names = {k: v for k, v in cat.service_names().items() if grant.allows("service", k, "read")}
    if flt is None and not meta:
        return reply(names, index)
    # Filters apply to instances (as Consul's do); the answer is still name -> tags.
    out: dict[str, set[str]] = {}
    for name in names:
        for svc in cat.instances(name):
            node = cat.get_node(svc["Node"])
            if not node_matches(node, meta):
                continue
            if flt is not None and not flt.matches(service_node(svc, node)):
                continue
            out.setdefault(name, set()).update(svc["Tags"])
    return reply({k: sorted(v) for k, v in out.items()}, index)


async def service(request: web.Request) -> web.Response:
    return await _service(request, connect=False)


async def connect(request: web.Request) -> web.Response:
    """`/v1/catalog/connect/<name>`: the Connect proxies (and native instances) of `name`."""
    return await _service(request, connect=True)


async def _service(request: web.Request, *, connect: bool) -> web.Response:
    q = await read_service(request, connect=connect)
    cat = context(request).catalog
    items = []
    for svc in cat.instances(q.name, q.tags, connect=connect):
        node = cat.get_node(svc["Node"])
        if q.shows(svc["Node"], node):
            items.append(service_node(svc, node))
    return reply(apply_filter(q.flt, items), q.index)


async def node(request: web.Request) -> web.Response:
    return await _node(request, services_as_list=False)


async def node_services(request: web.Request) -> web.Response:
    """`/v1/catalog/node-services/<node>`: as /node/<node> with Services as a list."""
    return await _node(request, services_as_list=True)


async def _node(request: web.Request, *, services_as_list: bool) -> web.Response:
    ctx = context(request)
    name = request.match_info["node"]
    ctx.acl.require(request, "node", name, "read")
    flt = query_filter(request)
    index = await block(request, [f"node:{name}"])
    cat = ctx.catalog
    n = cat.get_node(name)
    if n is None:
        return reply(None, index)
    grant = ctx.acl.grant(request)
    svcs = apply_filter(
        flt,
        [
            _node_service(s)
            for s in cat.node_services(name)
            if grant.allows("service", s["Service"], "read")
        ],
    )
    if services_as_list:
        return reply({"Node": n, "Services": svcs}, index)
    return reply({"Node": n, "Services": {s["ID"]: s for s in svcs}}, index)


def _node_service(svc: Obj) -> Obj:
    return {k: v for k, v in svc.items() if k != "Node"}
