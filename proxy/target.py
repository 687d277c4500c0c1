"""Logical targets: which service (or outside host) a request names, from URI or Host.

Naming rules, in order:
- a single label (`orders`) is the mesh service `orders` in the caller's namespace;
- two labels (`orders.payments`) are the mesh service `orders` in namespace `payments`
  *if the service directory knows that service*; otherwise the name is an egress host
  (so `example.com` stays the outside world even though it has two labels, and a mesh
  service that appears later is recognised on its first request after discovery sees it);
- anything else (three or more labels, an IP literal) is an egress host.
The port of a mesh name is ignored (the app dialled `http://orders/`, port 80); an
egress host keeps its port (default 80, or 443 for CONNECT).
"""

from __future__ import annotations

from dataclasses import dataclass

from proxy.errors import BadMessageError

# What a reg-name or IPv4 literal may hold (RFC 3986 3.2.2: unreserved, pct-encoded,
# sub-delims); anything else (`/`, `?`, `#`, `@`, space) would smuggle a path or
# userinfo into the authority.
_HOST_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-._~%!$&'()*+,;=")
_IPV6_CHARS = frozenset("0123456789abcdef:.")


@dataclass(frozen=True, slots=True)
class Authority:
    """A parsed `host[:port]`, lowercased, without a trailing dot."""

    host: str
    port: int
    # (service, namespace) if the name could be a mesh service, else None.
    service: str | None
    namespace: str | None

    @property
    def single_label(self) -> bool:
        return self.service is not None and self.namespace is None


def parse_authority(authority: bytes, default_port: int = 80) -> Authority:
    """Split `host[:port]` (IPv6 literals in brackets) and classify its shape."""
    try:
        text = authority.decode("ascii").strip().lower()
    except UnicodeDecodeError:
        raise BadMessageError("non-ASCII host") from None
    if not text:
        raise BadMessageError("empty host")
    port = default_port
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise BadMessageError(f"bad IPv6 literal in {text!r}")
        host = text[1:end]
        if not host or not _IPV6_CHARS.issuperset(host):
            raise BadMessageError(f"bad IPv6 literal in {text!r}")
        rest = text[end + 1 :]
        if rest:
            if not rest.startswith(":"):
                raise BadMessageError(f"bad authority {text!r}")
            port = _port(rest[1:], text)
        return Authority(host, port, None, None)
    host, sep, port_text = text.partition(":")
    if sep:
        port = _port(port_text, text)
    host = host.rstrip(".")
    if not host or not _HOST_CHARS.issuperset(host):
        raise BadMessageError(f"bad host {text!r}")
    labels = host.split(".")
    if len(labels) == 1:
        return Authority(host, port, host, None)
    if len(labels) == 2 and not labels[1].isdigit() and all(labels):
        return Authority(host, port, labels[0], labels[1])
    return Authority(host, port, None, None)


def _port(text: str, whole: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise BadMessageError(f"bad port in {whole!r}")
    return int(text)


def split_absolute_form(target: bytes) -> tuple[bytes, bytes] | None:
    """`http://host:port/path?q` → (b"host:port", b"/path?q"); None for origin-form.

    Only `http` is accepted: an `https://` URI sent to a plain proxy would ask it to
    speak TLS to the origin on the client's behalf, which clients do with CONNECT.
    """
    if target.startswith(b"/") or target == b"*":
        return None
    scheme, sep, rest = target.partition(b"://")
    if not sep:
        raise BadMessageError(f"request target {target[:80]!r} is neither a path nor a URI")
    if scheme.lower() != b"http":
        raise BadMessageError(f"scheme {scheme[:20]!r} is not supported by this proxy")
    slash = len(rest)
    for sep_char in (b"/", b"?", b"#"):
        i = rest.find(sep_char)
        if 0 <= i < slash:
            slash = i
    authority = rest[:slash]
    path = rest[slash:]
    if b"#" in path:
        path = path[: path.index(b"#")]
    if not path:
        path = b"/"
    elif path.startswith(b"?"):
        path = b"/" + path
    if b"@" in authority:
        authority = authority.rpartition(b"@")[2]  # userinfo is never forwarded
    return authority, path
