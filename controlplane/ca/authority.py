"""Who may have which identity: the bootstrap credentials a CSR comes with.

- A registry ACL token: read back through `/v1/acl/token/self` (with the token itself,
  as any Consul token may), it allows the services its `ServiceIdentities` name, in
  the namespace its binding says (`tether/ca/tokens/<AccessorID>`, written by
  `controlplane.ca.tokens.create_service_token`; `default` without one), as Consul's
  service identities do. With the registry's ACLs off (Consul's dev agent), any named
  service is allowed.
- A Kubernetes service-account token: the Kubernetes API's TokenReview says whose it
  is; it allows the service named like the account, in the account's namespace (as
  Consul's Kubernetes auth method binds them).

Consul's own endpoints ask a different question of a token, "may it write service X"
(or operator): `TokenGrant.allows` evaluates the token's policies with the registry's
rule language (`registry.acl_rules`), reading their rules with the control plane's
token. Every refusal is logged and raised as `IdentityDeniedError` (403).
"""

from __future__ import annotations

import json
import logging
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from controlplane.ca.bodies import BodyTooLargeError, read_bounded
from controlplane.ca.errors import CAError, IdentityDeniedError, KubernetesUnavailableError
from controlplane.ca.spec import KubernetesSpec
from controlplane.ca.spiffe import SpiffeId
from controlplane.ca.state import TOKEN_BINDINGS
from controlplane.errors import RegistryUnavailableError
from controlplane.store import _registry_call
from registry.acl_rules import (
    Access,
    RuleError,
    RuleSet,
    node_identity_rules,
    parse_rules,
    service_identity_rules,
)

log = logging.getLogger("tether.controlplane.ca")

GLOBAL_MANAGEMENT_ID = "00000000-0000-0000-0000-000000000001"
# The control plane's own identity lives here; no credential may ask for it.
RESERVED_NAMESPACE = "tether-system"
MAX_TOKEN_BYTES = 16 * 1024
MAX_REVIEW_BYTES = 1024 * 1024


@dataclass(frozen=True)
class TokenGrant:
    """What a registry token is: its record (None with ACLs off) and compiled rules."""

    acls_enabled: bool
    token: Mapping[str, Any] | None = None
    rules: RuleSet = field(default_factory=RuleSet)
    management: bool = False

    @property
    def accessor(self) -> str:
        return str(self.token.get("AccessorID", "")) if self.token else ""

    @property
    def services(self) -> list[str]:
        idents = (self.token or {}).get("ServiceIdentities") or []
        return [str(i.get("ServiceName")) for i in idents if isinstance(i, Mapping)]

    def allows(self, kind: str, segment: str, access: Access) -> bool:
        if not self.acls_enabled or self.management:
            return True
        return self.rules.decide(kind, segment, access) is True


class RegistryTokens:
    """Resolves registry tokens: `/v1/acl/token/self` with the caller's token, policies
    and namespace bindings with the control plane's (`client`)."""

    def __init__(self, client: Any) -> None:
        self.client = client

    async def grant(self, token: str | None, *, with_rules: bool = True) -> TokenGrant:
        headers = self.client.prepare_headers(None)
        headers.pop("X-Consul-Token", None)
        if token:
            headers["X-Consul-Token"] = token
        code, body = await self._get("/v1/acl/token/self", headers)
        if code == 401 and "acl support disabled" in body.lower():
            return TokenGrant(acls_enabled=False)
        if code == 403:
            raise IdentityDeniedError(f"the registry does not know this token ({body.strip()})")
        if code != 200:
            raise RegistryUnavailableError(f"registry answered {code} to token/self: {body}")
        info = json.loads(body)
        links = info.get("Policies") or []
        if any(link.get("ID") == GLOBAL_MANAGEMENT_ID for link in links):
            return TokenGrant(True, info, management=True)
        sets = [service_identity_rules(s) for s in TokenGrant(True, info).services]
        sets += [
            node_identity_rules(str(n.get("NodeName"))) for n in info.get("NodeIdentities") or []
        ]
        if with_rules:
            for link in links:
                sets.append(await self._policy_rules(str(link.get("ID", ""))))
        return TokenGrant(True, info, RuleSet.merge(sets))

    async def namespace_of(self, grant: TokenGrant) -> str:
        """The namespace a service token is bound to (`default` when none is)."""
        if not grant.accessor:
            return "default"
        with _registry_call():
            _, entry = await self.client.kv.get(TOKEN_BINDINGS + grant.accessor)
        if entry is None:
            return "default"
        try:
            return str(json.loads(entry["Value"])["namespace"])
        except (ValueError, KeyError, TypeError):
            log.warning("token binding %s does not decode: no namespace", grant.accessor)
            raise IdentityDeniedError("the token's namespace binding is unreadable") from None

    async def _policy_rules(self, policy_id: str) -> RuleSet:
        code, body = await self._get(
            f"/v1/acl/policy/{policy_id}", self.client.prepare_headers(None)
        )
        if code != 200:
            # The control plane's token may not read policies: those grant nothing here.
            log.warning("policy %s unreadable with the control plane's token (%d)", policy_id, code)
            return RuleSet()
        try:
            return parse_rules(str(json.loads(body).get("Rules") or ""))
        except (ValueError, RuleError) as exc:
            log.warning("policy %s: rules do not parse: %s", policy_id, exc)
            return RuleSet()

    async def _get(self, path: str, headers: dict[str, str]) -> tuple[int, str]:
        with _registry_call():
            code, body = await self.client.http.get(
                lambda r: (int(r.code), str(r.body)), path, headers=headers
            )
        return code, body


class KubernetesReviewer:
    """Asks the Kubernetes API whose a service-account token is (TokenReview v1)."""

    def __init__(self, spec: KubernetesSpec) -> None:
        self.spec = spec
        self._ssl: ssl.SSLContext | None = None
        if spec.api_url.startswith("https://"):
            self._ssl = ssl.create_default_context(
                cafile=str(spec.ca_file) if spec.ca_file else None
            )

    async def review(self, token: str) -> tuple[str, str]:
        """(namespace, service account) of a valid token; `IdentityDeniedError` else."""
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.spec.token_file is not None:
            try:
                own = self.spec.token_file.read_text().strip()  # rotated by the kubelet
            except OSError as exc:
                raise CAError(f"TETHER_K8S_TOKEN_FILE: {exc}") from None
            headers["Authorization"] = f"Bearer {own}"
        review: dict[str, Any] = {"token": token}
        if self.spec.audiences:
            review["audiences"] = list(self.spec.audiences)
        body = {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenReview",
            "spec": review,
        }
        url = f"{self.spec.api_url}/apis/authentication.k8s.io/v1/tokenreviews"
        timeout = aiohttp.ClientTimeout(total=self.spec.timeout)
        try:
            async with aiohttp.ClientSession(timeout=timeout) as http:
                async with http.post(
                    url,
                    json=body,
                    headers=headers,
                    ssl=self._ssl if self._ssl is not None else True,
                ) as resp:
                    raw = await read_bounded(resp.content, MAX_REVIEW_BYTES, self.spec.timeout)
                    status = resp.status
        except BodyTooLargeError:
            raise KubernetesUnavailableError(
                "the Kubernetes API's TokenReview is too large"
            ) from None
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise KubernetesUnavailableError(f"the Kubernetes API is unreachable: {exc}") from exc
        text = raw.decode("utf-8", "replace")
        if status != 201 and status != 200:
            raise KubernetesUnavailableError(
                f"the Kubernetes API answered {status} to a TokenReview: {text[:200]}"
            )
        try:
            result = json.loads(text).get("status") or {}
        except ValueError:
            raise KubernetesUnavailableError(
                "the Kubernetes API's TokenReview is not JSON"
            ) from None
        if not result.get("authenticated"):
            raise IdentityDeniedError(
                f"Kubernetes did not authenticate the token: {result.get('error') or 'refused'}"
            )
        if self.spec.audiences and not set(result.get("audiences") or []) & set(
            self.spec.audiences
        ):
            raise IdentityDeniedError("the Kubernetes token is not for this audience")
        username = str((result.get("user") or {}).get("username", ""))
        parts = username.split(":")
        if len(parts) != 4 or parts[:2] != ["system", "serviceaccount"]:
            raise IdentityDeniedError(f"{username!r} is not a service account")
        return parts[2], parts[3]


class IdentityAuthority:
    """Decides whether a CSR's credential allows the identity it asks for."""

    def __init__(self, tokens: RegistryTokens, kubernetes: KubernetesReviewer | None) -> None:
        self.tokens = tokens
        self.kubernetes = kubernetes

    async def authorize(
        self,
        wanted: SpiffeId,
        *,
        token: str | None,
        kubernetes_token: str | None = None,
        peer: str = "-",
    ) -> str:
        """Why `wanted` is allowed (for the log), or `IdentityDeniedError` (logged)."""
        try:
            return await self._decide(wanted, token, kubernetes_token)
        except IdentityDeniedError as exc:
            log.warning("mesh CA: refused %s to %s: %s", wanted, peer, exc)
            raise

    async def _decide(self, wanted: SpiffeId, token: str | None, k8s: str | None) -> str:
        if wanted.namespace == RESERVED_NAMESPACE:
            raise IdentityDeniedError(f"namespace {RESERVED_NAMESPACE} is the control plane's")
        if k8s is not None:
            if self.kubernetes is None:
                raise IdentityDeniedError(
                    "this control plane does not accept Kubernetes tokens (no TETHER_K8S_API_URL)"
                )
            if len(k8s) > MAX_TOKEN_BYTES:
                raise IdentityDeniedError("the Kubernetes token is too long")
            ns, account = await self.kubernetes.review(k8s)
            if (ns, account) != (wanted.namespace, wanted.service):
                raise IdentityDeniedError(
                    f"service account {ns}/{account} may only be "
                    f"{account} in namespace {ns}, not {wanted.service} in {wanted.namespace}"
                )
            return f"Kubernetes service account {ns}/{account}"
        grant = await self.tokens.grant(token, with_rules=False)
        if not grant.acls_enabled:
            return "the registry's ACLs are off"
        if wanted.service not in grant.services:
            named = ", ".join(grant.services) or "no service"
            raise IdentityDeniedError(
                f"token {grant.accessor or 'anonymous'} names {named}, not {wanted.service}"
            )
        ns = await self.tokens.namespace_of(grant)
        if ns != wanted.namespace:
            raise IdentityDeniedError(
                f"token {grant.accessor} is for namespace {ns}, not {wanted.namespace}"
            )
        return f"token {grant.accessor} (service identity {wanted.service})"
