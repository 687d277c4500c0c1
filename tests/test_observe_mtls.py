"""Observability of the mTLS mesh: the inbound `source` from the caller's verified identity
(stats, server spans, access log), TLS metrics (handshakes, certificate expiry, trust
bundle) and each sidecar's certificate expiry at the control plane.

The end-to-end tests run the real registry, a control plane with its CA and two sidecars
in this process on real sockets (tests/test_mtls_e2e.py's harness), with tracing
exported over OTLP/HTTP to a collector stand-in and an access log on the serving sidecar.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import socket
import ssl
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from prometheus_client.parser import text_string_to_metric_families

from controlplane.ca.service import CA_SERVICE
from controlplane.server import ControlPlane
from proxy.dispatch import InboundRouter
from proxy.route_result import Peer, source_of_identity
from proxy.stats import MAX_SOURCES, OTHER_SOURCE, ProxyStats
from proxy.tls import MeshTLS
from proxy.tls_stats import REASONS, HandshakeCounts, failure_reason
from tests.ca_material import ca_cert
from tests.conftest import serve_app
from tests.fakes import parse_request
from tests.otlp_collector import Collector
from tests.polling import until
from tests.test_mtls_e2e import (  # noqa: F401  (cp and start_sidecar are fixtures)
    StartSidecar,
    _apply,
    _client_context,
    _doc,
    _leaf,
    _served,
    cp,
    echo,
    get,
    start_sidecar,
)
from tests.test_observe import documented_metrics
from wire import push as protocol
from wire.spiffe import SpiffeId, make_csr, new_key

# -- pure parts ---------------------------------------------------------------------------


def spiffe(service: str, namespace: str = "default") -> str:
    return f"spiffe://11111111.consul/ns/{namespace}/dc/dc1/svc/{service}"


def test_the_source_is_the_identitys_service_and_namespace() -> None:
    assert source_of_identity(spiffe("web", "shop")) == "web.shop"
    assert source_of_identity("spiffe://td/ns/x/dc/y") == ""
    assert source_of_identity("spiffe://td/ns//dc/y/svc/z") == ""
    assert Peer(b"10.0.0.1").source == ""
    assert Peer(b"10.0.0.1", spiffe("web")).source == "web.default"


def test_inbound_source_labels_come_from_identities_and_are_bounded() -> None:
    stats = ProxyStats(source="api.default")
    router = InboundRouter(9, stats)
    forged = parse_request(
        b"GET / HTTP/1.1\r\nHost: api\r\nx-tether-peer-identity: " + spiffe("evil").encode()
        + b"\r\n\r\n"
    )  # fmt: skip
    # A plaintext caller has no identity: whatever its headers say, it is `unknown`.
    plain = router.route(forged, Peer(b"10.0.0.9"))
    assert plain.dstats is not None and plain.dstats.source == ""
    web = Peer(b"10.0.0.1", spiffe("web"))
    first = router.route(forged, web)
    assert first.dstats is not None and first.dstats.source == "web.default"
    assert router.route(forged, web) is first  # the caller's result is kept, not remade
    # MAX_SOURCES callers get a label each; those after them share OTHER_SOURCE, counted.
    extra = 5
    for i in range(MAX_SOURCES - 1 + extra):
        res = router.route(forged, Peer(b"10.0.1.%d" % (i % 250), spiffe(f"svc{i}")))
        assert res.dstats is not None
        res.dstats.record(200, 0.001)
        want = f"svc{i}.default" if i < MAX_SOURCES - 1 else OTHER_SOURCE
        assert res.dstats.source == want
    assert stats.sources_overflowed == extra
    # A caller seen before keeps its own label after the cap was reached.
    assert router.route(forged, web).dstats is first.dstats
    text = stats.render_prometheus()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    inbound = [s for s in families["tether_requests"].samples if s.labels["listener"] == "inbound"]
    sources = {s.labels["source"] for s in inbound}
    assert "svc0.default" in sources and "svc62.default" in sources
    assert "web.default" not in sources  # counted no request: no series
    assert len(sources) == MAX_SOURCES
    (other,) = [s for s in inbound if s.labels["source"] == OTHER_SOURCE]
    assert other.value == extra
    (overflow,) = families["tether_inbound_source_overflow"].samples
    assert overflow.value == extra
    assert stats.render_prometheus().count('source="evil') == 0


def test_handshake_failures_fall_into_fixed_reasons() -> None:
    assert failure_reason(ssl.SSLCertVerificationError("certificate verify failed")) == (
        "certificate"
    )
    assert failure_reason(ssl.SSLError(1, "wrong version number")) == "protocol"
    assert failure_reason(TimeoutError()) == "timeout"
    assert failure_reason(ConnectionResetError()) == "connection"
    counts = HandshakeCounts()
    counts.ok("server")
    counts.failed("client", "identity")
    counts.failed("client", "something an error said")  # never a label of its own
    assert counts.counts == {
        ("server", "ok"): 1,
        ("client", "identity"): 1,
        ("client", "protocol"): 1,
    }
    assert set(REASONS) == {"certificate", "identity", "protocol", "timeout", "connection"}


def test_stats_reports_carry_the_certificate_expiry() -> None:
    msg = protocol.Stats(seconds=2.0, rows=(), cert_expiry=1_800_000_000.0)
    assert protocol.decode(protocol.encode(msg)) == msg
    plain = protocol.Stats(seconds=2.0, rows=())
    assert "certExpiry" not in protocol.encode(plain)
    decoded = protocol.decode(protocol.encode(plain))
    assert isinstance(decoded, protocol.Stats) and decoded.cert_expiry is None
    for bad in ('"soon"', "-1", "true", "1e300"):
        obj = {"proto": protocol.PROTOCOL, "type": "stats", "seconds": 2, "rows": []}
        raw = json.dumps(obj)[:-1] + f',"certExpiry":{bad}}}'
        with pytest.raises(protocol.PushProtocolError, match="certExpiry"):
            protocol.decode(raw)


# -- over real sockets ----------------------------------------------------------------------


@pytest.fixture
def collector() -> Iterator[Collector]:
    c = Collector()
    yield c
    c.close()


class Observed:
    def __init__(
        self, control: ControlPlane, a: Any, b: Any, log: Path, collector: Collector
    ) -> None:
        self.cp, self.a, self.b, self.log = control, a, b, log
        self.collector = collector

    async def prometheus(self, sidecar: Any) -> dict[str, Any]:
        url = f"http://127.0.0.1:{sidecar.ports()['admin']}/stats/prometheus"
        async with aiohttp.ClientSession() as s, s.get(url) as resp:
            assert resp.status == 200
            text = await resp.text()
        return {f.name: f for f in text_string_to_metric_families(text)}

    def log_lines(self) -> list[dict[str, Any]]:
        if not self.log.exists():
            return []
        return [json.loads(line) for line in self.log.read_text().splitlines() if line]


@pytest.fixture
async def observed(
    cp: ControlPlane,  # noqa: F811
    start_sidecar: StartSidecar,  # noqa: F811
    collector: Collector,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> AsyncIterator[Observed]:
    from aiohttp import web

    for k, v in collector.env().items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "always_on")
    app = web.Application()
    app.router.add_get("/{tail:.*}", echo)
    runner, app_port = await serve_app(app)
    url = f"http://127.0.0.1:{cp.port}"
    log = tmp_path / "b-access.log"
    try:
        b = await start_sidecar("b", app_port, url, access_log=str(log))
        a = await start_sidecar("a", app_port, url)
        yield Observed(cp, a, b, log, collector)
    finally:
        await runner.cleanup()


def _inbound(families: dict[str, Any], source: str) -> float:
    return sum(
        float(s.value)
        for s in families["tether_requests"].samples
        if s.labels["listener"] == "inbound" and s.labels["source"] == source
    )


async def test_inbound_source_comes_from_the_callers_certificate(observed: Observed) -> None:
    forged = {"Host": "b", "x-tether-peer-identity": spiffe("evil")}

    async def call() -> Any:
        status, _, body = await get(observed.a.ports()["outbound"], "/who", headers=forged)
        return body if status == 200 else None

    await until(call, 20, "a call from a to b over mTLS")
    for _ in range(4):
        assert await call() is not None

    async def counted() -> dict[str, Any] | None:
        families = await observed.prometheus(observed.b)
        return families if _inbound(families, "a.default") >= 5 else None

    families = await until(counted, 10, "b counting a's requests under source a.default")
    labels = {s.labels["source"] for s in families["tether_requests"].samples}
    assert not [v for v in labels if "evil" in v]
    assert _inbound(families, "unknown") == 0
    # The access log and the server span say the same, from the same identity.
    lines = await until(
        lambda: [
            ln
            for ln in observed.log_lines()
            if ln["listener"] == "inbound" and ln["path"] == "/who"
        ] or None,
        10,
        "b's access-log lines",
    )  # fmt: skip
    assert {ln["source"] for ln in lines} == {"a.default"}
    spans = await until(
        lambda: [
            s
            for s in observed.collector.spans
            if s.resource.get("service.name") == "b" and s.kind == "server"
        ] or None,
        20,
        "b's server spans at the collector",
    )  # fmt: skip
    assert all(s.attributes.get("tether.source.service") == "a" for s in spans), spans
    assert all(s.attributes.get("tether.source.namespace") == "default" for s in spans)
    assert all(s.attributes.get("tether.destination.service") == "b" for s in spans)

    # A plaintext caller (permissive mode) has no identity: `unknown`, whatever it claims.
    status, body = await _apply(
        observed.cp, _doc("MeshConfig", "mesh", {"mtls": {"mode": "permissive"}})
    )
    assert status == 200, body
    server = observed.b.inbound.server
    await until(lambda: server.mode == "permissive", 20, "b in permissive mode")
    port = observed.b.inbound.port
    status, _, _ = await get(port, "/plain", headers={"x-tether-peer-identity": spiffe("evil")})
    assert status == 200

    async def plain_counted() -> dict[str, Any] | None:
        families = await observed.prometheus(observed.b)
        return families if _inbound(families, "unknown") == 1 else None

    families = await until(plain_counted, 10, "the plaintext request under source unknown")
    assert _inbound(families, "a.default") >= 5
    (served,) = [
        s
        for s in families["tether_inbound_plaintext_connections"].samples
        if s.labels["result"] == "served"
    ]
    assert served.value >= 1
    plain = await until(
        lambda: [ln for ln in observed.log_lines() if ln["path"] == "/plain"] or None,
        10,
        "the plaintext request's access-log line",
    )
    assert plain[0]["source"] == "unknown"
    plain_spans = await until(
        lambda: [
            s for s in observed.collector.spans
            if s.resource.get("service.name") == "b" and s.attributes.get("url.path") == "/plain"
        ] or None,
        20,
        "the plaintext request's server span",
    )  # fmt: skip
    assert "tether.source.service" not in plain_spans[0].attributes


def _handshakes(families: dict[str, Any], side: str, result: str, reason: str = "") -> float:
    for s in families["tether_tls_handshakes"].samples:
        labels = s.labels
        if (labels["side"], labels["result"], labels.get("reason", "")) == (side, result, reason):
            return float(s.value)
    raise AssertionError(f"no tether_tls_handshakes sample for {side} {result} {reason}")


async def test_tls_metrics_and_certificate_expiry_at_the_control_plane(
    observed: Observed, tmp_path: Path
) -> None:
    a_tls, b_tls = observed.a.mesh_tls, observed.b.mesh_tls
    assert isinstance(a_tls, MeshTLS) and isinstance(b_tls, MeshTLS)
    await until(
        lambda: _ok(get(observed.a.ports()["outbound"], "/x", headers={"Host": "b"})),
        20,
        "a call from a to b",
    )
    a_fam = await observed.prometheus(observed.a)
    assert _handshakes(a_fam, "client", "ok") >= 1
    b_fam = await observed.prometheus(observed.b)
    assert _handshakes(b_fam, "server", "ok") >= 1
    assert _handshakes(b_fam, "server", "failed", "certificate") == 0

    # Plaintext at the strict port is refused, and counted.
    port = observed.b.inbound.port

    def plaintext() -> bytes:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: b\r\n\r\n")
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
            return data

    assert b"mtls_required" in await asyncio.get_running_loop().run_in_executor(None, plaintext)

    # Another CA's certificate: OpenSSL refuses it in the handshake (`certificate`); one
    # from the mesh CA for another trust domain passes OpenSSL, not the SPIFFE check
    # (`identity`).
    now = dt.datetime.now(dt.UTC)
    who = SpiffeId(b_tls.trust_domain, "default", "dc1", "a")
    other_key = new_key()
    other_root = ca_cert(other_key, "Another CA", start=now - dt.timedelta(days=1))
    k = new_key()
    foreign = _leaf(who, other_root, other_key, k, start=now - dt.timedelta(minutes=1))
    assert await _served(port, _client_context(tmp_path, k, foreign, b_tls.roots_pem)) == b""
    provider = observed.cp.app[CA_SERVICE].require()
    root_record = (await provider.state.roots()).active
    assert root_record is not None
    root_key = provider._open_key(root_record)
    assert isinstance(root_key, ec.EllipticCurvePrivateKey)
    from cryptography import x509

    root_cert = x509.load_pem_x509_certificate(root_record.root_pem.encode())
    k = new_key()
    bad_id = SpiffeId("other.consul", "default", "dc1", "a")
    cert = _leaf(bad_id, root_cert, root_key, k, start=now - dt.timedelta(minutes=1))
    assert await _served(port, _client_context(tmp_path, k, cert, b_tls.roots_pem)) == b""
    # A good certificate through the CA's CSR path still gets in (and counts ok).
    ok_key = new_key()
    issued = await provider.sign(make_csr(ok_key, who), who)
    answer = await _served(port, _client_context(tmp_path, ok_key, issued.cert, b_tls.roots_pem))
    assert answer.startswith(b"HTTP/1.1 200 ")

    async def failures() -> dict[str, Any] | None:
        fam = await observed.prometheus(observed.b)
        got = (
            _handshakes(fam, "server", "failed", "certificate"),
            _handshakes(fam, "server", "failed", "identity"),
        )
        return fam if got == (1, 1) else None

    b_fam = await until(failures, 10, "b counting one certificate and one identity failure")
    assert _handshakes(b_fam, "server", "ok") >= 2
    (refused,) = [
        s
        for s in b_fam["tether_inbound_plaintext_connections"].samples
        if s.labels["result"] == "refused"
    ]
    assert refused.value == 1
    assert b_tls.leaf is not None
    expiry = b_tls.leaf.not_valid_after_utc.timestamp()
    (gauge,) = b_fam["tether_certificate_expiry_timestamp_seconds"].samples
    assert gauge.value == round(expiry)
    (roots,) = b_fam["tether_tls_trust_bundle_roots"].samples
    assert roots.value == len(b_tls.roots) >= 1
    # Every family b exposes is in docs/metrics.md's tables, with its type.
    assert {n: f.type for n, f in b_fam.items()} == documented_metrics(access_log=True, mtls=True)

    # The control plane learns each sidecar's expiry from its stats reports.
    async def sidecars() -> dict[str, Any] | None:
        url = f"http://127.0.0.1:{observed.cp.port}/api/v1/sidecars"
        async with aiohttp.ClientSession() as s, s.get(url) as resp:
            body = await resp.json()
        recs = {r["service"]: r for r in body["sidecars"]}
        if all(recs.get(n, {}).get("cert_expiry") for n in ("a", "b")):
            return recs
        return None

    recs = await until(sidecars, 20, "both sidecars' certificate expiry at the control plane")
    assert recs["b"]["cert_expiry"] == round(expiry)
    assert a_tls.leaf is not None
    assert recs["a"]["cert_expiry"] == round(a_tls.leaf.not_valid_after_utc.timestamp())


async def _ok(call: Any) -> Any:
    got = await call
    return got if got[0] == 200 else None
