"""The push protocol: codec (sans-IO), routing, the sidecar's apply, and the push server
against a real registry KV with real WebSocket clients."""

from __future__ import annotations

import asyncio
import base64
import json
import random
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from controlplane.push import PUSH_SERVER, PushServer, ResourceIndex, SidecarRecord
from controlplane.server import ControlPlane, ControlPlaneSpec, RegistryAddress
from controlplane.store import RESOURCES, VERSION_KEY
from proxy.balance import Endpoint
from proxy.cluster import Cluster, StaticDirectory
from proxy.errors import PolicyError
from proxy.policy import Policy, compile_table, decode
from proxy.policy_client import PolicyClient, push_url
from proxy.routing import HeaderEdit, Split
from registry.server import RegistryServer
from tests.conftest import free_port, serve_app
from tests.polling import until
from wire import push as protocol

API = "tether.dev/v1alpha1"


def doc(kind: str, name: str, spec: dict[str, Any], namespace: str = "default") -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name}
    if kind != "MeshConfig":
        meta["namespace"] = namespace
    return {"apiVersion": API, "kind": kind, "metadata": meta, "spec": spec}


def split(service: str, v1: int, v2: int, **extra: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "subsets": [
            {"name": "v1", "selector": {"version": "v1"}, "weight": v1},
            {"name": "v2", "selector": {"version": "v2"}, "weight": v2},
        ]
    }
    spec.update(extra)
    return doc("TrafficSplit", service, spec)


HEADER_ROUTE = doc(
    "Route",
    "orders",
    {
        "rules": [
            {
                "match": {"headers": [{"name": "x-canary", "exact": "true"}]},
                "destination": {"subset": "v2"},
                "responseHeaders": {"set": {"x-tether-subset": "v2"}},
            },
            {
                "match": {"path": {"prefix": "/admin"}, "method": "POST"},
                "destination": {"service": "admin"},
                "requestHeaders": {"add": {"x-routed": "admin"}, "remove": ["x-drop"]},
            },
            {
                "match": {"queryParams": [{"name": "beta", "present": True}]},
                "destination": {"subset": "v2"},
            },
        ]
    },
)


# -- codec ---------------------------------------------------------------------------------


def test_codec_round_trips_every_message() -> None:
    node = protocol.NodeIdentity("orders", "shop", "orders-1", "z1")
    msgs: list[protocol.Message] = [
        protocol.Hello(node, ("inventory.shop", "pay.billing"), 7, "abc"),
        protocol.Interest(("x.default",)),
        protocol.Snapshot(
            9, protocol.content_hash(protocol.canonical_json([{"a": 1}])), "n1", ({"a": 1},)
        ),
        protocol.Ack(9, "n1"),
        protocol.Nack(9, "n1", "bad regex"),
        protocol.ErrorMessage("unsupported_protocol", "speak v1"),
    ]
    for msg in msgs:
        text = protocol.encode(msg)
        assert json.loads(text)["proto"] == protocol.PROTOCOL
        assert protocol.decode(text) == msg
        assert protocol.decode(text.encode()) == msg


def test_snapshot_splice_is_valid_json_and_hash_is_canonical() -> None:
    resources = [{"b": 2, "a": [1, {"z": None}]}, {"kind": "Route"}]
    text = protocol.canonical_json(resources)
    frame = protocol.encode_snapshot(3, protocol.content_hash(text), 'n"1', text)
    snap = protocol.decode(frame)
    assert isinstance(snap, protocol.Snapshot)
    assert snap.nonce == 'n"1'
    # The receiver recomputes the same hash from what it parsed.
    assert protocol.content_hash(protocol.canonical_json(snap.resources)) == snap.hash


def test_other_protocol_versions_are_refused_not_misread() -> None:
    future = json.dumps({"proto": 2, "type": "snapshot", "version": 1, "resources": "new"})
    with pytest.raises(protocol.ProtocolVersionError, match="protocol 2"):
        protocol.decode(future)
    with pytest.raises(protocol.ProtocolVersionError, match="without a protocol version"):
        protocol.decode(json.dumps({"type": "ack", "version": 1, "nonce": "x"}))


@pytest.mark.parametrize(
    "frame, message",
    [
        ("{", "not JSON"),
        ("[1]", "JSON object"),
        ('{"proto":1,"type":"ack","nonce":"x"}', "missing field 'version'"),
        ('{"proto":1,"type":"ack","version":true,"nonce":"x"}', "wrong type"),
        ('{"proto":1,"type":"hello","node":{"service":""}}', "empty"),
        ('{"proto":1,"type":"interest","add":["nodot"]}', "service.namespace"),
        (
            '{"proto":1,"type":"snapshot","version":1,"hash":"h","nonce":"n","resources":[1]}',
            "objects",
        ),
        ('{"proto":1,"type":"launch"}', "unknown message type"),
    ],
)
def test_bad_frames_raise_clear_errors(frame: str, message: str) -> None:
    with pytest.raises(protocol.PushProtocolError, match=message):
        protocol.decode(frame)


def test_push_url_forms() -> None:
    assert push_url("http://127.0.0.1:15010") == "ws://127.0.0.1:15010/api/v1/push"
    assert push_url("https://cp:1/") == "wss://cp:1/api/v1/push"
    assert push_url("127.0.0.1:9") == "ws://127.0.0.1:9/api/v1/push"
    assert push_url("ws://h:1/custom") == "ws://h:1/custom"


# -- what each sidecar needs ---------------------------------------------------------------


def test_resource_index_needs_follow_routes_and_diff_per_service() -> None:
    docs = [
        HEADER_ROUTE,
        split("orders", 90, 10),
        doc("ServiceDefaults", "admin", {"protocol": "http"}),
        doc("ServiceDefaults", "orders", {"protocol": "http"}, namespace="other"),
        doc("MeshConfig", "mesh", {"requestTimeout": "10s"}),
    ]
    idx = ResourceIndex(docs, 5)
    needed = idx.needed({("default", "orders")})
    assert needed == {("default", "orders"), ("default", "admin")}
    text, hash_ = idx.body(needed)
    kinds = [(d["kind"], d["metadata"].get("namespace")) for d in json.loads(text)]
    # Namespace `other` never leaks into a `default` sidecar's snapshot; MeshConfig always in.
    assert ("ServiceDefaults", "other") not in kinds
    assert ("MeshConfig", None) in kinds
    assert idx.body(needed) == (text, hash_)
    new = ResourceIndex([*docs[:1], split("orders", 50, 50), *docs[2:]], 6)
    changed, mesh = new.changes(idx)
    assert changed == {("default", "orders")} and not mesh
    assert new.body(needed)[1] != hash_
    assert (
        new.body(frozenset({("default", "admin")}))[1]
        == idx.body(frozenset({("default", "admin")}))[1]
    )


def test_sidecar_record_exchange_without_io() -> None:
    rec = SidecarRecord("default/a/1", "a", "default", "1", "", "r1")
    assert rec.state == "pending"
    assert rec.offer(5, "h5", "n1") and not rec.offer(6, "h5", "n2")  # same content: no push
    assert rec.sent_nonce == "n1" and rec.sent_version == 5
    assert not rec.answer(protocol.Ack(5, "old"))  # a superseded push's answer is ignored
    assert rec.state == "pending"
    assert rec.answer(protocol.Ack(5, "n1")) and rec.state == "acked" and rec.acked_version == 5
    assert rec.offer(7, "h7", "n3")
    assert rec.state == "pending"
    assert rec.answer(protocol.Nack(7, "n3", "bad regex"))
    assert (rec.state, rec.error, rec.acked_version, rec.nacked_version) == (
        "nacked",
        "bad regex",
        5,
        7,
    )
    # The same version with other content (the sidecar's interest grew), then applied.
    assert rec.offer(7, "h7b", "n4") and rec.answer(protocol.Ack(7, "n4"))
    assert rec.state == "acked" and rec.error == "" and rec.acked_hash == "h7b"
    rec.connected = False
    assert rec.state == "disconnected"
    assert SidecarRecord.from_dict(rec.to_dict()) == rec


# -- routing -------------------------------------------------------------------------------


def compiled(*docs_: dict[str, Any]) -> Any:
    table, _ = compile_table(decode(docs_), 1, "h")
    return table


def test_route_rules_match_first_wins_with_header_edits() -> None:
    table = compiled(HEADER_ROUTE, split("orders", 100, 0))
    pol = table.policy("default", "orders")
    assert pol is not None and table.policy("default", "inventory") is None
    rng = random.Random(1)
    d = table.decide(pol, "GET", "/x", {"x-canary": "true"}, rng)
    assert (d.service, d.subset) == ("orders", "v2")
    assert d.response_headers.set == (("x-tether-subset", "v2"),)
    d = table.decide(pol, "POST", "/admin/users?z=1", {}, rng)
    assert (d.service, d.subset) == ("admin", None)
    headers = [(b"Host", b"orders"), (b"X-Drop", b"1")]
    d.request_headers.apply(headers)
    assert headers == [(b"Host", b"orders"), (b"x-routed", b"admin")]
    # A GET to /admin does not match the POST rule; the split sends it to v1 (100%).
    assert table.decide(pol, "GET", "/admin", {}, rng).subset == "v1"
    assert table.decide(pol, "GET", "/p?beta", {}, rng).subset == "v2"
    assert table.decide(pol, "GET", "/p?alpha=1", {"x-canary": "false"}, rng).subset == "v1"


def test_split_90_10_is_within_bounds_with_a_fixed_seed() -> None:
    table = compiled(split("orders", 90, 10))
    pol = table.policy("default", "orders")
    assert pol is not None
    rng = random.Random(42)
    n = 10_000
    counts = Counter(table.decide(pol, "GET", "/", {}, rng).subset for _ in range(n))
    # Binomial(10000, 0.1): sd = 30; 5 sd either side.
    assert 850 <= counts["v2"] <= 1150, counts
    assert counts["v1"] + counts["v2"] == n


def test_sticky_header_and_cookie() -> None:
    table = compiled(split("orders", 50, 50, sticky={"header": "X-User"}))
    pol = table.policy("default", "orders")
    assert pol is not None
    rng = random.Random(3)
    for user in ("alice", "bob", "carol"):
        first = table.decide(pol, "GET", "/", {"x-user": user}, rng).subset
        assert all(
            table.decide(pol, "GET", "/", {"x-user": user}, rng).subset == first for _ in range(50)
        )
    users = {table.decide(pol, "GET", "/", {"x-user": f"u{i}"}, rng).subset for i in range(50)}
    assert users == {"v1", "v2"}
    sp = Split((("v1", 50), ("v2", 50)), sticky_cookie="canary", cookie_ttl=60)
    subset, cookie = sp.choose({}, rng)
    assert cookie == f"canary={subset}; Path=/; HttpOnly; Max-Age=60"
    assert sp.choose({"cookie": "a=b; canary=v2"}, rng) == ("v2", "")


def test_header_edit_order_and_only_read_headers_decoded() -> None:
    edit = HeaderEdit(add=(("x-a", "2"),), set=(("x-b", "new"),), remove=("x-c",))
    headers = [(b"X-A", b"1"), (b"x-b", b"old"), (b"X-C", b"gone")]
    edit.apply(headers)
    assert headers == [(b"X-A", b"1"), (b"x-b", b"new"), (b"x-a", b"2")]
    table = compiled(HEADER_ROUTE, split("orders", 50, 50, sticky={"cookie": "pin"}))
    pol = table.policy("default", "orders")
    assert pol is not None and pol.header_names == {b"x-canary", b"cookie"}
    raw = [(b"Cookie", b"a=1"), (b"X-Canary", b"true"), (b"cookie", b"pin=v2"), (b"X-Y", b"z")]
    assert pol.read_headers(raw) == {"cookie": "a=1; pin=v2", "x-canary": "true"}


# -- the sidecar's apply -------------------------------------------------------------------


def orders_cluster() -> Cluster:
    c = Cluster("orders", "default")
    c.set_endpoints(
        [
            Endpoint("o1", "127.0.0.1", 1001, meta={"version": "v1"}),
            Endpoint("o2", "127.0.0.1", 1002, meta={"version": "v2"}),
            Endpoint("o3", "127.0.0.1", 1003, meta={"version": "v1"}),
        ]
    )
    return c


def snapshot(version: int, docs_: list[dict[str, Any]]) -> protocol.Snapshot:
    text = protocol.canonical_json(docs_)
    return protocol.Snapshot(version, protocol.content_hash(text), f"n{version}", tuple(docs_))


async def test_apply_makes_subsets_before_routes_and_keeps_old_on_error() -> None:
    orders = orders_cluster()
    interest: list[tuple[str, str]] = []
    policy = Policy(StaticDirectory([orders]), interest=lambda s, n: interest.append((s, n)))
    assert policy.route("default", "orders") is None
    assert interest == [("orders", "default")]
    await policy.apply(snapshot(3, [split("orders", 90, 10), HEADER_ROUTE]))
    assert policy.version == 3 and policy.route("default", "orders") is not None
    assert repr(policy) == f"<Policy v3 {policy.hash} services=1>"
    v2 = policy.subset_cluster("default", "orders", "v2")
    assert v2 is not None and [ep.id for ep in v2.endpoints] == ["o2"]
    # Membership changes reach the subset cluster.
    orders.set_endpoints(
        [*orders.endpoints, Endpoint("o4", "127.0.0.1", 1004, meta={"version": "v2"})]
    )
    v2 = policy.subset_cluster("default", "orders", "v2")
    assert v2 is not None and [ep.id for ep in v2.endpoints] == ["o2", "o4"]
    bad_regex = doc("Route", "orders", {"rules": [{"match": {"path": {"regex": "(unclosed"}}}]})
    with pytest.raises(PolicyError, match=r"spec.rules\[0\].match.path.regex"):
        await policy.apply(snapshot(4, [bad_regex]))
    with pytest.raises(PolicyError, match="unknown field"):
        await policy.apply(snapshot(5, [doc("Route", "orders", {"rules": [], "extra": 1})]))
    with pytest.raises(PolicyError, match="not defined by a TrafficSplit"):
        await policy.apply(snapshot(6, [HEADER_ROUTE]))
    assert policy.version == 3 and policy.subset_cluster("default", "orders", "v2") is not None
    # Removing the split removes its subsets (after the new table is live).
    await policy.apply(snapshot(7, []))
    assert policy.route("default", "orders") is None
    assert policy.subset_cluster("default", "orders", "v2") is None
    assert policy.describe()["version"] == 7


# -- the push server, over a real registry KV ----------------------------------------------


class Sidecar:
    """A real PolicyClient with a real Policy over a static directory."""

    def __init__(self, base: str, service: str, instance: str, calls: tuple[str, ...] = ()):
        self.policy = Policy(StaticDirectory([orders_cluster()]))
        node = protocol.NodeIdentity(service, "default", instance, "z1")
        self.client = PolicyClient(base, node, self.policy, rng=random.Random(instance))
        self.policy.interest = self.client.want
        for c in calls:
            self.client.want(*protocol.split_service_key(c))
        self.client.start()

    async def wait(self, pred: Callable[[Sidecar], bool], timeout: float = 10.0) -> None:
        await until(lambda: pred(self), timeout, f"{self.client!r} {self.client.describe()}")


@pytest.fixture
async def push_server(registry: RegistryServer) -> AsyncIterator[tuple[PushServer, str]]:
    """A real ControlPlane (its KV watch, its app) with the push server installed."""
    spec = ControlPlaneSpec(port=0, registry=RegistryAddress(port=registry.port))
    cp = ControlPlane(spec)
    server = cp.app[PUSH_SERVER]
    server.flush_interval = 0.05
    await cp.start()
    try:
        yield server, cp.url
    finally:
        await cp.aclose()


async def put(consul: Any, d: dict[str, Any]) -> None:
    """Write a resource and the next config version in one transaction, as the store does
    (the version pushed to sidecars is that counter)."""
    meta = d["metadata"]
    key = f"{RESOURCES}{d['kind']}/{meta.get('namespace') or '_'}/{meta['name']}"
    _, entry = await consul.kv.get(VERSION_KEY)
    version = int(entry["Value"]) + 1 if entry else 1
    ops = [
        {"KV": {"Verb": "set", "Key": k, "Value": base64.b64encode(v.encode()).decode()}}
        for k, v in ((key, json.dumps(d)), (VERSION_KEY, str(version)))
    ]
    await consul.txn.put(ops)


async def test_push_ack_nack_interest_and_only_concerned(
    consul_client: Any, push_server: tuple[PushServer, str]
) -> None:
    _, base = push_server
    await put(consul_client, split("orders", 90, 10))
    caller = Sidecar(base, "frontend", "f1", calls=("orders.default",))
    bystander = Sidecar(base, "inventory", "i1")
    await caller.wait(lambda s: s.policy.route("default", "orders") is not None)
    await bystander.wait(lambda s: s.client.acks == 1)
    v_bystander = bystander.policy.version
    # A change to orders goes to its caller only.
    await put(consul_client, split("orders", 50, 50))
    await caller.wait(lambda s: s.client.acks == 2)
    sp = caller.policy.table.policy("default", "orders")
    assert sp is not None and sp.split is not None and sp.split.shares[1] == ("v2", 50)
    await asyncio.sleep(0.2)
    assert bystander.client.acks == 1 and bystander.policy.version == v_bystander
    # A sidecar that starts calling orders says so and gets its policy.
    assert bystander.policy.route("default", "orders") is None
    await bystander.wait(lambda s: s.policy.route("default", "orders") is not None)
    # A document the sidecar cannot apply: NACK, old config kept, visible in the status.
    bad = doc("Route", "orders", {"rules": [{"match": {"path": {"regex": "(x"}}}]})
    await put(consul_client, bad)
    await caller.wait(lambda s: s.client.nacks == 1)
    assert caller.policy.table.policy("default", "orders") is sp
    async with aiohttp.ClientSession() as http:
        deadline = time.monotonic() + 10
        while True:
            async with http.get(f"{base}/api/v1/sidecars") as resp:
                body = await resp.json()
            states = {r["id"]: r for r in body["sidecars"]}
            rec = states.get("default/frontend/f1")
            if rec and rec["state"] == "nacked":
                break
            assert time.monotonic() < deadline, body
            await asyncio.sleep(0.05)
    assert "regex" in rec["error"] and rec["acked_version"] < rec["nacked_version"]
    # And it reached the KV, for the other replicas.
    _, items = await consul_client.kv.get("tether/push/sidecars/", recurse=True)
    assert any(b"nacked" in (i["Value"] or b"") for i in items)
    await caller.client.aclose()
    await bystander.client.aclose()


async def test_reconnect_when_current_sends_nothing(
    consul_client: Any, push_server: tuple[PushServer, str]
) -> None:
    server, base = push_server
    await put(consul_client, split("orders", 90, 10))
    sc = Sidecar(base, "frontend", "f1", calls=("orders.default",))
    await sc.wait(lambda s: s.client.acks == 1)
    pushes = server.pushes
    # Drop the connection from the server side; the client reconnects with its version.
    session = server.sessions["default/frontend/f1"]
    await session.ws.close()
    await sc.wait(lambda s: s.client.connects == 2 and "default/frontend/f1" in server.sessions)
    await asyncio.sleep(0.2)
    assert server.pushes == pushes and sc.client.acks == 1
    rec = server.sessions["default/frontend/f1"].record
    assert rec.state == "acked" and rec.acked_hash == sc.policy.hash
    assert repr(server) == f"<PushServer {server.replica} v{server.index.version} sidecars=1>"
    assert repr(sc.client) == f"<PolicyClient default/frontend/f1 connected v{sc.policy.version}>"
    await sc.client.aclose()


async def test_mismatched_protocol_version_is_refused_clearly(
    push_server: tuple[PushServer, str],
) -> None:
    _, base = push_server
    async with aiohttp.ClientSession() as http:
        async with http.ws_connect(push_url(base)) as ws:
            await ws.send_str(json.dumps({"proto": 2, "type": "hello", "node": {}}))
            msg = await ws.receive(timeout=5)
            err = protocol.decode(msg.data)
            assert isinstance(err, protocol.ErrorMessage)
            assert err.code == "unsupported_protocol" and "protocol 2" in err.message
            msg = await ws.receive(timeout=5)
            assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)


# -- the outbound path with policy (a real listener, real backends) -------------------------


class Backend:
    """An app that says who it is and what headers it got."""

    def __init__(self, name: str, runner: web.AppRunner, port: int) -> None:
        self.name, self.runner, self.port = name, runner, port

    @classmethod
    async def start(cls, name: str) -> Backend:
        async def who(request: web.Request) -> web.Response:
            if request.path == "/slow":
                await asyncio.sleep(5)
            headers = {k.lower(): v for k, v in request.headers.items()}
            return web.json_response({"name": name, "headers": headers})

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", who)
        runner, port = await serve_app(app, shutdown_timeout=0.1)
        return cls(name, runner, port)


async def test_policy_router_splits_and_routes_real_requests() -> None:
    import proxy.downstream
    from proxy.policy_router import start_policy_outbound

    v1, v2, admin = (
        await Backend.start("v1"),
        await Backend.start("v2"),
        await Backend.start("admin"),
    )
    orders = Cluster("orders", "default")
    orders.set_endpoints(
        [
            Endpoint("o1", "127.0.0.1", v1.port, meta={"version": "v1"}),
            Endpoint("o2", "127.0.0.1", v2.port, meta={"version": "v2"}),
        ]
    )
    admin_cluster = Cluster("admin", "default")
    admin_cluster.set_endpoints([Endpoint("a1", "127.0.0.1", admin.port)])
    plain = Cluster("inventory", "default")
    plain.set_endpoints([Endpoint("i1", "127.0.0.1", v1.port)])
    directory = StaticDirectory([orders, admin_cluster, plain])
    policy = Policy(directory)
    await policy.apply(snapshot(1, [split("orders", 90, 10), HEADER_ROUTE]))
    listener = await start_policy_outbound(directory, policy, port=0)
    proxy.downstream.RNG.seed(1234)
    try:
        async with aiohttp.ClientSession() as http:
            proxy_url = f"http://127.0.0.1:{listener.port}"

            async def who(url: str, **kw: Any) -> dict[str, Any]:
                async with http.get(url, proxy=proxy_url, **kw) as resp:
                    assert resp.status == 200, await resp.text()
                    return dict(await resp.json())

            names = Counter([(await who("http://orders/who"))["name"] for _ in range(400)])
            # Binomial(400, 0.1): mean 40, sd 6; the seed makes it exact, bounds are 4 sd.
            assert 16 <= names["v2"] <= 64 and names["v1"] + names["v2"] == 400, names
            canary = {"x-canary": "true"}
            for _ in range(20):
                assert (await who("http://orders/who", headers=canary))["name"] == "v2"
            # The rule's response header edit is made on the way back.
            async with http.get("http://orders/who", proxy=proxy_url, headers=canary) as resp:
                assert resp.headers["x-tether-subset"] == "v2"
            async with http.get("http://orders/who", proxy=proxy_url) as resp:
                assert "x-tether-subset" not in resp.headers
            async with http.post(
                "http://orders/admin/x", proxy=proxy_url, headers={"x-drop": "1"}
            ) as resp:
                body = await resp.json()
            assert body["name"] == "admin" and body["headers"]["x-routed"] == "admin"
            assert "x-drop" not in body["headers"]
            got = await who("http://orders/who?beta=1")
            assert got["name"] == "v2"
            # Sticky by cookie: the first answer pins the client to a subset.
            await policy.apply(
                snapshot(2, [split("orders", 50, 50, sticky={"cookie": "orders-subset"})])
            )
            async with http.get("http://orders/who", proxy=proxy_url) as resp:
                pinned = resp.cookies["orders-subset"].value
                first = (await resp.json())["name"]
            assert pinned == first
            for _ in range(20):
                got = await who("http://orders/who", headers={"cookie": f"orders-subset={pinned}"})
                assert got["name"] == pinned
            # A service without policy goes where it always went.
            assert (await who("http://inventory/who"))["name"] == "v1"
    finally:
        await listener.aclose()
        for b in (v1, v2, admin):
            await b.runner.cleanup()


async def test_two_replicas_push_their_own_sidecars_and_share_status(
    registry: RegistryServer, consul_client: Any
) -> None:
    cps = []
    for name in ("r1", "r2"):
        cp = ControlPlane(ControlPlaneSpec(port=0, registry=RegistryAddress(port=registry.port)))
        cp.app[PUSH_SERVER].replica = name
        cp.app[PUSH_SERVER].flush_interval = 0.05
        await cp.start()
        cps.append(cp)
    a = Sidecar(cps[0].url, "frontend", "a", calls=("orders.default",))
    b = Sidecar(cps[1].url, "checkout", "b", calls=("orders.default",))
    try:
        await a.wait(lambda s: s.client.acks == 1)
        await b.wait(lambda s: s.client.acks == 1)
        # One change, written behind both replicas' backs: each pushes to its own sidecar.
        await put(consul_client, split("orders", 80, 20))
        for sc in (a, b):
            await sc.wait(lambda s: s.policy.route("default", "orders") is not None)
        assert a.policy.hash == b.policy.hash and a.policy.version == b.policy.version
        # Either replica's `tether status` shows both sidecars, acked at that version.
        async with aiohttp.ClientSession() as http:
            for cp in cps:

                async def both(url: str = cp.url) -> dict[str, Any]:
                    async with http.get(f"{url}/api/v1/sidecars") as resp:
                        recs = {r["id"]: r for r in (await resp.json())["sidecars"]}
                    return recs

                deadline = time.monotonic() + 10
                while True:
                    recs = await both()
                    ids = ("default/frontend/a", "default/checkout/b")
                    ok = [recs.get(i, {}).get("acked_version") for i in ids]
                    if ok == [a.policy.version, a.policy.version]:
                        break
                    assert time.monotonic() < deadline, recs
                    await asyncio.sleep(0.05)
                assert {recs[i]["replica"] for i in ids} == {"r1", "r2"}
    finally:
        await a.client.aclose()
        await b.client.aclose()
        for cp in cps:
            await cp.aclose()


async def test_sidecar_starts_on_defaults_and_connects_when_the_control_plane_comes(
    registry: RegistryServer, consul_client: Any
) -> None:
    from proxy.backoff import BackoffPolicy

    await put(consul_client, split("orders", 90, 10))
    port = free_port()
    policy = Policy(StaticDirectory([orders_cluster()]))
    node = protocol.NodeIdentity("frontend", "default", "f1")
    client = PolicyClient(
        f"http://127.0.0.1:{port}", node, policy, backoff=BackoffPolicy(0.05, 2.0, 0.2)
    )
    client.want("orders", "default")
    client.start()
    try:
        await asyncio.sleep(0.5)
        # Never reached: the defaults (every service to itself), and it keeps trying.
        assert not client.connected and client.last_error and policy.version == 0
        assert policy.route("default", "orders") is None
        spec = ControlPlaneSpec(port=port, registry=RegistryAddress(port=registry.port))
        cp = ControlPlane(spec)
        await cp.start()
        try:
            deadline = time.monotonic() + 10
            while policy.route("default", "orders") is None:
                assert time.monotonic() < deadline, client.describe()
                await asyncio.sleep(0.02)
            assert client.acks == 1 and policy.version > 0
        finally:
            await cp.aclose()
        # The control plane gone again: the sidecar keeps what it has.
        await asyncio.sleep(0.3)
        assert policy.route("default", "orders") is not None
    finally:
        await client.aclose()


async def test_subsets_of_a_service_discovered_after_the_snapshot() -> None:
    directory = StaticDirectory()
    policy = Policy(directory)
    await policy.apply(snapshot(1, [split("orders", 90, 10)]))
    assert policy.subset_cluster("default", "orders", "v2") is None
    first = orders_cluster()
    directory.add(first)
    v2 = policy.subset_cluster("default", "orders", "v2")
    assert v2 is not None and [ep.id for ep in v2.endpoints] == ["o2"]
    assert policy.subset_cluster("default", "orders", "v3") is None
    # Discovery replaced the cluster object: the subset follows the new one.
    again = Cluster("orders", "default")
    again.set_endpoints([Endpoint("o9", "127.0.0.1", 9, meta={"version": "v2"})])
    directory.add(again)
    v2 = policy.subset_cluster("default", "orders", "v2")
    assert v2 is not None and [ep.id for ep in v2.endpoints] == ["o9"]


async def test_service_defaults_balancer_applied_and_restored() -> None:
    from proxy.balance import LeastRequest, WeightedRoundRobin

    orders = orders_cluster()
    original = orders.balancer
    policy = Policy(StaticDirectory([orders]))
    lr = doc("ServiceDefaults", "orders", {"loadBalancer": {"policy": "least_request"}})
    await policy.apply(snapshot(1, [lr, split("orders", 50, 50)]))
    assert isinstance(orders.balancer, LeastRequest)
    assert orders.balancer.endpoints == orders.endpoints
    picked = orders.balancer
    v1 = policy.subset_cluster("default", "orders", "v1")
    assert v1 is not None and isinstance(v1.balancer, LeastRequest)
    # The same policy again keeps the balancer (and its state).
    await policy.apply(snapshot(2, [lr, split("orders", 60, 40)]))
    assert orders.balancer is picked
    # Only ServiceDefaults: no routing step for it (the plain path), balancer kept.
    await policy.apply(snapshot(3, [lr]))
    assert policy.route("default", "orders") is None and orders.balancer is picked
    # ServiceDefaults removed: the cluster gets back what discovery gave it.
    await policy.apply(snapshot(4, []))
    assert orders.balancer is original and isinstance(original, WeightedRoundRobin)
    bad = doc("ServiceDefaults", "orders", {"loadBalancer": {"policy": "ring_hash"}})
    with pytest.raises(PolicyError, match="hashPolicies"):
        await policy.apply(snapshot(5, [bad]))
    assert orders.balancer is original and policy.version == 4


def test_status_table() -> None:
    from controlplane import status

    now = 1_000_000.0
    recs = [
        SidecarRecord("default/a/1", "a", "default", "1", "", "r1", acked_version=7,
                      sent_version=7, sent_hash="h", acked_hash="h", last_seen=now).to_dict(),
        SidecarRecord("default/b/2", "b", "default", "2", "", "r2", acked_version=5,
                      sent_version=7, sent_hash="h", nacked_version=7,
                      error="bad\nregex " * 30, last_seen=now - 90).to_dict(),
    ]  # fmt: skip
    lines = status.table(recs, now).splitlines()
    assert lines[0].split() == ["NAMESPACE", "SERVICE", "INSTANCE", "CONFIG", "VERSION", "SYNCED",
                                "STATE", "LAST", "SEEN", "REPLICA", "ERROR"]  # fmt: skip
    assert lines[1].split()[:8] == ["default", "a", "1", "7", "in", "sync", "acked", "now"]
    assert "5 (refused 7)" in lines[2] and "nacked" in lines[2] and "90s ago" in lines[2]
    assert lines[2].endswith("...") and "\n" not in lines[2]
    assert status.summary(recs) == "2 sidecars: 1 acked, 1 nacked"
    # Sent but not acked yet, or gone: stale. Gone longer than the retention: left out.
    pending = SidecarRecord("default/c/3", "c", "default", "3", "", "r1", sent_version=7,
                            sent_hash="h2", acked_hash="h", last_seen=now)  # fmt: skip
    gone = SidecarRecord("default/d/4", "d", "default", "4", "", "r1", connected=False,
                         last_seen=now - 300)  # fmt: skip
    assert [status.synced(r.to_dict()) for r in (pending, gone)] == ["stale", "stale"]
    shown, hidden = status.retained([*recs, pending.to_dict(), gone.to_dict()], now, 120)
    assert [r["instance"] for r in shown] == ["1", "2", "3"] and hidden == 1
    shown, hidden = status.retained([gone.to_dict()], now, 600)
    assert len(shown) == 1 and hidden == 0


async def test_mesh_config_egress_policy_on_the_outbound_path() -> None:
    from proxy.policy_router import egress_allowed, start_policy_outbound

    assert egress_allowed("api.example.com", ("*.example.com",))
    assert not egress_allowed("example.com", ("*.example.com",))
    assert egress_allowed("a.b", ("A.B.",)) and not egress_allowed("a.bc", ("a.b",))
    backend = await Backend.start("outside")
    policy = Policy(StaticDirectory())
    listener = await start_policy_outbound(StaticDirectory(), policy, port=0, egress="deny")
    proxy_url = f"http://127.0.0.1:{listener.port}"

    async def status(host: str) -> tuple[int, str]:
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://{host}:{backend.port}/x", proxy=proxy_url) as resp:
                return resp.status, resp.headers.get("x-tether-error", "")

    try:
        # No MeshConfig yet: the sidecar's --egress deny.
        assert await status("127.0.0.1") == (403, "egress_denied")
        deny = doc("MeshConfig", "mesh", {"egress": {"mode": "deny", "hosts": ["127.0.0.1"]}})
        await policy.apply(snapshot(1, [deny]))
        assert (await status("127.0.0.1"))[0] == 200
        assert await status("127.0.0.2") == (403, "egress_denied")
        allow = doc("MeshConfig", "mesh", {"egress": {"mode": "allow"}})
        await policy.apply(snapshot(2, [allow]))
        assert (await status("127.0.0.2"))[0] != 403  # allowed (nothing listens there)
    finally:
        await listener.aclose()
        await backend.runner.cleanup()


async def test_request_timeouts_of_service_defaults_and_mesh_config() -> None:
    from proxy.policy_router import start_policy_outbound

    backend = await Backend.start("slow")
    orders = Cluster("orders", "default")
    orders.set_endpoints([Endpoint("o1", "127.0.0.1", backend.port)])
    inventory = Cluster("inventory", "default")
    inventory.set_endpoints([Endpoint("i1", "127.0.0.1", backend.port)])
    directory = StaticDirectory([orders, inventory])
    policy = Policy(directory)
    await policy.apply(
        snapshot(
            1,
            [
                doc("ServiceDefaults", "orders", {"requestTimeout": "300ms"}),
                doc("MeshConfig", "mesh", {"requestTimeout": "1s"}),
            ],
        )
    )
    listener = await start_policy_outbound(directory, policy, port=0)
    proxy_url = f"http://127.0.0.1:{listener.port}"
    try:
        async with aiohttp.ClientSession() as http:

            async def timed(service: str) -> tuple[int, str, float]:
                start = time.monotonic()
                async with http.get(f"http://{service}/slow", proxy=proxy_url) as resp:
                    await resp.read()
                    error = resp.headers.get("x-tether-error", "")
                    return resp.status, error, time.monotonic() - start

            # Enforced by the listener's sweep (1 s ticks): within a tick of the timeout.
            status, error, took = await timed("orders")
            assert (status, error) == (504, "request_timeout") and 0.3 <= took < 2.0, took
            status, error, took = await timed("inventory")  # MeshConfig's 1 s
            assert (status, error) == (504, "request_timeout") and 1.0 <= took < 2.8, took
            # A fast answer is untouched.
            async with http.get("http://orders/who", proxy=proxy_url) as resp:
                assert resp.status == 200
    finally:
        await listener.aclose()
        await backend.runner.cleanup()


async def test_connect_timeouts_of_service_defaults_and_mesh_config() -> None:
    """A connect that never completes (a listener whose accept queue is full drops the
    SYN) fails with 503 upstream_connect_timeout after the destination's connect timeout
    (not retried: the only endpoint timed out): ServiceDefaults', else
    MeshConfig's, else the sidecar's own; a changed policy reaches pools made before it."""
    from tests.conftest import black_hole_ports

    with black_hole_ports(2) as (orders_port, inventory_port):
        await _connect_timeouts(orders_port, inventory_port)


async def _connect_timeouts(orders_port: int, inventory_port: int) -> None:
    from proxy.policy_router import start_policy_outbound

    orders = Cluster("orders", "default")
    orders.set_endpoints([Endpoint("o1", "127.0.0.1", orders_port)])
    inventory = Cluster("inventory", "default")
    inventory.set_endpoints([Endpoint("i1", "127.0.0.1", inventory_port)])
    await asyncio.sleep(0.1)
    directory = StaticDirectory([orders, inventory])
    policy = Policy(directory)
    listener = await start_policy_outbound(directory, policy, port=0)
    proxy_url = f"http://127.0.0.1:{listener.port}"
    try:
        async with aiohttp.ClientSession() as http:

            async def timed(service: str) -> tuple[int, str, float, str]:
                start = time.monotonic()
                async with http.get(f"http://{service}/x", proxy=proxy_url) as resp:
                    body = await resp.text()
                    error = resp.headers.get("x-tether-error", "")
                    return resp.status, error, time.monotonic() - start, body

            status, error, took, body = await timed("orders")  # no policy: the sidecar's 2 s
            assert (status, error) == (503, "upstream_connect_timeout"), body
            assert 2.0 <= took < 3.5 and "timed out after 2.0s" in body, (took, body)
            await policy.apply(
                snapshot(
                    1,
                    [
                        doc("ServiceDefaults", "orders", {"connectTimeout": "300ms"}),
                        doc("MeshConfig", "mesh", {"connectTimeout": "800ms"}),
                    ],
                )
            )
            status, error, took, body = await timed("orders")  # the same pool, now 300 ms
            assert (status, error) == (503, "upstream_connect_timeout"), body
            assert 0.3 <= took < 0.8 and "timed out after 0.3s" in body, (took, body)
            status, error, took, body = await timed("inventory")  # MeshConfig's 800 ms
            assert (status, error) == (503, "upstream_connect_timeout"), body
            assert 0.8 <= took < 1.6 and "timed out after 0.8s" in body, (took, body)
    finally:
        await listener.aclose()
