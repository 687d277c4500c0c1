"""A small blocking client of the control plane's REST API, for the `tether` command.

Blocking (urllib) on purpose: the command does one thing and exits, and importing
aiohttp would only slow its start. Errors come back as `ApiError` carrying the status,
the error code and, for rejected documents, the problems (file, document, path, line).
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from typing import Any

from controlplane.schema import Problem, ResourceKey

DEFAULT_URL = "http://127.0.0.1:15010"


class ApiError(Exception):
    def __init__(
        self, status: int, code: str, message: str, problems: Sequence[Problem] = ()
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.problems = list(problems)


def default_url() -> str:
    return os.environ.get("TETHER_CONTROLPLANE") or DEFAULT_URL


def default_token() -> str | None:
    return os.environ.get("TETHER_TOKEN") or os.environ.get("CONSUL_HTTP_TOKEN") or None


class ControlPlaneClient:
    def __init__(self, url: str | None = None, token: str | None = None, timeout: float = 30.0):
        self.url = (url or default_url()).rstrip("/")
        if "://" not in self.url:
            self.url = "http://" + self.url
        self.token = token
        self.timeout = timeout

    def __repr__(self) -> str:
        return f"<ControlPlaneClient {self.url}>"

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        query: dict[str, str] | None = None,
    ) -> Any:
        url = f"{self.url}/api/v1{path}"
        if query:
            url += "?" + urllib.parse.urlencode(query)
        data = None
        headers = {"Accept": "application/json"}
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        if self.token:
            headers["X-Tether-Token"] = self.token
        req = urllib.request.Request(url, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                return json.loads(resp.read() or b"null")
        except urllib.error.HTTPError as exc:
            raw = exc.read()
            try:
                err = json.loads(raw)
            except ValueError:
                err = {"message": raw.decode("utf-8", "replace") or exc.reason}
            if not isinstance(err, dict):
                err = {"message": str(err)}
            problems = [Problem.from_dict(p) for p in err.get("problems") or ()]
            raise ApiError(
                exc.code, str(err.get("error", "")), str(err.get("message", "")), problems
            ) from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            hint = (
                "is one running? `tether up` or `tether controlplane` starts one; "
                "else pass --controlplane URL or set TETHER_CONTROLPLANE"
            )
            raise ApiError(
                0, "unreachable", f"control plane at {self.url}: {reason} ({hint})"
            ) from None

    # -- resources ----------------------------------------------------------------------

    @staticmethod
    def _files(files: Sequence[tuple[str, str]]) -> dict[str, Any]:
        return {"files": [{"name": n, "text": t} for n, t in files]}

    def apply(self, files: Sequence[tuple[str, str]], dry_run: bool = False) -> Any:
        query = {"dryRun": "true"} if dry_run else None
        return self.request("POST", "/apply", self._files(files), query)

    def diff(self, files: Sequence[tuple[str, str]]) -> Any:
        return self.request("POST", "/diff", self._files(files))

    def delete_files(self, files: Sequence[tuple[str, str]], dry_run: bool = False) -> Any:
        query = {"dryRun": "true"} if dry_run else None
        return self.request("POST", "/delete", self._files(files), query)

    def delete(self, key: ResourceKey, dry_run: bool = False) -> Any:
        query = {"dryRun": "true"} if dry_run else None
        return self.request("DELETE", _resource_path(key), None, query)

    def get(self, key: ResourceKey) -> Any:
        return self.request("GET", _resource_path(key))

    def list(self, kind: str | None = None, namespace: str | None = None) -> Any:
        path = f"/resources/{kind}" if kind else "/resources"
        query = {"namespace": namespace} if namespace else None
        return self.request("GET", path, None, query)

    def version(self) -> Any:
        return self.request("GET", "/version")


def _resource_path(key: ResourceKey) -> str:
    q = urllib.parse.quote
    return f"/resources/{q(key.kind)}/{q(key.namespace or '_')}/{q(key.name)}"
