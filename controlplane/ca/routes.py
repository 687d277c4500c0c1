"""The CA's HTTP endpoints, in one table: Consul's connect CA API and Tether's own.

Consul's (`/v1/...`), so Consul clients (py-consul's `agent.connect` and `connect.ca`)
work against the control plane: roots (both paths, `?pem`, blocking `?index=&wait=`),
the leaf endpoint (the key made here, for Consul clients only; a token that may write
the service), the configuration (operator:write), and authorize (service:write on the
target; the intentions decide, as at the inbound sidecar). Errors are plain text
with Consul's status codes.

Tether's (`/api/v1/ca/...`, JSON, errors as the rest of the REST API): `sign` takes a
CSR and the sidecar's bootstrap credential (its registry token in the usual headers,
or `kubernetesToken` in the body) and answers the leaf, its intermediates and the trust
bundle; `bundle` is the trust bundle; `rotate` makes a new root (cross-signed), written
with the caller's token so the registry's ACLs decide.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from controlplane.api import _cp, reply, route
from controlplane.auth import caller_token
from controlplane.ca import certs
from controlplane.ca.authority import RESERVED_NAMESPACE
from controlplane.ca.errors import CSRError
from controlplane.ca.provider import IssuedLeaf, StoredCA
from controlplane.ca.service import CA_SERVICE, CAService
from controlplane.ca.spiffe import SpiffeId, SpiffeIdError, make_csr, new_key, parse_spiffe_id
from controlplane.ca.state import RootRecord, RootsState, iso
from controlplane.errors import BadRequestError, ControlPlaneError, PermissionDeniedError
from controlplane.schema import format_duration, parse_duration
from wire.authz import Intentions, Source

log = logging.getLogger("tether.controlplane.ca")

MAX_SIGN_BODY = 64 * 1024
MAX_WAIT = 600.0

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def register(app: web.Application) -> None:
    """The CA's routes in the control plane's access table. Each is open at the
    middleware (None) because each handler authorises the caller's own credential
    itself: a token's service identity or a Kubernetes token for `sign`, a token that
    may write the service for the Consul leaf and authorize, operator:write for the
    configuration, the registry's ACLs for `rotate`; roots and the bundle are public."""
    # Consul's connect CA endpoints.
    route(app, "GET", "/v1/agent/connect/ca/roots", consul_api(roots), None)
    route(app, "GET", "/v1/connect/ca/roots", consul_api(roots), None)
    route(app, "GET", "/v1/agent/connect/ca/leaf/{service}", consul_api(leaf), None)
    route(app, "GET", "/v1/connect/ca/configuration", consul_api(configuration), None)
    route(app, "POST", "/v1/agent/connect/authorize", consul_api(authorize), None)
    route(app, "PUT", "/v1/agent/connect/authorize", consul_api(authorize), None)
    # Tether's.
    route(app, "POST", "/api/v1/ca/sign", sign, None)
    route(app, "GET", "/api/v1/ca/bundle", bundle, None)
    route(app, "POST", "/api/v1/ca/rotate", rotate, None)


def _service(request: web.Request) -> CAService:
    return request.app[CA_SERVICE]


def consul_api(handler: Handler) -> Handler:
    """Consul's error convention: the status code and a plain-text message."""

    async def wrapped(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except ControlPlaneError as exc:
            text = str(exc) or exc.code
            if exc.status == 403 and not text.lower().startswith("permission denied"):
                text = f"Permission denied: {text}"
            return web.Response(status=exc.status, text=text)

    return wrapped


def consul_reply(data: Any, index: int) -> web.Response:
    resp = web.json_response(data)
    resp.headers["X-Consul-Index"] = str(max(1, index))
    return resp


def consul_token(request: web.Request) -> str | None:
    """A Consul client's token: X-Consul-Token, Bearer, or `?token=`."""
    return caller_token(request.headers) or request.query.get("token") or None


async def _grant_allows(request: web.Request, kind: str, segment: str, access: str) -> None:
    svc = _service(request)
    assert svc.tokens is not None
    grant = await svc.tokens.grant(consul_token(request))
    if not grant.allows(kind, segment, access):  # type: ignore[arg-type]
        where = f"{kind} {segment!r}" if segment else kind
        raise PermissionDeniedError(f"Permission denied: token lacks {where} {access}")


# -- Consul's roots, leaf, configuration, authorize ---------------------------------------


def _key_shape(cert_pem: str) -> tuple[str, int]:
    pub = certs.load_cert(cert_pem).public_key()
    if isinstance(pub, ec.EllipticCurvePublicKey):
        return "ec", pub.key_size
    if isinstance(pub, rsa.RSAPublicKey):
        return "rsa", pub.key_size
    return "unknown", 0


def consul_root(root: RootRecord) -> dict[str, Any]:
    """One root as Consul's `structs.CARoot` encodes it."""
    cert = certs.load_cert(root.root_pem)
    signing = certs.load_cert(root.signing_pem)
    key_type, key_bits = _key_shape(root.signing_pem)
    return {
        "ID": root.id,
        "Name": root.name,
        "SerialNumber": root.serial,
        "SigningKeyID": certs.colon_hex(certs.key_id(signing)),
        "ExternalTrustDomain": "",
        "NotBefore": iso(cert.not_valid_before_utc),
        "NotAfter": iso(cert.not_valid_after_utc),
        "RootCert": root.root_pem,
        "IntermediateCerts": list(root.intermediate_pems) or None,
        "Active": root.active,
        "PrivateKeyType": key_type,
        "PrivateKeyBits": key_bits,
        "CreateIndex": root.create_index,
        "ModifyIndex": root.modify_index,
    }


def consul_roots(state: RootsState) -> dict[str, Any]:
    """Consul's `structs.IndexedCARoots`."""
    active = state.active
    return {
        "ActiveRootID": active.id if active else "",
        "TrustDomain": state.trust_domain,
        "Roots": [consul_root(r) for r in state.roots],
    }


def _blocking(request: web.Request) -> tuple[int | None, str | None]:
    raw_index, raw_wait = request.query.get("index"), request.query.get("wait")
    index = None
    if raw_index:
        try:
            index = int(raw_index)
        except ValueError:
            raise BadRequestError(f"Invalid index: {raw_index!r}") from None
        if index < 0:
            raise BadRequestError("Invalid index: negative")
    wait = None
    if raw_wait:
        try:
            seconds = parse_duration(raw_wait)
        except ValueError as exc:
            raise BadRequestError(f"Invalid wait time: {exc}") from None
        wait = format_duration(min(seconds, MAX_WAIT))
    return index or None, wait


async def roots(request: web.Request) -> web.StreamResponse:
    provider = _service(request).require()
    index, wait = _blocking(request)
    kv_index, _ = await provider.state.watch_roots(index, wait) if index else (0, None)
    state = await provider.roots()
    kv_index = max(kv_index, state.index)
    if "pem" in request.query and request.query["pem"].lower() in ("", "1", "true"):
        resp = web.Response(
            text="".join(r.root_pem + "".join(r.intermediate_pems) for r in state.roots),
            content_type="application/pem-certificate-chain",
        )
        resp.headers["X-Consul-Index"] = str(max(1, kv_index))
        return resp
    return consul_reply(consul_roots(state), kv_index)


def consul_leaf(issued: IssuedLeaf, key_pem: str, namespace: str) -> dict[str, Any]:
    """Consul's `structs.IssuedCert` (CertPEM carries the intermediates, as Consul's)."""
    return {
        "SerialNumber": certs.serial_hex(issued.serial),
        "CertPEM": issued.chain_pem,
        "PrivateKeyPEM": key_pem,
        "Service": issued.identity.service,
        "ServiceURI": issued.identity.uri,
        "ValidAfter": iso(issued.cert.not_valid_before_utc),
        "ValidBefore": iso(issued.cert.not_valid_after_utc),
        "Namespace": namespace,
        "CreateIndex": issued.serial,
        "ModifyIndex": issued.serial,
    }


async def leaf(request: web.Request) -> web.StreamResponse:
    """A leaf whose key is made here, for Consul clients (Consul's agent does the same).
    Reused until half its lifetime or a root change, as Consul's agent cache does."""
    svc = _service(request)
    provider = svc.require()
    service = request.match_info["service"]
    namespace = request.query.get("ns") or request.headers.get("X-Consul-Namespace") or "default"
    if namespace == RESERVED_NAMESPACE:
        raise PermissionDeniedError(f"namespace {RESERVED_NAMESPACE} is the control plane's")
    await _grant_allows(request, "service", service, "write")
    state = await provider.roots()
    try:
        ident = SpiffeId(state.trust_domain, namespace, svc.spec.datacenter, service)
    except SpiffeIdError as exc:
        raise BadRequestError(str(exc)) from None
    cache = svc.leaf_cache
    hit = cache.get((namespace, service))
    now = provider.clock()
    active = state.active
    if hit is not None and active is not None and hit[0].root_id == active.id:
        cert = hit[0].cert
        half = (
            cert.not_valid_before_utc + (cert.not_valid_after_utc - cert.not_valid_before_utc) / 2
        )
        if now < half:
            return consul_reply(consul_leaf(hit[0], hit[1], namespace), hit[0].serial)
    key = new_key()
    issued = await provider.sign(make_csr(key, ident), ident)
    key_pem = certs.key_pem(key)
    if len(cache) >= svc.LEAF_CACHE_SIZE:
        cache.pop(next(iter(cache)))
    cache[(namespace, service)] = (issued, key_pem)
    return consul_reply(consul_leaf(issued, key_pem, namespace), issued.serial)


async def configuration(request: web.Request) -> web.StreamResponse:
    svc = _service(request)
    provider = svc.require()
    await _grant_allows(request, "operator", "", "write")
    state = await provider.roots()
    active = state.active
    key_type, key_bits = _key_shape(active.signing_pem) if active else ("ec", 256)
    return consul_reply(
        {
            "Provider": provider.provider_name,
            "Config": {
                "LeafCertTTL": format_duration(svc.spec.leaf_ttl),
                "RootCertTTL": format_duration(svc.spec.root_ttl),
                "PrivateKeyType": key_type,
                "PrivateKeyBits": key_bits,
                "TrustDomain": state.trust_domain,
                "Datacenter": svc.spec.datacenter,
            },
            "State": None,
            "ForceWithoutCrossSigning": False,
            "CreateIndex": min((r.create_index for r in state.roots), default=0),
            "ModifyIndex": max((r.modify_index for r in state.roots), default=0),
        },
        state.index,
    )


async def _json_body(request: web.Request, limit: int) -> dict[str, Any]:
    if request.content_length is not None and request.content_length > limit:
        raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=request.content_length)
    # The listener's body deadline (tether.http_limits) has read the body by now, within
    # the app's client_max_size; a chunked body has no Content-Length to check first.
    raw = await request.read()
    if len(raw) > limit:
        raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=len(raw))
    try:
        body = json.loads(raw or b"null")
    except ValueError as exc:
        raise BadRequestError(f"the body is not JSON: {exc}") from None
    if not isinstance(body, dict):
        raise BadRequestError("the body must be a JSON object")
    return body


async def authorize(request: web.Request) -> web.StreamResponse:
    """Consul's authorize: may this client certificate's identity connect to Target?
    The intentions decide (wire/authz.py, as the inbound sidecar does; an L7 intention
    counts as deny here, as in Consul), then the mesh's default action
    (`MeshConfig.spec.authorization.defaultAction`) and namespace isolation. A client
    of another trust domain is not authorized."""
    svc = _service(request)
    provider = svc.require()
    body = {k.lower(): v for k, v in (await _json_body(request, MAX_SIGN_BODY)).items()}
    target = body.get("target")
    uri = body.get("clientcerturi")
    if not isinstance(target, str) or not target:
        raise BadRequestError("Target service must be specified")
    if not isinstance(uri, str) or not uri:
        raise BadRequestError("ClientCertURI must be specified")
    try:
        client = parse_spiffe_id(uri)
    except SpiffeIdError:
        raise BadRequestError("ClientCertURI not a valid Connect identifier") from None
    assert svc.tokens is not None
    grant = await svc.tokens.grant(consul_token(request))
    if not grant.allows("service", target, "write"):
        raise PermissionDeniedError("Permission denied: token lacks service:write on the target")
    state = await provider.roots()
    if client.trust_domain != state.trust_domain:
        return consul_reply(
            {"Authorized": False, "Reason": f"Client is in another trust domain ({uri})"},
            state.index,
        )
    namespace = body.get("namespace") or request.query.get("ns") or "default"
    if not isinstance(namespace, str):
        raise BadRequestError("Namespace must be a string")
    snap = await _cp(request).store.snapshot()
    policy = Intentions.compile(snap.resources.values()).for_destination(namespace, target)
    decision = policy.decide(Source(client.namespace, client.service), l4_only=True)
    return consul_reply(
        {"Authorized": decision.allowed, "Reason": decision.reason}, max(state.index, snap.index)
    )


# -- Tether's sign, bundle, rotate ----------------------------------------------------------


async def sign(request: web.Request) -> web.Response:
    svc = _service(request)
    provider = svc.require()
    body = await _json_body(request, MAX_SIGN_BODY)
    csr_pem = body.get("csr")
    if not isinstance(csr_pem, str):
        raise BadRequestError('"csr" must be a PEM certificate signing request')
    k8s = body.get("kubernetesToken")
    if k8s is not None and not isinstance(k8s, str):
        raise BadRequestError('"kubernetesToken" must be a string')
    csr = certs.load_csr(csr_pem)
    uris = certs.csr_uris(csr)
    if len(uris) != 1:
        raise CSRError("the CSR must name exactly one identity (one URI SAN)")
    try:
        wanted = parse_spiffe_id(uris[0])
    except SpiffeIdError as exc:
        raise CSRError(f"the CSR's identity: {exc}") from None
    assert svc.authority is not None
    peer = request.remote or "-"
    why = await svc.authority.authorize(
        wanted, token=caller_token(request.headers), kubernetes_token=k8s, peer=peer
    )
    issued = await provider.sign(csr, wanted)
    log.info("mesh CA: issued %s serial %d to %s (%s)", wanted, issued.serial, peer, why)
    trust = await provider.trust_bundle()
    return reply(
        {
            "spiffeId": wanted.uri,
            "serialNumber": certs.serial_hex(issued.serial),
            "certificatePem": issued.cert_pem,
            "intermediatePems": list(issued.intermediate_pems),
            "validAfter": iso(issued.cert.not_valid_before_utc),
            "validBefore": iso(issued.cert.not_valid_after_utc),
            "trustDomain": trust.trust_domain,
            "trustBundle": list(trust.root_pems),
            "bundleIndex": trust.index,
        }
    )


async def bundle(request: web.Request) -> web.Response:
    svc = _service(request)
    trust = await svc.require().trust_bundle()
    return reply(
        {
            "trustDomain": trust.trust_domain,
            "roots": list(trust.root_pems),
            "index": trust.index,
            # What a sidecar puts in the SPIFFE ID it asks for.
            "datacenter": svc.spec.datacenter,
        }
    )


async def rotate(request: web.Request) -> web.Response:
    provider: StoredCA = _service(request).require()
    record = await provider.rotate(token=caller_token(request.headers), as_caller=True)
    trust = await provider.trust_bundle()
    return reply(
        {
            "activeRootId": record.id,
            "name": record.name,
            "crossSigned": bool(record.intermediate_pems),
            "roots": [r.id for r in (await provider.roots()).roots],
            "bundleIndex": trust.index,
            "rotatedAt": iso(provider.clock()),
        }
    )
