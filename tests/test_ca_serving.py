"""The control plane's serving certificate: a real TLS server on loopback keeps its open
connections when the certificate is renewed, and new connections get the new one."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import ssl
from collections.abc import AsyncIterator

import consul.aio
import pytest
from aiohttp import web
from cryptography import x509

from controlplane.ca.builtin import BuiltinCA
from controlplane.ca.serving import ServingIdentity, control_plane_identity
from controlplane.ca.spec import CASpec
from controlplane.ca.spiffe import verify_peer
from registry.server import RegistryServer

SPEC = CASpec(encryption_key=base64.b64encode(bytes(32)).decode(), trust_domain="mesh.test")


@pytest.fixture
async def ca(registry: RegistryServer) -> AsyncIterator[BuiltinCA]:
    client = consul.aio.Consul(host="127.0.0.1", port=registry.port)
    provider = BuiltinCA(client, SPEC)
    await provider.start()
    try:
        yield provider
    finally:
        await client.close()


class TLSClient:
    """One keep-alive HTTPS connection, verifying the server by the mesh's roots."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def connect(cls, port: int, bundle_pem: str) -> TLSClient:
        ctx = ssl.create_default_context(cadata=bundle_pem)  # checks "localhost" too
        r, w = await asyncio.open_connection(
            "127.0.0.1", port, ssl=ctx, server_hostname="localhost"
        )
        return cls(r, w)

    @property
    def peer(self) -> x509.Certificate:
        der = self.writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        return x509.load_der_x509_certificate(der)

    async def get(self) -> bytes:
        self.writer.write(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        head = await self.reader.readuntil(b"\r\n\r\n")
        length = next(
            int(line.split(b":")[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        )
        return await self.reader.readexactly(length)

    async def aclose(self) -> None:
        self.writer.close()
        await self.writer.wait_closed()


async def test_renewal_keeps_connections_and_new_ones_get_the_new_certificate(
    ca: BuiltinCA,
) -> None:
    ident = ServingIdentity(ca, datacenter="dc1")
    first = await ident.renew()

    async def hello(request: web.Request) -> web.Response:
        return web.Response(text="hello")

    app = web.Application()
    app.router.add_get("/", hello)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ident.context)
    await site.start()
    port = int(runner.addresses[0][1])
    bundle = await ca.trust_bundle()
    old = new = None
    try:
        old = await TLSClient.connect(port, bundle.pem)
        assert await old.get() == b"hello"
        assert old.peer.serial_number == first.serial

        second = await ident.renew()
        assert second.serial != first.serial
        new = await TLSClient.connect(port, bundle.pem)
        assert await new.get() == b"hello"
        assert new.peer.serial_number == second.serial
        # The connection opened before the renewal was not dropped.
        assert await old.get() == b"hello"
        assert old.peer.serial_number == first.serial

        expected = control_plane_identity(bundle.trust_domain, "dc1")
        got = verify_peer(
            [new.peer],
            bundle.certificates(),
            trust_domain=bundle.trust_domain,
            now=dt.datetime.now(dt.UTC),
            role="server",
            expected=expected,
        )
        assert got == expected
    finally:
        for c in (old, new):
            if c is not None:
                await c.aclose()
        await runner.cleanup()
