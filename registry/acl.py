"""Who may do what: the management token, and (later) ACL tokens and policies.

Every handler that reads or changes state asks `Authorizer.require` first, naming the
resource kind (Consul's rule names: "service", "node", "key", "session", "event",
"acl", "agent", "operator") and the segment (a service name, a KV key); a denial is a
403 and nothing changes.
"""

from __future__ import annotations

from typing import Literal

from aiohttp import web

from registry.errors import PermissionDeniedError
from registry.store import Store

Access = Literal["read", "write"]


def request_token(request: web.Request) -> str | None:
    """The token a request carries: X-Consul-Token, a Bearer header, or ?token=."""
    tok = request.headers.get("X-Consul-Token")
    if tok:
        return tok
    auth = request.headers.get("Authorization", "")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip() or None
    return request.query.get("token") or None


class Authorizer:
    def __init__(self, store: Store, management_token: str | None) -> None:
        self.store = store
        self.management_token = management_token

    @property
    def enabled(self) -> bool:
        return self.management_token is not None

    def is_management(self, token: str | None) -> bool:
        return self.management_token is None or token == self.management_token

    def require(self, request: web.Request, kind: str, segment: str, access: Access) -> None:
        """Raise 403 unless the request's token grants `access` on `kind`/`segment`."""
        if self.management_token is None:
            return
        token = request_token(request)
        if token == self.management_token:
            return
        if access == "read":
            return
        raise PermissionDeniedError()
