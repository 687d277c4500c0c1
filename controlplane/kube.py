"""A small Kubernetes API client: in-cluster configuration, list and watch.

The control plane talks to the Kubernetes API for one thing today: watching pods so
that an injected pod leaves rotation the moment its deletion starts (see
`controlplane.inject.podwatch`). It needs list and watch of one resource, bounded and
resumable, so it carries its own client of about a hundred lines on aiohttp rather
than a Kubernetes SDK.

Configuration (`KubeConfig.from_env`), the same variables the mesh CA's TokenReview
reads (docs/identity.md): `TETHER_K8S_API_URL` (the API server; unset: not under
Kubernetes), `TETHER_K8S_TOKEN_FILE` (this process's service-account token, read again
before each request: the kubelet rotates it), `TETHER_K8S_CA_FILE` (the API's CA).
deploy/kubernetes/controlplane.yaml sets all three.

A watch is the API's streaming `?watch=1` with `resourceVersion`, `allowWatchBookmarks`
and a server-side `timeoutSeconds`: each event is one JSON line, capped in size. A
`410 Gone` (the version is too old) means list again. Every request has a timeout.
"""

from __future__ import annotations

import json
import os
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from controlplane.ca.bodies import BodyTooLargeError, read_bounded

# One watch event (a whole pod object) larger than this is refused, not buffered.
MAX_EVENT = 4 * 1024 * 1024
# A whole list (every pod of a large cluster fits; past it the watch does not start).
MAX_LIST = 256 * 1024 * 1024


class KubeError(Exception):
    """The API server refused or could not be reached."""


class Gone(KubeError):
    """410: the resourceVersion is too old; list again."""


@dataclass(frozen=True)
class KubeConfig:
    url: str
    token_file: Path | None = None
    ca_file: Path | None = None

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> KubeConfig | None:
        """The API server this process is told to use, or None."""
        e = os.environ if env is None else env
        url = e.get("TETHER_K8S_API_URL")
        if not url:
            return None
        token, ca = e.get("TETHER_K8S_TOKEN_FILE"), e.get("TETHER_K8S_CA_FILE")
        return cls(url.rstrip("/"), Path(token) if token else None, Path(ca) if ca else None)


class KubeClient:
    def __init__(self, config: KubeConfig, timeout: float = 10.0) -> None:
        self.config = config
        self.timeout = timeout
        ctx: ssl.SSLContext | bool = True
        if config.url.startswith("https://") and config.ca_file is not None:
            ctx = ssl.create_default_context(cafile=str(config.ca_file))
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=ctx, limit=4),
            timeout=aiohttp.ClientTimeout(total=None, connect=timeout, sock_read=None),
        )

    def _headers(self) -> dict[str, str]:
        headers = {"Accept": "application/json"}
        if self.config.token_file is not None:
            token = self.config.token_file.read_text().strip()
            headers["Authorization"] = f"Bearer {token}"
        return headers

    async def list(self, path: str, params: dict[str, str] | None = None) -> dict[str, Any]:
        """GET a collection (e.g. `/api/v1/pods`): its JSON object."""
        url = self.config.url + path
        try:
            async with self._session.get(
                url,
                params=params or {},
                headers=self._headers(),
                timeout=aiohttp.ClientTimeout(total=self.timeout * 3),
            ) as resp:
                if resp.status != 200:
                    raise KubeError(f"GET {path}: {resp.status} {(await resp.text())[:200]}")
                body = await read_bounded(resp.content, MAX_LIST, self.timeout * 3)
        except BodyTooLargeError:
            raise KubeError(f"GET {path}: the list is over {MAX_LIST} bytes") from None
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise KubeError(f"GET {path}: {exc}") from exc
        doc = json.loads(body)
        if not isinstance(doc, dict):
            raise KubeError(f"GET {path}: not a JSON object")
        return doc

    async def watch(
        self, path: str, resource_version: str, params: dict[str, str] | None = None,
        server_timeout: int = 300,
    ) -> AsyncIterator[dict[str, Any]]:  # fmt: skip
        """The events of one watch request: `{"type": ..., "object": ...}` each.

        Ends when the server closes the stream (its `timeoutSeconds`); raises `Gone` when
        `resource_version` is too old, `KubeError` on anything else."""
        query = dict(params or {})
        query.update(
            watch="1",
            resourceVersion=resource_version,
            allowWatchBookmarks="true",
            timeoutSeconds=str(server_timeout),
        )
        url = self.config.url + path
        try:
            async with self._session.get(
                url,
                params=query,
                headers=self._headers(),
                # The server ends the stream itself; a silent one is dead past this.
                timeout=aiohttp.ClientTimeout(
                    total=server_timeout + 30, connect=self.timeout, sock_read=server_timeout + 30
                ),
            ) as resp:
                if resp.status == 410:
                    raise Gone(f"watch {path}: 410")
                if resp.status != 200:
                    raise KubeError(f"watch {path}: {resp.status} {(await resp.text())[:200]}")
                buf = b""
                async for chunk in resp.content.iter_any():
                    buf += chunk
                    while b"\n" in buf:
                        line, _, buf = buf.partition(b"\n")
                        if line.strip():
                            yield self._event(path, line)
                    if len(buf) > MAX_EVENT:
                        raise KubeError(f"watch {path}: an event over {MAX_EVENT} bytes")
                if buf.strip():
                    yield self._event(path, buf)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise KubeError(f"watch {path}: {exc}") from exc

    @staticmethod
    def _event(path: str, line: bytes) -> dict[str, Any]:
        try:
            event = json.loads(line)
        except ValueError as exc:
            raise KubeError(f"watch {path}: a line that is not JSON") from exc
        if not isinstance(event, dict) or not isinstance(event.get("object"), dict):
            raise KubeError(f"watch {path}: an event without an object")
        if event.get("type") == "ERROR":
            status = event["object"]
            if status.get("code") == 410:
                raise Gone(f"watch {path}: {status.get('message', '410')}")
            raise KubeError(f"watch {path}: {status.get('message', status)}")
        return event

    async def close(self) -> None:
        await self._session.close()
