"""One conformance suite for every router (outbound, inbound, policy), trio-style.

A router reads a request head and the peer and returns a `RouteResult`; it changes
nothing outside itself (no connection, no exchange, no balancer counts: the exchange
calls `on_start`). Each case below runs against each router, built over the same
service `svc` with one endpoint, without sockets (no connection is opened by routing).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

from proxy import local_reply
from proxy.balance import Endpoint
from proxy.cluster import Cluster, StaticDirectory
from proxy.dispatch import InboundRouter, OutboundRouter
from proxy.policy import Policy
from proxy.policy_router import PolicyRouter
from proxy.route_result import Peer, RouteResult
from proxy.stats import ProxyStats
from tests.fakes import parse_request


@dataclass
class Kind:
    name: str
    make: Callable[[], Any]
    balanced: bool  # picks an endpoint (the outbound routers); inbound: the app's pool
    tunnels: bool  # accepts CONNECT to egress


def _cluster() -> tuple[StaticDirectory, Endpoint]:
    ep = Endpoint("svc-1", "127.0.0.1", 20001)
    cluster = Cluster("svc", "default")
    cluster.set_endpoints([ep])
    return StaticDirectory([cluster]), ep


def _outbound() -> Any:
    directory, _ = _cluster()
    return OutboundRouter(directory, ProxyStats())


def _policy() -> Any:
    directory, _ = _cluster()
    return PolicyRouter(directory, ProxyStats(), Policy(directory))


def _inbound() -> Any:
    return InboundRouter(20001, ProxyStats())


KINDS = [
    Kind("outbound", _outbound, balanced=True, tunnels=True),
    Kind("policy", _policy, balanced=True, tunnels=True),
    Kind("inbound", _inbound, balanced=False, tunnels=False),
]


@pytest.fixture(params=KINDS, ids=[k.name for k in KINDS])
def kind(request: pytest.FixtureRequest) -> Kind:
    k: Kind = request.param
    return k


def one_of(result: RouteResult) -> str:
    """Which kind of answer a result is; exactly one must be set."""
    set_ = [
        name
        for name in ("reply", "pool", "tunnel", "pending", "serve")
        if getattr(result, name) is not None
    ]
    assert len(set_) == 1, (result, set_)
    return set_[0]


PEER = Peer(b"10.0.0.9")


def test_an_origin_form_request_gets_a_pool(kind: Kind) -> None:
    router = kind.make()
    result = router.route(parse_request(b"GET /x HTTP/1.1\r\nHost: svc\r\n\r\n"), PEER)
    assert one_of(result) == "pool"
    assert result.path is None and result.dstats is not None
    if kind.balanced:
        assert result.endpoint is not None and result.tracker is not None
        assert result.endpoint.active == 0  # the router picks; the exchange starts it
    assert result.pool in router.pools()


def test_the_same_request_again_goes_to_the_same_pool(kind: Kind) -> None:
    router = kind.make()
    data = b"GET /x HTTP/1.1\r\nHost: svc\r\n\r\n"
    first = router.route(parse_request(data), PEER)
    second = router.route(parse_request(data), PEER)
    assert first.pool is second.pool


def test_an_absolute_form_request_is_rewritten_to_origin_form(kind: Kind) -> None:
    router = kind.make()
    head = parse_request(b"GET http://svc/a?b=1 HTTP/1.1\r\nHost: other\r\n\r\n")
    result = router.route(head, PEER)
    assert one_of(result) == "pool"
    assert result.path == b"/a?b=1"
    assert head.host == b"svc"  # RFC 9112 3.2.2: the URI's authority replaces Host


@pytest.mark.parametrize("host", [b"svc@evil", b"svc/x"])
def test_a_host_that_is_not_an_authority_is_a_local_400(kind: Kind, host: bytes) -> None:
    router = kind.make()
    result = router.route(parse_request(b"GET /x HTTP/1.1\r\nHost: " + host + b"\r\n\r\n"), PEER)
    assert one_of(result) == "reply"
    assert result.reply is not None and result.reply.reason == local_reply.BAD_REQUEST


def test_connect_is_a_tunnel_or_a_local_reply_never_a_pool(kind: Kind) -> None:
    router = kind.make()
    head = parse_request(b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n")
    result = router.connect(head, PEER)
    if kind.tunnels:
        assert one_of(result) == "tunnel" and result.tunnel == ("example.com", 443)
    else:
        assert one_of(result) == "reply"
        assert result.reply is not None and result.reply.close


def test_connect_to_a_mesh_name_is_served_here_or_refused(kind: Kind) -> None:
    # Outbound: what follows the CONNECT is served and routed per request (a gRPC
    # client honouring http_proxy); never a blind tunnel. Inbound: refused.
    router = kind.make()
    head = parse_request(b"CONNECT svc:443 HTTP/1.1\r\nHost: svc:443\r\n\r\n")
    result = router.connect(head, PEER)
    if kind.tunnels:
        assert one_of(result) == "serve" and result.serve == b"svc:443"
    else:
        assert one_of(result) == "reply"
        assert result.reply is not None and result.reply.reason == local_reply.BAD_REQUEST


def test_routing_changes_nothing_of_the_peer_but_its_routing_state(kind: Kind) -> None:
    router = kind.make()
    peer = Peer(b"10.0.0.7")
    router.route(parse_request(b"GET /x HTTP/1.1\r\nHost: svc\r\n\r\n"), peer)
    assert (peer.address, peer.identity) == (b"10.0.0.7", None)
    assert peer.xff_line == b"X-Forwarded-For: 10.0.0.7\r\n"


def test_a_router_has_a_name_and_closes_its_pools(kind: Kind) -> None:
    router = kind.make()
    result = router.route(parse_request(b"GET /x HTTP/1.1\r\nHost: svc\r\n\r\n"), PEER)
    assert router.name in ("outbound", "inbound")
    router.close()
    assert result.pool is not None and result.pool.closed


def test_the_sweep_forgets_unused_endpoint_pools_and_their_results(kind: Kind) -> None:
    router = kind.make()
    data = b"GET /x HTTP/1.1\r\nHost: svc\r\n\r\n"
    first = router.route(parse_request(data), PEER)
    router.sweep(0.0)  # no connection was ever opened
    second = router.route(parse_request(data), PEER)
    if kind.balanced:
        assert second.pool is not first.pool and first.pool not in router.pools()
    else:
        assert second.pool is first.pool  # the app's one pool is kept
