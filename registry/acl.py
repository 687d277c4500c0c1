"""Who may do what: tokens, their policies, and the decision for each request.

With no management token configured, ACLs are off and everything is allowed. With one,
ACLs are on with Consul's default-deny: a request's token (X-Consul-Token, a Bearer
header or `?token=`; none means the anonymous token) resolves to a `Grant` built from
its policies' rules and its service/node identities; what no rule allows is denied,
an unknown token is denied everything ("ACL not found"), and the management token (or
any token linked to the builtin global-management policy) may do everything.

Every handler asks before reading or changing state: `require(request, kind, segment,
access)` raises 403, `grant(request).allows(...)` answers for filtering lists. Kinds
are Consul's rule names ("key", "service", "node", "session", "event", "agent",
"query", "operator", "acl", ...). Tokens and policies live in the store (tables
`acl_tokens`, `acl_policies`, resource `acl`), so they survive restarts.
"""

from __future__ import annotations

import base64
import hashlib
import time
import uuid
from typing import Any, Literal

from aiohttp import web

from registry.acl_rules import (
    RuleError,
    RuleSet,
    node_identity_rules,
    parse_rules,
    service_identity_rules,
)
from registry.errors import PermissionDeniedError
from registry.store import Obj, Store, Txn

Access = Literal["read", "write", "list"]

GLOBAL_MANAGEMENT_ID = "00000000-0000-0000-0000-000000000001"
GLOBAL_MANAGEMENT_NAME = "global-management"
ANONYMOUS_ID = "00000000-0000-0000-0000-000000000002"
ANONYMOUS_SECRET = "anonymous"
TOKENS = "acl_tokens"
POLICIES = "acl_policies"
RESOURCE = "acl"


def request_token(request: web.Request) -> str | None:
    """The token a request carries: X-Consul-Token, a Bearer header, or ?token=."""
    tok = request.headers.get("X-Consul-Token")
    if tok:
        return tok
    auth = request.headers.get("Authorization", "")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip() or None
    return request.query.get("token") or None


def now_rfc3339() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def content_hash(*parts: Any) -> str:
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=32).digest()
    return base64.b64encode(digest).decode("ascii")


class Grant:
    """What one token may do."""

    def __init__(
        self, rules: RuleSet | None, *, management: bool = False, token: Obj | None = None
    ) -> None:
        self.rules = rules or RuleSet()
        self.management = management
        self.token = token

    def allows(self, kind: str, segment: str, access: Access) -> bool:
        if self.management:
            return True
        return self.rules.decide(kind, segment, access) is True

    def write_prefix(self, kind: str, prefix: str) -> bool:
        """Write on every `kind` under `prefix` (recursive deletes)."""
        if self.management:
            return True
        return self.rules.decide_write_prefix(kind, prefix) is True

    def __repr__(self) -> str:
        who = self.token["AccessorID"] if self.token else "-"
        return f"<Grant {who} management={self.management}>"


ALLOW_ALL = Grant(None, management=True)
_GRANT_KEY: web.RequestKey[Grant] = web.RequestKey("tether_acl_grant", Grant)


class UnknownTokenGrant(Grant):
    """A token secret nobody issued: every decision is a 403 "ACL not found"."""

    def __init__(self) -> None:
        super().__init__(None)


class Authorizer:
    def __init__(self, store: Store, management_token: str | None) -> None:
        self.store = store
        self.management_token = management_token
        self._cache: dict[str | None, Grant] = {}
        self._cache_index = -1
        self._by_secret: dict[str, str] = {}
        if management_token is not None:
            self.bootstrap(management_token)

    @property
    def enabled(self) -> bool:
        return self.management_token is not None

    def is_management(self, token: str | None) -> bool:
        return self.grant_for(token).management

    # -- bootstrap -----------------------------------------------------------------------

    def bootstrap(self, management_token: str) -> None:
        """The builtin policy, the anonymous token and a token entry for the management
        secret, created once (Consul's `initial_management`)."""
        store = self.store
        tokens = store.table(TOKENS).values()
        have_secret = any(t.get("SecretID") == management_token for t in tokens)
        if (
            store.get(POLICIES, GLOBAL_MANAGEMENT_ID) is not None
            and store.get(TOKENS, ANONYMOUS_ID) is not None
            and have_secret
        ):
            return
        with store.write() as txn:
            if txn.get(POLICIES, GLOBAL_MANAGEMENT_ID) is None:
                rules = 'acl = "write"\noperator = "write"\nkey_prefix "" { policy = "write" }'
                self.put_policy(
                    txn,
                    {
                        "ID": GLOBAL_MANAGEMENT_ID,
                        "Name": GLOBAL_MANAGEMENT_NAME,
                        "Description": "Builtin Policy that grants unlimited access",
                        "Rules": rules,
                        "Datacenters": [],
                    },
                )
            if txn.get(TOKENS, ANONYMOUS_ID) is None:
                self.put_token(
                    txn,
                    {
                        "AccessorID": ANONYMOUS_ID,
                        "SecretID": ANONYMOUS_SECRET,
                        "Description": "Anonymous Token",
                        "Policies": [],
                        "Local": False,
                    },
                )
            if not have_secret:
                self.put_token(
                    txn,
                    {
                        "AccessorID": str(uuid.uuid4()),
                        "SecretID": management_token,
                        "Description": "Initial Management Token",
                        "Policies": [{"ID": GLOBAL_MANAGEMENT_ID}],
                        "Local": False,
                    },
                )

    # -- state writes (used by acl_api) --------------------------------------------------

    def put_policy(self, txn: Txn, policy: Obj) -> Obj:
        old = txn.get(POLICIES, policy["ID"])
        obj = {
            "ID": policy["ID"],
            "Name": policy["Name"],
            "Description": policy.get("Description", ""),
            "Rules": policy.get("Rules", ""),
            "Datacenters": policy.get("Datacenters") or None,
            "Hash": content_hash(policy["Name"], policy.get("Rules", "")),
            "CreateIndex": old["CreateIndex"] if old is not None else txn.index,
            "ModifyIndex": txn.index,
        }
        txn.put(POLICIES, obj["ID"], obj)
        txn.touch(RESOURCE)
        return obj

    def put_token(self, txn: Txn, token: Obj) -> Obj:
        old = txn.get(TOKENS, token["AccessorID"])
        obj = {
            "AccessorID": token["AccessorID"],
            "SecretID": token["SecretID"],
            "Description": token.get("Description", ""),
            "Policies": [{"ID": p["ID"]} for p in token.get("Policies") or []],
            "ServiceIdentities": token.get("ServiceIdentities") or [],
            "NodeIdentities": token.get("NodeIdentities") or [],
            "Local": bool(token.get("Local", False)),
            "CreateTime": old["CreateTime"] if old is not None else now_rfc3339(),
            "Hash": content_hash(
                token.get("Description", ""),
                token.get("Policies"),
                token.get("ServiceIdentities"),
                token.get("NodeIdentities"),
            ),
            "CreateIndex": old["CreateIndex"] if old is not None else txn.index,
            "ModifyIndex": txn.index,
        }
        txn.put(TOKENS, obj["AccessorID"], obj)
        txn.touch(RESOURCE)
        return obj

    # -- reads ---------------------------------------------------------------------------

    def _fresh(self) -> None:
        idx = self.store.index_of(RESOURCE)
        if idx != self._cache_index:
            self._cache.clear()
            self._by_secret = {t["SecretID"]: acc for acc, t in self.store.table(TOKENS).items()}
            self._cache_index = idx

    def token_by_secret(self, secret: str) -> Obj | None:
        self._fresh()
        acc = self._by_secret.get(secret)
        return self.store.get(TOKENS, acc) if acc is not None else None

    def policy_by_name(self, name: str) -> Obj | None:
        for p in self.store.table(POLICIES).values():
            if p["Name"] == name:
                return p
        return None

    def token_view(self, token: Obj) -> Obj:
        """A token as Consul answers it: policy links with current names, dangling ones
        dropped, empty identity lists omitted."""
        out = {k: v for k, v in token.items() if k not in ("ServiceIdentities", "NodeIdentities")}
        links = []
        for link in token.get("Policies") or []:
            pol = self.store.get(POLICIES, link["ID"])
            if pol is not None:
                links.append({"ID": pol["ID"], "Name": pol["Name"]})
        if links:
            out["Policies"] = links
        else:
            out.pop("Policies", None)
        for k in ("ServiceIdentities", "NodeIdentities"):
            if token.get(k):
                out[k] = token[k]
        return out

    def grant_for(self, secret: str | None) -> Grant:
        if self.management_token is None:
            return ALLOW_ALL
        if secret is not None and secret == self.management_token:
            return ALLOW_ALL
        self._fresh()
        cached = self._cache.get(secret)
        if cached is not None:
            return cached
        if secret is None:
            token = self.store.get(TOKENS, ANONYMOUS_ID)
        else:
            token = self.token_by_secret(secret)
        grant = UnknownTokenGrant() if token is None else self._compile(token)
        self._cache[secret] = grant
        return grant

    def _compile(self, token: Obj) -> Grant:
        sets: list[RuleSet] = []
        for link in token.get("Policies") or []:
            if link["ID"] == GLOBAL_MANAGEMENT_ID:
                return Grant(None, management=True, token=token)
            pol = self.store.get(POLICIES, link["ID"])
            if pol is None:
                continue
            try:
                sets.append(parse_rules(pol.get("Rules", "")))
            except RuleError:
                continue  # validated on write; a bad stored policy grants nothing
        for ident in token.get("ServiceIdentities") or []:
            sets.append(service_identity_rules(ident["ServiceName"]))
        for ident in token.get("NodeIdentities") or []:
            sets.append(node_identity_rules(ident["NodeName"]))
        return Grant(RuleSet.merge(sets), token=token)

    def grant(self, request: web.Request) -> Grant:
        """The request's grant (resolved once per request); 403 for an unknown token."""
        if _GRANT_KEY in request:
            return request[_GRANT_KEY]
        grant = self.grant_for(request_token(request))
        if isinstance(grant, UnknownTokenGrant):
            raise PermissionDeniedError("ACL not found")
        request[_GRANT_KEY] = grant
        return grant

    def allows(self, request: web.Request, kind: str, segment: str, access: Access) -> bool:
        return self.grant(request).allows(kind, segment, access)

    def require(self, request: web.Request, kind: str, segment: str, access: Access) -> None:
        """Raise 403 unless the request's token grants `access` on `kind`/`segment`."""
        if not self.grant(request).allows(kind, segment, access):
            raise PermissionDeniedError()
