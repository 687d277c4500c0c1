"""Egress guard: the mesh's own control surfaces, which an app may not reach as egress.

The outbound listener's egress (default allow) lets an app call the outside world; it
must not let it call the mesh itself: this sidecar's listeners (admin, with
`/config_dump`; inbound; outbound), the control plane's API and the registry. The
guard judges the address a connection *reached*: egress pools and CONNECT tunnels ask
it right after connecting, before a byte is sent. So every way of naming a protected
address is covered alike (an IP literal, `localhost`, any name that resolves to it, at
any time: DNS answers changing between a check and the connect do not matter), and the
app gets `403 egress_denied` naming what it reached.

A protected address on a loopback or unspecified IP (`127.0.0.1`, `::1`, `0.0.0.0`) is
protected on every loopback IP and on every address of this host (a connection whose
peer address is its own local address); any other is protected as that IP and port.
Other sidecars' listeners are not known here (only this sidecar's own ports are).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from typing import Any

log = logging.getLogger("tether.egress")


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    ip = ipaddress.ip_address(text.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


class EgressGuard:
    """The protected addresses; `denied(transport)` says what a connection reached."""

    def __init__(self) -> None:
        # (ip, port) -> what it is, for addresses elsewhere.
        self._exact: dict[tuple[str, int], str] = {}
        # port -> what it is, for this host's own addresses (loopback included).
        self._local: dict[int, str] = {}

    def protect_local(self, what: str, port: int) -> None:
        """A port of this host (a listener of this sidecar, on any local address)."""
        if port:
            self._local[port] = what

    async def protect(self, what: str, host: str, port: int) -> None:
        """`host:port` as its name resolves now (and as the IPs it names, always)."""
        try:
            ip = _ip(host)
        except ValueError:
            try:
                infos = await asyncio.get_running_loop().getaddrinfo(host, port)
            except OSError as e:
                log.warning("egress guard: %s address %s does not resolve: %s", what, host, e)
                return
            addresses = {_ip(str(info[4][0])) for info in infos}
        else:
            addresses = {ip}
        for address in addresses:
            if address.is_loopback or address.is_unspecified:
                self.protect_local(what, port)
            else:
                self._exact[(str(address), port)] = what

    def denied(self, transport: Any) -> str | None:
        """What a connected transport reached, if that is protected; else None."""
        peer = transport.get_extra_info("peername")
        if not isinstance(peer, tuple) or len(peer) < 2:
            return None
        ip = _ip(str(peer[0]))
        port = peer[1]
        what = self._exact.get((str(ip), port))
        if what is None and port in self._local:
            sock = transport.get_extra_info("sockname")
            if ip.is_loopback or (isinstance(sock, tuple) and _ip(str(sock[0])) == ip):
                what = self._local[port]
        return what

    def __repr__(self) -> str:
        return f"<EgressGuard local_ports={sorted(self._local)} addresses={len(self._exact)}>"
