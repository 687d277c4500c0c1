"""The inbound listener's authorization (proxy/authz.py) with real request heads from the
codec: callers by SPIFFE ID or anonymous, L4 decisions kept per connection, L7 per
request (path without the query, headers), the 403 local reply, and the refusal log
(once per caller and reason, rate-limited by an injected clock)."""

from __future__ import annotations

from typing import Any

from proxy import local_reply
from proxy.authz import DenialLog, InboundAuthz
from proxy.dispatch import InboundRouter
from proxy.route_result import Peer, source_of_identity
from proxy.stats import ProxyStats
from tests.fakes import parse_request
from wire import authz as authz_module
from wire.resources import API_VERSION, Resource

TD = "spiffe://11111111-2222-3333-4444-555555555555.consul"
WEB = f"{TD}/ns/default/dc/dc1/svc/web"
BILLING = f"{TD}/ns/default/dc/dc1/svc/billing"
SHOP = f"{TD}/ns/shop/dc/dc1/svc/web"


def res(kind: str, name: str, spec: dict[str, Any], namespace: str = "default") -> Resource:
    meta: dict[str, Any] = {"name": name}
    if kind != "MeshConfig":
        meta["namespace"] = namespace
    return Resource.from_dict(
        {"apiVersion": API_VERSION, "kind": kind, "metadata": meta, "spec": spec}
    )


def head(method: str = "GET", target: str = "/", **headers: str) -> Any:
    lines = "".join(f"{k.replace('_', '-')}: {v}\r\n" for k, v in headers.items())
    return parse_request(f"{method} {target} HTTP/1.1\r\nHost: api\r\n{lines}\r\n".encode())


class Lines:
    def __init__(self) -> None:
        self.lines: list[str] = []
        self.now = 0.0

    def clock(self) -> float:
        return self.now


def make(*resources: Resource, lines: Lines | None = None) -> tuple[InboundAuthz, Any]:
    lines = lines or Lines()
    authz = InboundAuthz(
        "default", "api", DenialLog(clock=lines.clock, emit=lines.lines.append, burst=3, window=10)
    )
    authz.install(authz.compile(resources))
    stats = ProxyStats()
    return authz, stats.destination("inbound", "app")


def test_no_policy_or_trivial_policy_checks_nothing() -> None:
    authz = InboundAuthz("default", "api")
    assert authz.policy is None
    authz.install(authz.compile([]))
    assert authz.policy is None  # nothing to enforce: the router skips the call
    authz.install(
        authz.compile([res("MeshConfig", "mesh", {"authorization": {"defaultAction": "deny"}})])
    )
    assert authz.policy is not None


def test_l4_decision_kept_per_connection_and_redone_for_a_new_policy() -> None:
    deny_web = res("Intention", "api", {"sources": [{"name": "web", "action": "deny"}]})
    authz, dstats = make(deny_web)
    web, billing = Peer(b"10.0.0.1", WEB), Peer(b"10.0.0.2", BILLING)
    refused = authz.check(head(), web, None, dstats)
    assert refused is not None and refused.reply is not None
    assert refused.reply.reason == local_reply.FORBIDDEN_BY_POLICY
    assert local_reply.REPLIES[local_reply.FORBIDDEN_BY_POLICY][0] == 403
    assert web.routing[0] is authz.policy and web.routing[2].allowed is False
    assert authz.check(head(), billing, None, dstats) is None
    # A new policy: the connection's decision is made again.
    allow_web = res("Intention", "api", {"sources": [{"name": "web", "action": "allow"}]})
    deny_all = res("MeshConfig", "mesh", {"authorization": {"defaultAction": "deny"}})
    authz.install(authz.compile([allow_web, deny_all]))
    assert authz.check(head(), web, None, dstats) is None
    assert authz.check(head(), billing, None, dstats) is not None


def test_anonymous_and_unparsable_identities_are_anonymous() -> None:
    authz, dstats = make(
        res("MeshConfig", "mesh", {"authorization": {"defaultAction": "deny"}}),
        res("Intention", "api", {"sources": [{"name": "web", "action": "allow"}]}),
    )
    assert authz.check(head(), Peer(b"1.2.3.4"), None, dstats) is not None
    assert authz.check(head(), Peer(b"1.2.3.4", "spiffe://x/odd"), None, dstats) is not None
    assert authz.check(head(), Peer(b"1.2.3.4", WEB), None, dstats) is None


def test_l7_per_request_path_without_query_and_headers() -> None:
    perms = [
        {"action": "allow", "http": {"path": {"exact": "/orders"}, "methods": ["GET"]}},
        {"action": "allow", "http": {"headers": [{"name": "x-role", "exact": "admin,root"}]}},
    ]
    authz, dstats = make(
        res("MeshConfig", "mesh", {"authorization": {"defaultAction": "deny"}}),
        res("Intention", "api", {"sources": [{"name": "web", "permissions": perms}]}),
    )
    web = Peer(b"10.0.0.1", WEB)
    assert authz.check(head("GET", "/orders?x=1"), web, None, dstats) is None
    assert authz.check(head("POST", "/orders"), web, None, dstats) is not None
    assert authz.check(head("GET", "/orders/1"), web, None, dstats) is not None
    # Absolute-form: the router hands over the origin-form path.
    assert authz.check(head("GET", "http://api/orders"), web, b"/orders?y", dstats) is None
    # Repeated header fields are joined with ',' before matching.
    two = parse_request(b"DELETE /x HTTP/1.1\r\nHost: api\r\nX-Role: admin\r\nx-role: root\r\n\r\n")
    assert authz.check(two, web, None, dstats) is None
    assert authz.check(head("DELETE", "/x", x_role="admin"), web, None, dstats) is not None


def test_router_answers_403_before_the_app() -> None:
    stats = ProxyStats()
    authz = InboundAuthz("default", "api", DenialLog(emit=lambda line: None))
    router = InboundRouter(9, stats, authz=authz)
    assert router.route(head(), Peer(b"1.2.3.4", WEB)).pool is router.pool
    authz.install(
        authz.compile([res("MeshConfig", "mesh", {"authorization": {"defaultAction": "deny"}})])
    )
    got = router.route(head(), Peer(b"1.2.3.4", WEB))
    assert got.reply is not None and got.reply.reason == "forbidden_by_policy"
    # Counted under the app, with the caller's identity as its source (proxy/stats.py).
    assert got.dstats is not None and got.dstats.name == "app"
    assert got.dstats.source == source_of_identity(WEB) != ""
    body = local_reply.render(got.reply.reason, got.reply.message)
    assert body.startswith(b"HTTP/1.1 403 Forbidden\r\n")
    assert b"x-tether-error: forbidden_by_policy" in body.lower()


def test_refusals_logged_once_per_caller_and_reason_with_both_identities() -> None:
    lines = Lines()
    authz, dstats = make(res("MeshConfig", "mesh", {"authorization": {"defaultAction": "deny"}}),
                         lines=lines)  # fmt: skip
    web = Peer(b"10.0.0.1", WEB)
    for _ in range(50):
        authz.check(head(), web, None, dstats)
        authz.check(head(), Peer(b"10.0.0.9", WEB), None, dstats)  # new connections too
    assert len(lines.lines) == 1
    assert WEB in lines.lines[0] and "default/api" in lines.lines[0]
    assert "forbidden_by_policy" in lines.lines[0] and "MeshConfig (deny)" in lines.lines[0]
    authz.check(head(), Peer(b"10.0.0.7"), None, dstats)
    assert "anonymous (10.0.0.7)" in lines.lines[1]
    assert authz.denied == 101


def test_refusal_log_rate_limited_and_counts_what_it_left_out() -> None:
    lines = Lines()
    authz, dstats = make(res("MeshConfig", "mesh", {"authorization": {"defaultAction": "deny"}}),
                         lines=lines)  # fmt: skip
    for i in range(10):  # ten different callers in one window: three lines (the burst)
        authz.check(head(), Peer(b"10.0.0.1", f"{TD}/ns/default/dc/dc1/svc/s{i}"), None, dstats)
    assert len(lines.lines) == 3
    lines.now = 10.0  # the next window
    authz.check(head(), Peer(b"10.0.0.1", f"{TD}/ns/default/dc/dc1/svc/late"), None, dstats)
    assert len(lines.lines) == 4 and "(7 more refusals not logged)" in lines.lines[3]


def test_l7_paths_are_judged_normalized() -> None:
    perms = [
        {"action": "deny", "http": {"path": {"prefix": "/admin"}}},
        {"action": "allow", "http": {"path": {"prefix": "/"}}},
    ]
    authz, dstats = make(
        res("Intention", "api", {"sources": [{"name": "web", "permissions": perms}]})
    )
    web = Peer(b"10.0.0.1", WEB)
    for sneaky in ("/admin", "//admin", "/x/../admin", "/%2e%2e/admin/x", "/./admin"):
        assert authz.check(head("GET", sneaky), web, None, dstats) is not None, sneaky
    assert authz.check(head("GET", "/public/x"), web, None, dstats) is None


def test_headers_read_from_a_cached_heads_raw_lines_equal_the_field_list() -> None:
    """Differential: searching a cached head's raw field lines gives what the
    materialised field list gives, and leaves the head unmaterialised."""
    from proxy.authz import _headers
    from proxy.heads import RequestHead

    raws = [
        b"Host: api\r\nAccept: */*\r\n",
        b"X-Role: admin\r\nAccept:  a \r\nx-role:root\r\nX-ROLE: \t\r\n",
        b"X-Roles: no\r\nY-X-Role: no\r\nx-role: yes\r\n",
        b"",
    ]
    names = frozenset({b"x-role", b"accept", b"absent"})
    for raw in raws:
        cached = RequestHead(raw=raw)
        got = _headers(cached, names)
        assert cached.raw == raw  # not materialised
        listed = RequestHead(raw=raw)
        want = authz_module.read_headers(names, listed.headers)
        assert got == want, raw
