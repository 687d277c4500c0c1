"""Who may use the control plane: each caller's own registry token, judged by the registry.

The control plane holds a registry token of its own (`CONSUL_HTTP_TOKEN`), which it uses
for its own reads and writes: the KV watch, the catalog, the push status. It never
lends that token to a caller. Every request that reads or changes policy is checked with
the token the *caller* sent (`X-Tether-Token`, `Authorization: Bearer`, or
`X-Consul-Token`), by asking the registry what that token may do
(`POST /v1/internal/acl/authorize`, Consul's own question for exactly this): with ACLs
on, no token is a 401 and a token without the permission a 403, before anything is read
or written. With ACLs off (the registry answers "ACL support disabled", as a dev agent
does) nothing is asked of the caller.

The client that carries callers' tokens has no default token at all: py-consul reads
`CONSUL_HTTP_TOKEN` from the environment in preference to its constructor argument, so
the control plane clears it after construction (`caller_client`), and this module builds
its own token header rather than using the client's.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import consul.aio

from controlplane.errors import (
    PermissionDeniedError,
    RegistryUnavailableError,
    UnauthorizedError,
)
from controlplane.store import PREFIX as POLICY_PREFIX
from controlplane.store import _raw_response as code_and_body
from controlplane.store import _registry_call as registry_call

# Where the push server keeps per-sidecar status (controlplane/push.py writes it).
STATUS_PREFIX = "tether/push/sidecars/"
AUTHORIZE_PATH = "/v1/internal/acl/authorize"
# Consul answers at most this many questions per call.
MAX_QUESTIONS = 64


@dataclass(frozen=True)
class Permission:
    """One thing a token may do, in Consul's ACL terms (resource, segment, access)."""

    resource: str
    segment: str
    access: str

    def to_dict(self) -> dict[str, str]:
        return {"Resource": self.resource, "Segment": self.segment, "Access": self.access}

    def __str__(self) -> str:
        if self.resource == "key":
            return f'key_prefix "{self.segment}" {self.access}'
        return f'{self.resource} "{self.segment}" {self.access}'


# Reading policy (resources, diffs, validation against what is stored).
READ_POLICY = Permission("key", POLICY_PREFIX, "read")
# Changing policy: what every apply and delete writes (the documents and the version).
WRITE_POLICY = Permission("key", POLICY_PREFIX, "write")
# Reading every sidecar's push state (`tether status`): ids, zones, NACK errors.
READ_STATUS = Permission("key", STATUS_PREFIX, "read")
# Reading the mesh's traffic numbers (`tether top`, the dashboard); replicas write them
# under this prefix (controlplane/meshstats.py).
STATS_PREFIX = "tether/push/stats/"
READ_STATS = Permission("key", STATS_PREFIX, "read")
# Reading the registry's services and instances (the dashboard's service pages).
READ_SERVICES = Permission("service", "", "read")


def write_service(name: str) -> Permission:
    """What a sidecar of `name` needs: the token that may register it (Consul's rule for
    a service's proxies)."""
    return Permission("service", name, "write")


def caller_token(headers: Mapping[str, str]) -> str | None:
    """The caller's registry token: X-Tether-Token, X-Consul-Token, or a Bearer header."""
    tok = headers.get("X-Tether-Token") or headers.get("X-Consul-Token")
    if tok:
        return tok.strip() or None
    auth = headers.get("Authorization", "")
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip() or None
    return None


def caller_client(host: str, port: int, scheme: str) -> Any:
    """A registry client with no token of its own: every call carries a caller's, or none."""
    client = consul.aio.Consul(host=host, port=port, scheme=scheme)
    # py-consul takes CONSUL_HTTP_TOKEN from the environment over the (absent) argument;
    # the control plane runs with its own token there, which must never reach a write.
    client.token = None
    return client


class RegistryAuthorizer:
    """Asks the registry what a caller's token may do; nothing else is consulted."""

    def __init__(self, client: Any) -> None:
        # `client` must be a `caller_client`: its own token is never used here anyway.
        self.client = client

    async def require(self, token: str | None, *wanted: Permission) -> None:
        """Return if `token` has every permission in `wanted` (or ACLs are off); else
        401 (no token) or 403 naming the first missing permission."""
        for start in range(0, max(len(wanted), 1), MAX_QUESTIONS):
            chunk = wanted[start : start + MAX_QUESTIONS]
            code, body = await self._ask(token, chunk)
            if code == 401 and "acl support disabled" in body.lower():
                return  # ACLs off: the registry lets anyone do anything, so do we
            if token is None:
                raise UnauthorizedError(
                    "the registry has ACLs on: send your registry token "
                    "(X-Tether-Token, Authorization: Bearer, or X-Consul-Token)"
                )
            if code == 403:
                raise PermissionDeniedError(f"the registry refused the token: {body.strip()}")
            if code != 200:
                raise RegistryUnavailableError(
                    f"the registry could not check the token ({code}): {body.strip()[:200]}"
                )
            self._check(chunk, body)

    async def _ask(self, token: str | None, wanted: Sequence[Permission]) -> tuple[int, str]:
        headers = {"Content-Type": "application/json"}
        if token is not None:
            headers["X-Consul-Token"] = token
        data = json.dumps([p.to_dict() for p in wanted])
        with registry_call():
            code, body = await self.client.http.post(
                code_and_body, AUTHORIZE_PATH, data=data, headers=headers
            )
        return code, body

    @staticmethod
    def _check(wanted: Sequence[Permission], body: str) -> None:
        try:
            answers = json.loads(body)
        except ValueError as exc:
            raise RegistryUnavailableError(f"the registry's answer is not JSON: {exc}") from exc
        if not isinstance(answers, list) or len(answers) != len(wanted):
            raise RegistryUnavailableError("the registry's authorization does not match")
        for perm, answer in zip(wanted, answers, strict=True):
            if not (isinstance(answer, dict) and answer.get("Allow") is True):
                raise PermissionDeniedError(f"the token may not do this: it needs {perm}")
