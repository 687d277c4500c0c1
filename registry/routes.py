"""Every HTTP endpoint of the registry, in one table (as Consul's http_register.go)."""

from __future__ import annotations

from aiohttp import web

from registry import (
    acl_api,
    agent_api,
    catalog_api,
    event_api,
    health_api,
    kv_api,
    metrics,
    session_api,
    status,
    txn_api,
    unsupported,
)


def register(app: web.Application) -> None:
    r = app.router
    # Status
    r.add_get("/v1/status/leader", status.leader)
    r.add_get("/v1/status/peers", status.peers)
    # Agent
    r.add_get("/v1/agent/self", agent_api.self_)
    r.add_get("/v1/agent/version", agent_api.version)
    r.add_get("/v1/agent/members", agent_api.members)
    r.add_get("/v1/agent/services", agent_api.services)
    r.add_get("/v1/agent/service/{service_id}", agent_api.service)
    r.add_put("/v1/agent/service/register", agent_api.service_register)
    r.add_put("/v1/agent/service/deregister/{service_id}", agent_api.service_deregister)
    r.add_put("/v1/agent/service/maintenance/{service_id}", agent_api.service_maintenance)
    r.add_put("/v1/agent/maintenance", agent_api.node_maintenance)
    r.add_get("/v1/agent/checks", agent_api.checks)
    r.add_put("/v1/agent/check/register", agent_api.check_register)
    r.add_put("/v1/agent/check/deregister/{check_id}", agent_api.check_deregister)
    r.add_put("/v1/agent/check/pass/{check_id}", agent_api.check_pass)
    r.add_put("/v1/agent/check/warn/{check_id}", agent_api.check_warn)
    r.add_put("/v1/agent/check/fail/{check_id}", agent_api.check_fail)
    r.add_put("/v1/agent/check/update/{check_id}", agent_api.check_update)
    r.add_get("/v1/agent/health/service/id/{service_id}", agent_api.health_by_id)
    r.add_get("/v1/agent/health/service/name/{name}", agent_api.health_by_name)
    r.add_put("/v1/agent/token/{kind}", acl_api.agent_token)
    # Catalog
    r.add_put("/v1/catalog/register", catalog_api.register)
    r.add_put("/v1/catalog/deregister", catalog_api.deregister)
    r.add_get("/v1/catalog/datacenters", catalog_api.datacenters)
    r.add_get("/v1/catalog/nodes", catalog_api.nodes)
    r.add_get("/v1/catalog/services", catalog_api.services)
    r.add_get("/v1/catalog/service/{name}", catalog_api.service)
    r.add_get("/v1/catalog/connect/{name}", catalog_api.connect)
    r.add_get("/v1/catalog/node/{node}", catalog_api.node)
    r.add_get("/v1/catalog/node-services/{node}", catalog_api.node_services)
    # Health
    r.add_get("/v1/health/service/{name}", health_api.service)
    r.add_get("/v1/health/connect/{name}", health_api.connect)
    r.add_get("/v1/health/checks/{name}", health_api.checks)
    r.add_get("/v1/health/state/{state}", health_api.state)
    r.add_get("/v1/health/node/{node}", health_api.node)
    # KV and transactions
    r.add_get("/v1/kv/{key:.*}", kv_api.kv_get)
    r.add_put("/v1/kv/{key:.*}", kv_api.kv_put)
    r.add_delete("/v1/kv/{key:.*}", kv_api.kv_delete)
    r.add_put("/v1/txn", txn_api.txn)
    # Sessions
    r.add_put("/v1/session/create", session_api.create)
    r.add_put("/v1/session/destroy/{id}", session_api.destroy)
    r.add_put("/v1/session/renew/{id}", session_api.renew)
    r.add_get("/v1/session/info/{id}", session_api.info)
    r.add_get("/v1/session/node/{node}", session_api.node)
    r.add_get("/v1/session/list", session_api.list_all)
    # Events
    r.add_put("/v1/event/fire/{name:.*}", event_api.fire)
    r.add_get("/v1/event/list", event_api.list_events)
    # ACL (the fixed paths before the parameterised ones)
    r.add_put("/v1/acl/bootstrap", acl_api.bootstrap)
    r.add_put("/v1/acl/policy", acl_api.policy_create)
    r.add_get("/v1/acl/policies", acl_api.policy_list)
    r.add_get("/v1/acl/policy/name/{name}", acl_api.policy_read_by_name)
    r.add_get("/v1/acl/policy/{id}", acl_api.policy_read)
    r.add_put("/v1/acl/policy/{id}", acl_api.policy_update)
    r.add_delete("/v1/acl/policy/{id}", acl_api.policy_delete)
    r.add_put("/v1/acl/token", acl_api.token_create)
    r.add_get("/v1/acl/tokens", acl_api.token_list)
    r.add_get("/v1/acl/token/self", acl_api.token_self)
    r.add_put("/v1/acl/token/{id}/clone", acl_api.token_clone)
    r.add_get("/v1/acl/token/{id}", acl_api.token_read)
    r.add_put("/v1/acl/token/{id}", acl_api.token_update)
    r.add_delete("/v1/acl/token/{id}", acl_api.token_delete)
    r.add_post("/v1/internal/acl/authorize", acl_api.authorize)
    # Metrics
    r.add_get("/v1/agent/metrics", metrics.agent_metrics)
    # Consul endpoints a single node does not have: a clear 501, not a bare 404.
    unsupported.register(app)
