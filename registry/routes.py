"""Every HTTP endpoint of the registry, in one table (as Consul's http_register.go)."""

from __future__ import annotations

from aiohttp import web

from registry import agent_api, catalog_api, health_api, status


def register(app: web.Application) -> None:
    r = app.router
    # Status
    r.add_get("/v1/status/leader", status.leader)
    r.add_get("/v1/status/peers", status.peers)
    # Agent
    r.add_get("/v1/agent/self", agent_api.self_)
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
    # Catalog
    r.add_put("/v1/catalog/register", catalog_api.register)
    r.add_put("/v1/catalog/deregister", catalog_api.deregister)
    r.add_get("/v1/catalog/datacenters", catalog_api.datacenters)
    r.add_get("/v1/catalog/nodes", catalog_api.nodes)
    r.add_get("/v1/catalog/services", catalog_api.services)
    r.add_get("/v1/catalog/service/{name}", catalog_api.service)
    r.add_get("/v1/catalog/node/{node}", catalog_api.node)
    r.add_get("/v1/catalog/node-services/{node}", catalog_api.node_services)
    # Health
    r.add_get("/v1/health/service/{name}", health_api.service)
    r.add_get("/v1/health/checks/{name}", health_api.checks)
    r.add_get("/v1/health/state/{state}", health_api.state)
    r.add_get("/v1/health/node/{node}", health_api.node)
