"""HTTP/2 and gRPC streams under a resilience policy and a mirror (proxy/h2_retry.py,
proxy/h2_mirror.py), through two sidecars: real grpcio clients, the policy outbound
listener with an applied snapshot, inbound listeners (app protocol grpc) in front of real
grpcio servers on 127.0.0.1 ephemeral ports. Each server records what reached it (the
`x-tether-attempt` of each call), so the tests check what the applications saw, not
only what the client got. Conditions are polled, never slept on.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest

from proxy.balance import Endpoint
from proxy.cluster import Cluster, StaticDirectory
from proxy.listener import Listener, start_inbound
from proxy.policy import Policy
from proxy.policy_router import PolicyRouter, start_policy_outbound
from proxy.stats import ProxyStats
from tests.polling import until
from wire import push as protocol


def doc(kind: str, name: str, spec: dict[str, Any]) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": "default"}
    return {"apiVersion": "tether.dev/v1alpha1", "kind": kind, "metadata": meta, "spec": spec}


def snapshot(version: int, docs: list[dict[str, Any]]) -> protocol.Snapshot:
    text = protocol.canonical_json(docs)
    return protocol.Snapshot(version, protocol.content_hash(text), f"n{version}", tuple(docs))


@dataclass
class GrpcApp:
    """A grpcio server (generic handlers). `mode`: ok, unavailable (Trailers-Only),
    late-unavailable (headers, then trailers with UNAVAILABLE and no message),
    exhausted, hang (until `release`), stream-then-fail (one message, then UNAVAILABLE)."""

    name: str
    mode: str = "ok"
    attempts: list[str | None] = field(default_factory=list)
    release: threading.Event = field(default_factory=threading.Event)
    called: threading.Event = field(default_factory=threading.Event)
    server: Any = None
    port: int = 0

    def _record(self, ctx: Any) -> None:
        meta = dict(ctx.invocation_metadata())
        self.attempts.append(meta.get("x-tether-attempt"))

    def unary(self, req: bytes, ctx: Any) -> bytes:
        self._record(ctx)
        if self.mode == "unavailable":
            ctx.abort(grpc.StatusCode.UNAVAILABLE, f"{self.name} is down")
        if self.mode == "late-unavailable":
            ctx.send_initial_metadata((("x-from", self.name),))
            ctx.abort(grpc.StatusCode.UNAVAILABLE, f"{self.name} is down")
        if self.mode == "exhausted":
            ctx.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"{self.name} is full")
        if self.mode == "hang":
            self.release.wait(20)
        return self.name.encode() + b":" + req

    def stream(self, req: bytes, ctx: Any) -> Iterator[bytes]:
        self._record(ctx)
        yield self.name.encode()
        if self.mode == "stream-then-fail":
            ctx.abort(grpc.StatusCode.UNAVAILABLE, "gone mid-stream")
        yield b"end"

    def client_stream(self, requests: Iterator[bytes], ctx: Any) -> bytes:
        self._record(ctx)
        self.called.set()
        if self.mode == "unavailable":
            ctx.abort(grpc.StatusCode.UNAVAILABLE, f"{self.name} is down")
        return self.name.encode() + b":" + b"".join(requests)

    def start(self) -> GrpcApp:
        handler = grpc.method_handlers_generic_handler(
            "t.S",
            {
                "U": grpc.unary_unary_rpc_method_handler(self.unary),
                "SS": grpc.unary_stream_rpc_method_handler(self.stream),
                "C": grpc.stream_unary_rpc_method_handler(self.client_stream),
            },
        )
        self.server = grpc.server(futures.ThreadPoolExecutor(8))
        self.server.add_generic_rpc_handlers((handler,))
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()
        return self


@dataclass
class Mesh:
    apps: list[GrpcApp]
    inbounds: list[Listener]
    outbound: Listener
    policy: Policy
    cluster: Cluster

    def channel(self, service: str = "greeter") -> grpc.Channel:
        return grpc.insecure_channel(
            f"127.0.0.1:{self.outbound.port}", options=[("grpc.default_authority", service)]
        )

    def stats(self, service: str = "greeter") -> Any:
        return self.outbound.proxy.stats.destination("outbound", f"{service}.default")


async def _mesh(
    apps: list[GrpcApp],
    defaults: dict[str, Any],
    extra: list[dict[str, Any]] | None = None,
    shadow: GrpcApp | None = None,
) -> Mesh:
    for app in apps:
        app.start()
    every = apps + ([shadow.start()] if shadow is not None else [])
    inbounds = [
        await start_inbound(a.port, stats=ProxyStats(), port=0, app_protocol="grpc") for a in every
    ]
    cluster = Cluster("greeter", "default")
    cluster.set_endpoints(
        [Endpoint(f"g{i}", "127.0.0.1", ib.port) for i, ib in enumerate(inbounds[: len(apps)])]
    )
    clusters = [cluster]
    if shadow is not None:
        sc = Cluster("shadow", "default")
        sc.set_endpoints([Endpoint("s0", "127.0.0.1", inbounds[-1].port)])
        clusters.append(sc)
    directory = StaticDirectory(clusters)
    policy = Policy(directory)
    spec = {"loadBalancer": {"policy": "round_robin"}, **defaults}
    await policy.apply(snapshot(1, [doc("ServiceDefaults", "greeter", spec), *(extra or [])]))
    outbound = await start_policy_outbound(directory, policy, port=0)
    return Mesh(apps + ([shadow] if shadow else []), inbounds, outbound, policy, cluster)


@pytest.fixture
async def closing() -> AsyncIterator[list[Mesh]]:
    meshes: list[Mesh] = []
    yield meshes
    for m in meshes:
        for app in m.apps:
            app.release.set()
        await m.outbound.aclose()
        for ib in m.inbounds:
            await ib.aclose()
        for app in m.apps:
            app.server.stop(0)


def _unary(channel: grpc.Channel, n: int) -> list[tuple[Any, bytes | str]]:
    """n unary calls: (OK, reply) or (code, details) each."""
    call = channel.unary_unary("/t.S/U")
    out: list[tuple[Any, bytes | str]] = []
    for _ in range(n):
        try:
            out.append((grpc.StatusCode.OK, call(b"x", timeout=10)))
        except grpc.RpcError as e:
            out.append((e.code(), e.details() or ""))
    return out


async def test_unavailable_on_one_instance_is_retried_on_another(closing: list[Mesh]) -> None:
    down = GrpcApp("down", mode="unavailable")
    apps = [down, GrpcApp("up1"), GrpcApp("up2")]
    retries = {"attempts": 3, "retryOn": ["unavailable"]}
    mesh = await _mesh(apps, {"retries": retries})
    closing.append(mesh)
    channel = mesh.channel()
    out = await asyncio.to_thread(_unary, channel, 12)
    channel.close()
    # Every call succeeded, on a healthy instance (one client connection throughout).
    assert all(code == grpc.StatusCode.OK for code, _ in out), out
    assert {r.split(b":")[0] for _, r in out if isinstance(r, bytes)} == {b"up1", b"up2"}
    # `down` was reached as a first attempt; each call it failed went again elsewhere,
    # as attempt 2, and no call reached `down` twice.
    assert down.attempts and set(down.attempts) == {None}
    retried = [a for app in apps[1:] for a in app.attempts if a is not None]
    assert retried == ["2"] * len(down.attempts)
    ds = mesh.stats()
    assert ds.retries == len(down.attempts) and ds.attempts == 12 + len(down.attempts)


async def test_a_client_stream_failed_mid_request_is_replayed_on_another_instance(
    closing: list[Mesh],
) -> None:
    taken = threading.Event()  # either app took the call
    down = GrpcApp("down", mode="unavailable", called=taken)
    up = GrpcApp("up", called=taken)
    mesh = await _mesh([down, up], {"retries": {"attempts": 2, "retryOn": ["unavailable"]}})
    closing.append(mesh)
    channel = mesh.channel()

    def call() -> bytes:
        taken.clear()

        def messages() -> Iterator[bytes]:
            yield b"a" * 1000
            # The rest only once an app took the call: a failure then is mid-request.
            assert taken.wait(10)
            yield b"b" * 1000
            yield b"c"

        reply: bytes = channel.stream_unary("/t.S/C")(messages(), timeout=10)
        return reply

    replies = [await asyncio.to_thread(call) for _ in range(2)]
    channel.close()
    # Both ended on `up` with every byte sent; a call that met `down` first went to `up`
    # as attempt 2, the bytes `down` had taken sent again, the rest after them.
    assert replies == [b"up:" + b"a" * 1000 + b"b" * 1000 + b"c"] * 2
    assert down.attempts and set(down.attempts) == {None}
    assert up.attempts.count("2") == len(down.attempts)


async def test_a_body_over_the_buffer_limit_is_not_retried(closing: list[Mesh]) -> None:
    down, up = GrpcApp("down", mode="unavailable"), GrpcApp("up")
    retries = {"attempts": 3, "retryOn": ["unavailable"], "bufferLimit": 1000}
    mesh = await _mesh([down, up], {"retries": retries})
    closing.append(mesh)
    channel = mesh.channel()
    big = channel.unary_unary("/t.S/U")

    def calls() -> list[Any]:
        out = []
        for _ in range(4):
            try:
                out.append(big(b"z" * 4000, timeout=10)[:3])
            except grpc.RpcError as e:
                out.append(e.code())
        return out

    out = await asyncio.to_thread(calls)
    channel.close()
    # The calls that met `down` failed: their bodies were too long to send again.
    assert sorted(map(str, out)) == sorted(
        map(str, [b"up:"] * 2 + [grpc.StatusCode.UNAVAILABLE] * 2)
    )
    assert mesh.stats().retries == 0
    assert mesh.stats().retries_refused.get("body_too_large") == 2


async def test_a_status_in_trailers_before_any_message_is_retried_after_it_not(
    closing: list[Mesh],
) -> None:
    late = GrpcApp("late", mode="late-unavailable")
    mid = GrpcApp("mid", mode="stream-then-fail")
    mesh = await _mesh([late, mid], {"retries": {"attempts": 2, "retryOn": ["unavailable"]}})
    closing.append(mesh)
    channel = mesh.channel()
    # HEADERS, then trailers with UNAVAILABLE and no message: held, then retried on `mid`
    # (whose unary answers), and the held head of `late` never reached the client.
    out = []
    for _ in range(4):
        reply, call = await asyncio.to_thread(
            channel.unary_unary("/t.S/U").with_call, b"x", timeout=10
        )
        out.append((reply, dict(call.initial_metadata()).get("x-from")))
    assert out == [(b"mid:x", None)] * 4
    # Each call that met `late` first went to `mid` as attempt 2.
    assert late.attempts and set(late.attempts) == {None}
    assert mid.attempts.count("2") == len(late.attempts)
    # A stream that relayed a message, then failed with UNAVAILABLE: not retried.
    mid.attempts.clear()
    late.attempts.clear()

    def server_stream() -> tuple[list[bytes], Any]:
        got: list[bytes] = []
        try:
            for m in channel.unary_stream("/t.S/SS")(b"", timeout=10):
                got.append(m)
        except grpc.RpcError as e:
            return got, e.code()
        return got, grpc.StatusCode.OK

    results = [await asyncio.to_thread(server_stream) for _ in range(2)]
    channel.close()
    # The one on `mid` failed after its first message, and was not sent again.
    assert ([b"mid"], grpc.StatusCode.UNAVAILABLE) in results
    assert len(mid.attempts) == 1 and mid.attempts == [None]


async def test_the_budget_limits_a_storm(closing: list[Mesh]) -> None:
    apps = [GrpcApp(f"down{i}", mode="unavailable") for i in range(2)]
    retries = {
        "attempts": 5,
        "retryOn": ["unavailable"],
        "backoff": {"base": "1ms", "max": "2ms"},
        "budget": {"ratio": 0.0, "window": "10s", "minPerSecond": 1},
    }
    mesh = await _mesh(apps, {"retries": retries})
    closing.append(mesh)
    channel = mesh.channel()
    calls = 30
    out = await asyncio.to_thread(_unary, channel, calls)
    channel.close()
    assert all(code == grpc.StatusCode.UNAVAILABLE for code, _ in out), out
    ds = mesh.stats()
    reached = sum(len(a.attempts) for a in apps)
    # At most minPerSecond * window = 10 retries in the window, whatever the storm; the
    # rest were refused by the budget, and told so in their gRPC error.
    assert 1 <= ds.retries <= 10 and reached == calls + ds.retries
    assert ds.retries_refused.get("budget", 0) >= calls - 10
    assert any("retry budget" in str(details) for _, details in out)


async def test_overflow_is_resource_exhausted_and_failures_eject(closing: list[Mesh]) -> None:
    slow = GrpcApp("slow", mode="hang")
    mesh = await _mesh(
        [slow],
        {
            "circuitBreaker": {"maxActiveRequests": 1},
            "outlierDetection": {"consecutive5xx": 2, "maxEjectionPercent": 100},
        },
    )
    closing.append(mesh)
    channel = mesh.channel()
    first = channel.unary_unary("/t.S/U").future(b"x", timeout=10)
    await until(lambda: len(slow.attempts) == 1, what="the first call reaching the app")
    # The breaker's one slot is taken: the second call is refused at once.
    out = await asyncio.to_thread(_unary, channel, 1)
    assert out[0][0] == grpc.StatusCode.RESOURCE_EXHAUSTED, out
    assert len(slow.attempts) == 1
    slow.release.set()
    assert await asyncio.to_thread(first.result, 10) == b"slow:x"
    # gRPC statuses feed outlier detection as the HTTP status they stand for.
    slow.mode = "unavailable"
    out = await asyncio.to_thread(_unary, channel, 2)
    channel.close()
    assert [c for c, _ in out] == [grpc.StatusCode.UNAVAILABLE] * 2
    ep = mesh.cluster.endpoints[0]
    assert ep.ejected_until > mesh.outbound.proxy.clock()


async def test_a_per_try_timeout_goes_to_another_instance(closing: list[Mesh]) -> None:
    slow, fast = GrpcApp("slow", mode="hang"), GrpcApp("fast")
    retries = {
        "attempts": 2,
        "perTryTimeout": "1s",
        "retryOn": ["gateway-error"],
        "retryNonIdempotent": True,
    }
    mesh = await _mesh([slow, fast], {"retries": retries})
    closing.append(mesh)
    channel = mesh.channel()
    out = await asyncio.to_thread(_unary, channel, 2)
    channel.close()
    assert out == [(grpc.StatusCode.OK, b"fast:x")] * 2
    # Each call that met `slow` first went to `fast` as attempt 2 after the per-try timeout.
    assert slow.attempts and set(slow.attempts) == {None}
    assert fast.attempts.count("2") == len(slow.attempts)


async def test_a_mirror_to_a_shadow_that_hangs_neither_delays_nor_piles_up(
    closing: list[Mesh],
) -> None:
    shadow = GrpcApp("shadow", mode="hang")
    route = doc("Route", "greeter", {"rules": [{"mirror": {"service": "shadow"}}]})
    mesh = await _mesh([GrpcApp("g0")], {}, [route], shadow=shadow)
    closing.append(mesh)
    router = mesh.outbound.proxy.router
    assert isinstance(router, PolicyRouter)
    sender = router.mirrors
    sender.max_in_flight = 3
    sender.timeout = 3.0  # past the six calls below, however slow the machine
    channel = mesh.channel()
    out = await asyncio.to_thread(_unary, channel, 6)
    # The caller's calls all answered while the shadow holds its copies.
    assert out == [(grpc.StatusCode.OK, b"g0:x")] * 6
    # Copies went as HTTP/2 streams (gRPC): the shadow got them, at most 3 at once.
    await until(lambda: len(shadow.attempts) == 3, what="three copies at the shadow")
    assert sender.counts["busy"] == 3
    # A copy still open after the sender's timeout is reset and counted; none is left.
    await until(lambda: sender.counts["failed"] == 3, what="the copies timed out")
    assert not sender.streams
    # With room again, the next call's copy goes out too.
    await asyncio.to_thread(_unary, channel, 1)
    channel.close()
    await until(lambda: len(shadow.attempts) == 4, what="a fourth copy")


async def test_a_remote_sidecar_whose_app_is_down_is_a_refusal_retried_by_default(
    closing: list[Mesh],
) -> None:
    # No retry policy written: the mesh's default retries refusals, whatever the method.
    # The inbound sidecar of a stopped app answers a gRPC error (14, x-tether-error
    # upstream_connect_error): its app never saw the call, so it goes elsewhere.
    up = GrpcApp("up")
    gone = GrpcApp("gone")
    mesh = await _mesh([up, gone], {})
    closing.append(mesh)
    gone.server.stop(0)
    channel = mesh.channel()
    out = await asyncio.to_thread(_unary, channel, 6)
    channel.close()
    assert out == [(grpc.StatusCode.OK, b"up:x")] * 6
    assert not gone.attempts and up.attempts.count("2") >= 1
    assert mesh.stats().retries == up.attempts.count("2")


async def test_an_h2_get_answered_503_is_retried_on_another_instance(
    closing: list[Mesh],
) -> None:
    # Not gRPC: a raw h2 client, h2c apps, retryOn gateway-error on the response status.
    from tests.h2_peers import H2App, H2Client

    apps = [await H2App(f"app-{i}").start() for i in range(2)]
    apps[0].status = b"503"
    inbounds = [
        await start_inbound(a.port, stats=ProxyStats(), port=0, app_protocol="http2") for a in apps
    ]
    cluster = Cluster("orders", "default")
    cluster.set_endpoints(
        [Endpoint(f"o{i}", "127.0.0.1", ib.port) for i, ib in enumerate(inbounds)]
    )
    directory = StaticDirectory([cluster])
    policy = Policy(directory)
    spec = {"loadBalancer": {"policy": "round_robin"}, "retries": {"retryOn": ["gateway-error"]}}
    await policy.apply(snapshot(1, [doc("ServiceDefaults", "orders", spec)]))
    outbound = await start_policy_outbound(directory, policy, port=0)
    client = await H2Client().connect(outbound.port)
    try:
        responses = [await client.request("/who", "orders") for _ in range(6)]
        assert [(r.status, bytes(r.body)) for r in responses] == [(200, b"app-1")] * 6
        # app-0 saw first attempts only; app-1 saw each of them again as attempt 2.
        first = [dict(h).get(b"x-tether-attempt") for h in apps[0].seen]
        again = [dict(h).get(b"x-tether-attempt") for h in apps[1].seen]
        assert first and set(first) == {None}
        assert again.count(b"2") == len(first)
        ds = outbound.proxy.stats.destination("outbound", "orders.default")
        assert ds.retries == len(first)
    finally:
        await client.aclose()
        await outbound.aclose()
        for ib in inbounds:
            await ib.aclose()
        for a in apps:
            await a.aclose()


# -- pure parts ---------------------------------------------------------------------------

GRPC_POLICY = """\
apiVersion: tether.dev/v1alpha1
kind: ServiceDefaults
metadata:
  name: greeter
spec:
  retries:
    retryOn: [unavailable, resource-exhausted, {bad}]
"""


def test_grpc_retry_on_values_validate_and_compile() -> None:
    from controlplane.validation import validate
    from proxy import grpc as codes
    from proxy import retry as retries
    from wire import resources as schema

    out = validate([("sd.yaml", GRPC_POLICY.format(bad="cancelled"))])
    assert out.ok, out.errors
    out = validate([("sd.yaml", GRPC_POLICY.format(bad="unavailble"))])
    assert ("spec.retries.retryOn[2]", 7) in {(p.path, p.line) for p in out.errors}
    policy = schema.RetryPolicy(retry_on=("unavailable", "deadline-exceeded", "reset"))
    spec = retries.RetrySpec.of(policy)
    assert spec.reads_grpc and not spec.any_status
    assert spec.retriable_grpc(codes.UNAVAILABLE) and spec.retriable_grpc(4)
    assert not spec.retriable_grpc(codes.OK) and not spec.retriable_grpc(8)
    # The HTTP conditions are untouched by the gRPC bits.
    assert spec.retriable(retries.F_RESET) and not spec.retriable(retries.F_STATUS, 503)
    assert not retries.RetrySpec.of(schema.RetryPolicy()).reads_grpc
    # A gRPC status to outlier detection: the HTTP status it stands for.
    assert codes.http_status(codes.UNAVAILABLE) == 503
    assert codes.http_status(codes.RESOURCE_EXHAUSTED) == 429
    assert codes.http_status(99) == 500
    assert codes.status_of([(b"grpc-status", b"14")]) == 14
    assert codes.status_of([(b"grpc-status", b"x")]) == codes.UNKNOWN
    assert codes.status_of([]) == -1
