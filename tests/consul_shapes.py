"""The key sets of Consul's HTTP answers, as its sources define them (the fixture the
compatibility tests compare the registry's answers with).

Taken from hashicorp/consul: `api/agent.go` (AgentService, its `json:",omitempty"`
fields), `agent/structs/structs.go` (ServiceNode, HealthCheck, Node, CheckServiceNode),
`agent/consul/leader_registrator_v1.go` (the `consul` service a server registers for
itself) and the API docs' sample answers. Only keys: values differ per registration.
"""

from __future__ import annotations

# /v1/agent/services entries for a bare registration ({"Name": ..., "Port": ...}):
# AgentService without its omitempty fields (Kind, SocketPath, TaggedAddresses,
# CreateIndex, ModifyIndex, ContentHash, Proxy, Connect, PeerName, Namespace, Partition,
# Locality), and with Datacenter, which the agent endpoint sets.
AGENT_SERVICE_BARE = frozenset(
    {"ID", "Service", "Tags", "Meta", "Port", "Address", "Weights", "EnableTagOverride",
     "Datacenter"}
)  # fmt: skip
# The omitempty fields appear once set.
AGENT_SERVICE_OPTIONAL = frozenset(
    {"Kind", "SocketPath", "TaggedAddresses", "Proxy", "Connect", "Locality"}
)
# /v1/agent/service/<id> adds the ContentHash it blocks on.
AGENT_SERVICE_ONE_EXTRA = frozenset({"ContentHash"})

# /v1/catalog/service/<name> entries: structs.ServiceNode (ServiceTaggedAddresses is
# omitempty; EnterpriseMeta is empty in OSS; RaftIndex gives the two indexes).
SERVICE_NODE = frozenset(
    {"ID", "Node", "Address", "Datacenter", "TaggedAddresses", "NodeMeta", "ServiceKind",
     "ServiceID", "ServiceName", "ServiceTags", "ServiceAddress", "ServiceWeights",
     "ServiceMeta", "ServicePort", "ServiceSocketPath", "ServiceEnableTagOverride",
     "ServiceProxy", "ServiceConnect", "ServiceLocality", "CreateIndex", "ModifyIndex"}
)  # fmt: skip

# structs.Node as the catalog and health endpoints show it.
NODE = frozenset(
    {"ID", "Node", "Address", "Datacenter", "TaggedAddresses", "Meta", "CreateIndex",
     "ModifyIndex"}
)  # fmt: skip

# structs.HealthCheck (PeerName omitempty).
HEALTH_CHECK = frozenset(
    {"Node", "CheckID", "Name", "Status", "Notes", "Output", "ServiceID", "ServiceName",
     "ServiceTags", "Type", "Interval", "Timeout", "ExposedPort", "Definition",
     "CreateIndex", "ModifyIndex"}
)  # fmt: skip

# structs.CheckServiceNode: one /v1/health/service/<name> entry.
HEALTH_ENTRY = frozenset({"Node", "Service", "Checks"})

# The `consul` service a server registers on its node (leader_registrator_v1.go).
CONSUL_SERVICE_META = frozenset(
    {"non_voter", "read_replica", "raft_version", "serf_protocol_current",
     "serf_protocol_min", "serf_protocol_max", "version"}
)  # fmt: skip
CONSUL_SERVICE_PORT = 8300

# api.AgentMember.
AGENT_MEMBER = frozenset(
    {"Name", "Addr", "Port", "Tags", "Status", "ProtocolMin", "ProtocolMax", "ProtocolCur",
     "DelegateMin", "DelegateMax", "DelegateCur"}
)  # fmt: skip
