"""The catalog's state operations: nodes, services, checks, health and maintenance.

No HTTP here. Writes are methods that stage changes in the caller's `Txn` and touch
the resources whose views they change: `nodes`, `node:<name>`, `services`,
`service:<name>` (its instances, their checks and their nodes' checks), `checks`,
`agent:services`, `agent:service:<id>`, `agent:checks`. A write that changes nothing
observable stages nothing, so no watcher wakes for it. Reads
answer from the committed tables through secondary indexes (service name -> instances,
node -> services and checks, instance -> checks) that a commit hook keeps current.

Object shapes follow Consul: nodes `{ID, Node, Address, Datacenter, TaggedAddresses,
Meta}`, services `{Node, ID, Service, Tags, Address, Port, Meta, Weights, ...}`, checks
`{Node, CheckID, Name, Status, Notes, Output, ServiceID, ServiceName, ServiceTags, Type,
Interval, Timeout, ExposedPort, Definition}`, each with CreateIndex and ModifyIndex.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from typing import Any

from registry.errors import BadRequestError
from registry.store import Obj, Store, Txn

PASSING = "passing"
WARNING = "warning"
CRITICAL = "critical"
STATUSES = (PASSING, WARNING, CRITICAL)

SERF_CHECK_ID = "serfHealth"
# The service a Consul server registers for itself on its own node (clients find servers
# by it); the server, not the agent, owns it, so the agent endpoints do not list it.
CONSUL_SERVICE_ID = "consul"
CONSUL_SERVER_PORT = 8300
NODE_MAINTENANCE_ID = "_node_maintenance"
SERVICE_MAINTENANCE_PREFIX = "_service_maintenance:"

_INDEX_FIELDS = ("CreateIndex", "ModifyIndex")


def item_key(node: str, item_id: str) -> str:
    """The key of a service or check in its table: `<node>/<id>`."""
    return f"{node}/{item_id}"


def split_key(key: str) -> tuple[str, str]:
    node, _, item_id = key.partition("/")
    return node, item_id


def connect_target(svc: Obj) -> str:
    """The service a Connect proxy (or a Connect-native service) stands for, or ""."""
    if svc.get("Kind") == "connect-proxy":
        proxy = svc.get("Proxy")
        if isinstance(proxy, dict):
            return str(proxy.get("DestinationServiceName") or "")
        return ""
    connect = svc.get("Connect")
    if isinstance(connect, dict) and connect.get("Native") is True:
        return str(svc["Service"])
    return ""


def view_resources(svc: Obj) -> list[str]:
    """The resources whose views show instance `svc`: its service, and its Connect target."""
    target = connect_target(svc)
    name = f"service:{svc['Service']}"
    return [name, f"connect:{target}"] if target else [name]


def _same(old: Obj | None, new: Obj) -> bool:
    """Whether `new` equals `old` apart from the indexes (a no-op write)."""
    if old is None:
        return False
    return {k: v for k, v in old.items() if k not in _INDEX_FIELDS} == {
        k: v for k, v in new.items() if k not in _INDEX_FIELDS
    }


def _stamp(txn: Txn, old: Obj | None, new: Obj) -> Obj:
    new["CreateIndex"] = old["CreateIndex"] if old is not None else txn.index
    new["ModifyIndex"] = txn.index
    return new


class Catalog:
    """Nodes, services and checks of one datacenter, and the local agent's identity."""

    def __init__(
        self, store: Store, node: str, datacenter: str, address: str, version: str
    ) -> None:
        self.store = store
        self.version = version
        self.node = node
        self.datacenter = datacenter
        self.address = address
        self._svc_by_name: dict[str, set[str]] = {}
        self._svc_by_node: dict[str, set[str]] = {}
        self._svc_name: dict[str, str] = {}
        self._chk_by_node: dict[str, set[str]] = {}
        self._chk_by_svc: dict[str, set[str]] = {}
        self._chk_svc: dict[str, str] = {}
        self._node_level: dict[str, set[str]] = {}  # node -> its checks of no service
        self._connect: dict[str, set[str]] = {}  # service -> its proxies (and native self)
        self._connect_of: dict[str, str] = {}
        for key, svc in store.table("services").items():
            self._index_service(key, svc)
        for key, chk in store.table("checks").items():
            self._index_check(key, chk)
        store.on_commit(self._on_commit)

    # -- secondary indexes ---------------------------------------------------------------

    def _index_service(self, key: str, svc: Obj) -> None:
        self._unindex_service(key)
        name = svc["Service"]
        self._svc_name[key] = name
        self._svc_by_name.setdefault(name, set()).add(key)
        self._svc_by_node.setdefault(svc["Node"], set()).add(key)
        target = connect_target(svc)
        if target:
            self._connect_of[key] = target
            self._connect.setdefault(target, set()).add(key)

    def _unindex_service(self, key: str) -> None:
        name = self._svc_name.pop(key, None)
        if name is None:
            return
        _discard(self._svc_by_name, name, key)
        _discard(self._svc_by_node, split_key(key)[0], key)
        target = self._connect_of.pop(key, None)
        if target is not None:
            _discard(self._connect, target, key)

    def _index_check(self, key: str, chk: Obj) -> None:
        self._unindex_check(key)
        node = chk["Node"]
        self._chk_by_node.setdefault(node, set()).add(key)
        sid = chk.get("ServiceID") or ""
        if sid:
            skey = item_key(node, sid)
            self._chk_svc[key] = skey
            self._chk_by_svc.setdefault(skey, set()).add(key)
        else:
            self._node_level.setdefault(node, set()).add(key)

    def _unindex_check(self, key: str) -> None:
        _discard(self._chk_by_node, split_key(key)[0], key)
        _discard(self._node_level, split_key(key)[0], key)
        skey = self._chk_svc.pop(key, None)
        if skey is not None:
            _discard(self._chk_by_svc, skey, key)

    def _on_commit(self, txn: Txn) -> None:
        for (tbl, key), obj in txn.puts.items():
            if tbl == "services":
                self._index_service(key, obj)
            elif tbl == "checks":
                self._index_check(key, obj)
        for tbl, key in txn.deletes:
            if tbl == "services":
                self._unindex_service(key)
            elif tbl == "checks":
                self._unindex_check(key)

    def _staged_keys(self, txn: Txn, tbl: str, committed: Iterable[str], prefix: str) -> list[str]:
        """Keys of `tbl` under `prefix` as the txn sees them (committed plus staged)."""
        keys = set(committed)
        keys.update(k for (t, k) in txn.puts if t == tbl and k.startswith(prefix))
        return sorted(k for k in keys if txn.get(tbl, k) is not None)

    def _txn_node_services(self, txn: Txn, node: str) -> list[Obj]:
        keys = self._staged_keys(txn, "services", self._svc_by_node.get(node, ()), node + "/")
        return [o for k in keys if (o := txn.get("services", k)) is not None]

    def _txn_node_checks(self, txn: Txn, node: str) -> list[Obj]:
        keys = self._staged_keys(txn, "checks", self._chk_by_node.get(node, ()), node + "/")
        return [o for k in keys if (o := txn.get("checks", k)) is not None]

    # -- touches -------------------------------------------------------------------------

    def _touch_node(self, txn: Txn, node: str) -> None:
        """A change that every view of `node` shows, including its services' views."""
        txn.touch("nodes", f"node:{node}")
        for svc in self._txn_node_services(txn, node):
            txn.touch(*view_resources(svc))

    def _touch_check(self, txn: Txn, chk: Obj) -> None:
        node = chk["Node"]
        txn.touch("checks", f"node:{node}")
        if chk.get("ServiceID"):
            txn.touch(f"service:{chk['ServiceName']}")
            svc = txn.get("services", item_key(node, chk["ServiceID"]))
            if svc is not None:
                txn.touch(*view_resources(svc))
        else:
            for svc in self._txn_node_services(txn, node):
                txn.touch(*view_resources(svc))
        if self.agent_owns_check(node, chk["CheckID"]):
            txn.touch("agent:checks")

    # -- nodes ---------------------------------------------------------------------------

    def ensure_node(
        self,
        txn: Txn,
        name: str,
        address: str,
        *,
        node_id: str = "",
        datacenter: str = "",
        tagged_addresses: dict[str, str] | None = None,
        meta: dict[str, str] | None = None,
    ) -> Obj:
        old = txn.get("nodes", name)
        new: Obj = {
            "ID": node_id or (old["ID"] if old is not None else str(uuid.uuid4())),
            "Node": name,
            "Address": address,
            "Datacenter": datacenter or self.datacenter,
            "TaggedAddresses": dict(tagged_addresses or {}),
            "Meta": dict(meta or {}),
        }
        if old is not None and _same(old, new):
            return old
        _stamp(txn, old, new)
        txn.put("nodes", name, new)
        self._touch_node(txn, name)
        return new

    def delete_node(self, txn: Txn, name: str) -> bool:
        if txn.get("nodes", name) is None:
            return False
        for chk in self._txn_node_checks(txn, name):
            self.delete_check(txn, name, chk["CheckID"])
        for svc in self._txn_node_services(txn, name):
            self.delete_service(txn, name, svc["ID"])
        self._touch_node(txn, name)
        txn.delete("nodes", name)
        return True

    def ensure_local_node(self, txn: Txn) -> None:
        """The agent's own node, its `serfHealth` check and the `consul` service, as a
        Consul server has them."""
        old = txn.get("nodes", self.node)
        addr = self.address
        self.ensure_node(
            txn,
            self.node,
            addr,
            node_id=old["ID"] if old is not None else "",
            tagged_addresses={"lan": addr, "lan_ipv4": addr, "wan": addr, "wan_ipv4": addr},
            meta=old["Meta"] if old is not None else {"consul-network-segment": ""},
        )
        self.put_check(
            txn,
            self.node,
            {
                "CheckID": SERF_CHECK_ID,
                "Name": "Serf Health Status",
                "Status": PASSING,
                "Notes": "",
                "Output": "Agent alive and reachable",
                "ServiceID": "",
                "Type": "",
                "Definition": {},
            },
        )
        self.put_service(txn, self.node, self._consul_service())

    def _consul_service(self) -> Obj:
        """What Consul's leader registers for each server (leader_registrator_v1.go)."""
        return {
            "ID": CONSUL_SERVICE_ID,
            "Service": CONSUL_SERVICE_ID,
            "Tags": [],
            "Address": "",
            "Port": CONSUL_SERVER_PORT,
            "Meta": {
                "non_voter": "false",
                "read_replica": "false",
                "raft_version": "3",
                "serf_protocol_current": "2",
                "serf_protocol_min": "1",
                "serf_protocol_max": "5",
                "version": self.version,
            },
            "Weights": {"Passing": 1, "Warning": 1},
            "TaggedAddresses": {},
            "EnableTagOverride": False,
            "Kind": "",
        }

    # -- what the local agent owns -------------------------------------------------------

    def agent_owns_service(self, node: str, service_id: str) -> bool:
        """Whether the agent endpoints show this service: the local node's, but for the
        server's own `consul` service."""
        return node == self.node and service_id != CONSUL_SERVICE_ID

    def agent_owns_check(self, node: str, check_id: str) -> bool:
        """Whether the agent endpoints show this check: the local node's, but for
        `serfHealth`, which is the cluster's view of the node (a catalog check)."""
        return node == self.node and check_id != SERF_CHECK_ID

    def agent_services(self) -> list[Obj]:
        return [s for s in self.node_services(self.node) if s["ID"] != CONSUL_SERVICE_ID]

    def agent_checks(self) -> list[Obj]:
        return [c for c in self.node_checks(self.node) if c["CheckID"] != SERF_CHECK_ID]

    def agent_service(self, service_id: str) -> Obj | None:
        if not self.agent_owns_service(self.node, service_id):
            return None
        return self.get_service(self.node, service_id)

    def agent_check(self, check_id: str) -> Obj | None:
        if not self.agent_owns_check(self.node, check_id):
            return None
        return self.get_check(self.node, check_id)

    # -- services ------------------------------------------------------------------------

    def put_service(self, txn: Txn, node: str, svc: Obj) -> Obj:
        """Register (or update) a service instance on `node`, which must exist."""
        key = item_key(node, svc["ID"])
        old = txn.get("services", key)
        new = dict(svc, Node=node)
        if old is not None and _same(old, new):
            return old
        _stamp(txn, old, new)
        txn.put("services", key, new)
        name = new["Service"]
        txn.touch(*view_resources(new), f"node:{node}")
        if old is None or old["Service"] != name or old["Tags"] != new["Tags"]:
            txn.touch("services")
        if old is not None:
            txn.touch(*view_resources(old))
        if self.agent_owns_service(node, svc["ID"]):
            txn.touch("agent:services", f"agent:service:{svc['ID']}")
        if old is not None and (old["Service"] != name or old["Tags"] != new["Tags"]):
            # Checks carry their service's name and tags.
            for chk in self.txn_service_checks(txn, node, svc["ID"]):
                self.put_check(txn, node, dict(chk, ServiceName=name, ServiceTags=new["Tags"]))
        return new

    def delete_service(self, txn: Txn, node: str, service_id: str) -> bool:
        key = item_key(node, service_id)
        old = txn.get("services", key)
        if old is None:
            return False
        for chk in self.txn_service_checks(txn, node, service_id):
            self.delete_check(txn, node, chk["CheckID"])
        txn.delete("services", key)
        txn.touch("services", *view_resources(old), f"node:{node}")
        if self.agent_owns_service(node, service_id):
            txn.touch("agent:services", f"agent:service:{service_id}")
        return True

    # -- checks --------------------------------------------------------------------------

    def txn_service_checks(self, txn: Txn, node: str, service_id: str) -> list[Obj]:
        skey = item_key(node, service_id)
        keys = self._staged_keys(txn, "checks", self._chk_by_svc.get(skey, ()), node + "/")
        out = []
        for k in keys:
            chk = txn.get("checks", k)
            if chk is not None and chk.get("ServiceID") == service_id:
                out.append(chk)
        return out

    def put_check(self, txn: Txn, node: str, chk: Obj) -> Obj:
        """Register (or update) a check on `node`; a ServiceID must name a service there.

        The service's name and tags are copied in from the service itself.
        """
        new: Obj = {
            "Node": node,
            "CheckID": chk["CheckID"],
            "Name": chk.get("Name", ""),
            "Status": chk.get("Status") or CRITICAL,
            "Notes": chk.get("Notes", ""),
            "Output": chk.get("Output", ""),
            "ServiceID": chk.get("ServiceID", ""),
            "ServiceName": "",
            "ServiceTags": [],
            "Type": chk.get("Type", ""),
            "Interval": chk.get("Interval", ""),
            "Timeout": chk.get("Timeout", ""),
            "ExposedPort": chk.get("ExposedPort", 0),  # Connect's expose paths: never here
            "Definition": dict(chk.get("Definition") or {}),
        }
        if new["ServiceID"]:
            svc = txn.get("services", item_key(node, new["ServiceID"]))
            if svc is None:
                raise BadRequestError(f"ServiceID {new['ServiceID']!r} does not exist")
            new["ServiceName"] = svc["Service"]
            new["ServiceTags"] = list(svc["Tags"])
        key = item_key(node, new["CheckID"])
        old = txn.get("checks", key)
        if old is not None and _same(old, new):
            return old
        _stamp(txn, old, new)
        txn.put("checks", key, new)
        self._touch_check(txn, new)
        if old is not None and old.get("ServiceID") and old["ServiceID"] != new["ServiceID"]:
            self._touch_check(txn, old)
        return new

    def delete_check(self, txn: Txn, node: str, check_id: str) -> bool:
        key = item_key(node, check_id)
        old = txn.get("checks", key)
        if old is None:
            return False
        txn.delete("checks", key)
        self._touch_check(txn, old)
        return True

    def set_check_status(
        self, txn: Txn, node: str, check_id: str, status: str, output: str
    ) -> Obj | None:
        """Change a check's status and output; nothing is staged if neither changes."""
        old = txn.get("checks", item_key(node, check_id))
        if old is None:
            return None
        if old["Status"] == status and old["Output"] == output:
            return old
        new = dict(old, Status=status, Output=output)
        _stamp(txn, old, new)
        txn.put("checks", item_key(node, check_id), new)
        self._touch_check(txn, new)
        return new

    # -- maintenance ---------------------------------------------------------------------

    def set_service_maintenance(
        self, txn: Txn, node: str, service_id: str, enable: bool, reason: str
    ) -> None:
        cid = SERVICE_MAINTENANCE_PREFIX + service_id
        if not enable:
            self.delete_check(txn, node, cid)
            return
        self.put_check(
            txn,
            node,
            {
                "CheckID": cid,
                "Name": "Service Maintenance Mode",
                "Status": CRITICAL,
                "Notes": reason
                or "Maintenance mode is enabled for this service, but no reason was "
                "provided. This is a default message.",
                "ServiceID": service_id,
                "Type": "maintenance",
            },
        )

    def set_node_maintenance(self, txn: Txn, node: str, enable: bool, reason: str) -> None:
        if not enable:
            self.delete_check(txn, node, NODE_MAINTENANCE_ID)
            return
        self.put_check(
            txn,
            node,
            {
                "CheckID": NODE_MAINTENANCE_ID,
                "Name": "Node Maintenance Mode",
                "Status": CRITICAL,
                "Notes": reason
                or "Maintenance mode is enabled for this node, but no reason was "
                "provided. This is a default message.",
                "Type": "maintenance",
            },
        )

    # -- reads ---------------------------------------------------------------------------

    def get_node(self, name: str) -> Obj | None:
        return self.store.get("nodes", name)

    def nodes(self) -> list[Obj]:
        table = self.store.table("nodes")
        return [table[k] for k in sorted(table)]

    def node_services(self, node: str) -> list[Obj]:
        table = self.store.table("services")
        return [table[k] for k in sorted(self._svc_by_node.get(node, ()))]

    def node_checks(self, node: str) -> list[Obj]:
        table = self.store.table("checks")
        return [table[k] for k in sorted(self._chk_by_node.get(node, ()))]

    def get_service(self, node: str, service_id: str) -> Obj | None:
        return self.store.get("services", item_key(node, service_id))

    def get_check(self, node: str, check_id: str) -> Obj | None:
        return self.store.get("checks", item_key(node, check_id))

    def service_names(self) -> dict[str, list[str]]:
        """Every service name with the union of its instances' tags (sorted)."""
        table = self.store.table("services")
        out: dict[str, list[str]] = {}
        for name in sorted(self._svc_by_name):
            tags: set[str] = set()
            for k in self._svc_by_name[name]:
                tags.update(table[k]["Tags"])
            out[name] = sorted(tags)
        return out

    def instances(self, name: str, tags: Iterable[str] = (), *, connect: bool = False) -> list[Obj]:
        """Instances of service `name` having every tag in `tags`, by (node, ID).

        `connect` lists its Connect-capable instances instead: its proxies and its
        Connect-native instances.
        """
        table = self.store.table("services")
        want = set(tags)
        by_name = self._connect if connect else self._svc_by_name
        out = [table[k] for k in sorted(by_name.get(name, ()))]
        if want:
            out = [s for s in out if want.issubset(s["Tags"])]
        return out

    def instance_checks(self, node: str, service_id: str) -> list[Obj]:
        """The checks that decide an instance's health: its node's and its own."""
        table = self.store.table("checks")
        node_level = [table[k] for k in sorted(self._node_level.get(node, ()))]
        own = [table[k] for k in sorted(self._chk_by_svc.get(item_key(node, service_id), ()))]
        return node_level + own

    def service_checks(self, name: str) -> list[Obj]:
        """Checks attached to instances of service `name` (not node checks)."""
        table = self.store.table("checks")
        out: list[Obj] = []
        for skey in sorted(self._svc_by_name.get(name, ())):
            out.extend(table[k] for k in sorted(self._chk_by_svc.get(skey, ())))
        return out

    def checks_in_state(self, state: str) -> list[Obj]:
        """Checks in `state`, or all of them for "any", by (node, CheckID)."""
        table = self.store.table("checks")
        return [table[k] for k in sorted(table) if state == "any" or table[k]["Status"] == state]

    def health(
        self, name: str, tags: Iterable[str] = (), passing: bool = False, connect: bool = False
    ) -> list[Obj]:
        """`/v1/health/service/<name>`: each instance with its node and its checks.

        `passing` drops an instance when any of its checks, node checks included, is not
        passing (a warning drops it too, as in Consul). `connect` answers for the
        service's Connect proxies instead (`/v1/health/connect/<name>`).
        """
        out: list[Obj] = []
        for svc in self.instances(name, tags, connect=connect):
            checks = self.instance_checks(svc["Node"], svc["ID"])
            if passing and any(c["Status"] != PASSING for c in checks):
                continue
            node = self.get_node(svc["Node"])
            out.append({"Node": node, "Service": service_view(svc), "Checks": checks})
        return out


def _discard(index: dict[str, set[str]], name: str, key: str) -> None:
    keys = index.get(name)
    if keys is not None:
        keys.discard(key)
        if not keys:
            del index[name]


def service_view(svc: Obj) -> Obj:
    """A service as the health and agent endpoints show it (without its node name)."""
    out: dict[str, Any] = {k: v for k, v in svc.items() if k != "Node"}
    return out
