"""`tether token create --service S [--namespace N]`: a registry ACL token a sidecar of S
bootstraps its identity with.

The token is Consul's own kind: a service identity for S (write on S and its sidecar
proxy, read on the catalog), so it also registers the instance. Consul OSS tokens carry
no namespace, so the namespace is a binding the CA reads, `tether/ca/tokens/<AccessorID>`
= `{"service", "namespace"}`; a token without one is for `default`. The caller's
client must hold a token that may create ACL tokens (acl:write) and write that key.
"""

from __future__ import annotations

import json
import re
from typing import Any

from controlplane.ca.errors import CAError
from controlplane.ca.state import TOKEN_BINDINGS
from controlplane.errors import BadRequestError
from controlplane.store import _registry_call

# Consul's service identity names (agent/structs/acl.go isValidServiceIdentityName).
_SERVICE = re.compile(r"^[a-z0-9]([a-z0-9\-_]*[a-z0-9])?$")
_NAMESPACE = re.compile(r"^[A-Za-z0-9._-]{1,63}$")


async def create_service_token(consul: Any, service: str, namespace: str = "default") -> str:
    """Create the token and its namespace binding; return its SecretID. Nothing is left
    behind when either write is refused."""
    if not _SERVICE.match(service):
        raise BadRequestError(
            f"--service {service!r}: lowercase letters, digits, '-' and '_' "
            "(a Consul service identity name)"
        )
    if not _NAMESPACE.match(namespace) or namespace in (".", ".."):
        raise BadRequestError(f"--namespace {namespace!r} is not a namespace name")
    with _registry_call():
        token = await consul.acl.token.create(
            description=f"tether: sidecars of {service} in namespace {namespace}",
            service_identities=[{"ServiceName": service}],
        )
    accessor = str(token["AccessorID"])
    binding = json.dumps({"service": service, "namespace": namespace}, separators=(",", ":"))
    try:
        with _registry_call():
            ok = await consul.kv.put(TOKEN_BINDINGS + accessor, binding, cas=0)
        if not ok:
            raise CAError(f"a binding for token {accessor} already exists")
    except Exception:
        with _registry_call():
            await consul.acl.token.delete(accessor)
        raise
    return str(token["SecretID"])
