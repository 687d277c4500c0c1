"""Consul endpoints this single-node registry does not have, each refused with what replaces it.

A bare 404 from the web framework reads, to a client, like a wrong URL (py-consul even
maps 404 to "no such thing"). These answer 501 Not Implemented, which every Consul
client treats as an error, with a one-line text body (Consul's error format) naming the
endpoint, why it is missing here and what to use instead. `docs/api.md` lists the same.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web

from registry.errors import NotSupportedError

_CLUSTER = "point CONSUL_HTTP_ADDR at a Consul cluster for several servers"
_HEALTH = "ask /v1/health/service/<name> (with ?passing, ?tag= and ?filter=) instead"
_MESH = "Tether's control plane does this for the mesh (see docs/architecture.md)"

# (path pattern, what it is, why not here, what replaces it)
ENDPOINTS: tuple[tuple[str, str, str, str], ...] = (
    ("/v1/agent/join/{address}", "cluster join", "a single node joins no cluster", _CLUSTER),
    ("/v1/agent/leave", "cluster leave", "a single node is in no cluster", _CLUSTER),
    ("/v1/agent/force-leave/{node}", "force-leave", "there are no other members", _CLUSTER),
    (
        "/v1/agent/reload",
        "configuration reload",
        "the registry has flags, no config file",
        "restart it with new flags",
    ),
    ("/v1/agent/monitor", "log streaming", "the registry logs to its stderr", "read its log"),
    (
        "/v1/agent/metrics/stream",
        "metrics streaming",
        "not implemented",
        "poll /v1/agent/metrics (JSON, or ?format=prometheus)",
    ),
    ("/v1/agent/host", "host information", "not collected", "ask the host's own tools"),
    (
        "/v1/agent/connect/{tail:.*}",
        "Consul Connect on the agent",
        "the registry runs no Connect CA and no intentions",
        _MESH,
    ),
    (
        "/v1/connect/{tail:.*}",
        "Consul Connect (CA, intentions)",
        "the registry runs no Connect CA and no intentions",
        _MESH,
    ),
    (
        "/v1/operator/{tail:.*}",
        "operator (Raft, autopilot, keyring)",
        "a single node has no Raft peers, autopilot or gossip keyring",
        _CLUSTER,
    ),
    (
        "/v1/snapshot",
        "snapshots",
        "state is one SQLite file in --data-dir",
        "back up registry.db with the sqlite3 .backup command",
    ),
    ("/v1/query", "prepared queries", "not implemented", _HEALTH),
    ("/v1/query/{tail:.*}", "prepared queries", "not implemented", _HEALTH),
    ("/v1/config", "config entries", "there are no config entries here", _MESH),
    ("/v1/config/{tail:.*}", "config entries", "there are no config entries here", _MESH),
    (
        "/v1/coordinate/{tail:.*}",
        "network coordinates",
        "a single node has no peers to time",
        _CLUSTER,
    ),
    ("/v1/peering/{tail:.*}", "cluster peering", "a single node peers with no cluster", _CLUSTER),
    ("/v1/peerings", "cluster peering", "a single node peers with no cluster", _CLUSTER),
    (
        "/v1/acl/role{tail:.*}",
        "ACL roles",
        "not implemented",
        "link policies to tokens directly (Policies, ServiceIdentities, NodeIdentities)",
    ),
    (
        "/v1/acl/binding-rule{tail:.*}",
        "ACL binding rules",
        "there are no auth methods here",
        "create tokens with /v1/acl/token",
    ),
    (
        "/v1/acl/auth-method{tail:.*}",
        "ACL auth methods",
        "not implemented",
        "create tokens with /v1/acl/token",
    ),
    (
        "/v1/acl/login",
        "ACL login",
        "there are no auth methods here",
        "create tokens with /v1/acl/token",
    ),
    (
        "/v1/acl/logout",
        "ACL logout",
        "there are no auth methods here",
        "delete the token with DELETE /v1/acl/token/<accessor>",
    ),
    ("/v1/acl/replication", "ACL replication", "a single datacenter replicates nothing", _CLUSTER),
    (
        "/v1/acl/templated-polic{tail:.*}",
        "ACL templated policies",
        "not implemented",
        "ServiceIdentities and NodeIdentities on tokens",
    ),
    ("/v1/health/ingress/{service}", "ingress gateways", "there are no gateways here", _MESH),
    (
        "/v1/catalog/gateway-services/{gateway}",
        "gateway services",
        "there are no gateways here",
        _MESH,
    ),
    (
        "/v1/discovery-chain/{service}",
        "discovery chains",
        "there are no config entries here",
        _MESH,
    ),
    ("/v1/exported-services", "exported services", "a single node peers with no cluster", _CLUSTER),
    ("/v1/imported-services", "imported services", "a single node peers with no cluster", _CLUSTER),
)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _refuse(what: str, why: str, instead: str) -> Handler:
    async def handler(request: web.Request) -> web.StreamResponse:
        raise NotSupportedError(
            f"{request.method} {request.path}: {what} is not supported by this registry"
            f" ({why}); {instead}"
        )

    return handler


def register(app: web.Application) -> None:
    for path, what, why, instead in ENDPOINTS:
        app.router.add_route("*", path, _refuse(what, why, instead))
