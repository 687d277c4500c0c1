"""`tether check`: what a user needs for the mesh to work, one line each, pass or fail
with a hint, as `linkerd check` and `istioctl analyze` do; non-zero exit on a failure.

Checks, in order (a later one is skipped when what it reads is unreachable): the
registry answers and its version, it has a leader, the control plane answers, the
mesh CA (its trust bundle, the newest root valid for more than a week; skipped when the
CA is off), every connected sidecar has acked the current
config, this host's clock agrees with the registry's and the control plane's (HTTP
`Date`), and the given local ports are free for a sidecar.
"""

from __future__ import annotations

import email.utils
import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from tether.ports import port_is_free

MAX_SKEW = 3.0  # seconds; HTTP dates have a resolution of one second
WEEK = 7 * 86400.0


@dataclass(frozen=True)
class Result:
    name: str
    ok: bool | None  # None: skipped
    detail: str
    hint: str = ""

    def lines(self) -> list[str]:
        mark = {True: "pass", False: "FAIL", None: "skip"}[self.ok]
        out = [f"[{mark}] {self.name}: {self.detail}"]
        if self.hint and self.ok is not True:
            out.append(f"       hint: {self.hint}")
        return out


@dataclass
class Reply:
    status: int
    body: Any
    date: float | None  # the server's clock, from its Date header


def fetch(url: str, token: str | None = None, timeout: float = 3.0) -> Reply:
    headers = {"Accept": "application/json"}
    if token:
        headers["X-Consul-Token"] = token
    req = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            status, raw, date = resp.status, resp.read(1 << 20), resp.headers.get("Date")
    except urllib.error.HTTPError as exc:
        status, raw, date = exc.code, exc.read(1 << 20), exc.headers.get("Date")
    try:
        body = json.loads(raw) if raw else None
    except ValueError:
        body = raw.decode("utf-8", "replace")
    parsed = email.utils.parsedate_to_datetime(date).timestamp() if date else None
    return Reply(status, body, parsed)


def clock(name: str, reply: Reply | None, now: Callable[[], float]) -> Result:
    if reply is None or reply.date is None:
        return Result(f"clock vs {name}", None, f"{name} gave no Date")
    skew = now() - reply.date
    if abs(skew) > MAX_SKEW + 1:
        return Result(
            f"clock vs {name}",
            False,
            f"this host is {skew:+.0f}s off",
            "sync the clocks (chrony / systemd-timesyncd): TTL checks, sessions "
            "and certificates depend on them",
        )
    return Result(f"clock vs {name}", True, f"within {MAX_SKEW:g}s")


def run_checks(
    registry: str,
    controlplane: str | None,
    token: str | None,
    ports: Iterable[int],
    now: Callable[[], float] = time.time,
) -> list[Result]:
    """Every check against a registry URL (`http://host:port`) and a control plane URL."""
    results: list[Result] = []
    reg: Reply | None = None
    try:
        reg = fetch(f"{registry}/v1/agent/self", token)
    except (OSError, ValueError) as exc:
        results.append(
            Result(
                "registry",
                False,
                f"{registry} unreachable: {exc}",
                "start it (tether registry) or set CONSUL_HTTP_ADDR",
            )
        )
    if reg is not None:
        if reg.status == 200 and isinstance(reg.body, dict):
            version = (reg.body.get("Config") or {}).get("Version", "?")
            results.append(Result("registry", True, f"{registry} answers, version {version}"))
        elif reg.status == 403:
            results.append(
                Result(
                    "registry",
                    False,
                    f"{registry} refused the token (403)",
                    "set CONSUL_HTTP_TOKEN to a token with agent:read",
                )
            )
        else:
            results.append(
                Result(
                    "registry",
                    False,
                    f"{registry} answered {reg.status}",
                    "is CONSUL_HTTP_ADDR a Consul HTTP API?",
                )
            )
        try:
            leader = fetch(f"{registry}/v1/status/leader", token)
            ok = leader.status == 200 and bool(leader.body)
            results.append(
                Result(
                    "registry leader",
                    ok,
                    repr(leader.body),
                    "a Consul cluster without a leader cannot write",
                )
            )
        except (OSError, ValueError) as exc:
            results.append(Result("registry leader", False, str(exc)))

    cp: Reply | None = None
    if controlplane is None:
        results.append(Result("control plane", None, "not given (--controlplane)"))
    else:
        try:
            cp = fetch(f"{controlplane}/api/v1/health", token)
            ok = cp.status == 200
            results.append(
                Result(
                    "control plane",
                    ok,
                    f"{controlplane} answered {cp.status}",
                    "is the registry it uses reachable from it?",
                )
            )
        except (OSError, ValueError) as exc:
            cp = None
            results.append(
                Result(
                    "control plane",
                    False,
                    f"{controlplane} unreachable: {exc}",
                    "start it (tether controlplane) or set --controlplane / TETHER_CONTROLPLANE",
                )
            )
    if cp is not None and cp.status == 200 and controlplane is not None:
        results.append(ca_health(controlplane, token, now))
        results.append(sidecars_acked(controlplane, token))
    else:
        results.append(Result("mesh CA", None, "the control plane is not reachable"))
    results.append(clock("registry", reg, now))
    if controlplane is not None:
        results.append(clock("control plane", cp, now))
    for port in ports:
        free = port_is_free(port)
        results.append(
            Result(
                f"port {port}",
                free,
                "free" if free else "in use on 127.0.0.1",
                f"another process holds it: give the sidecar another port "
                f"(e.g. --outbound-port 0) or stop it (ss -ltnp 'sport = :{port}')",
            )
        )
    return results


def sidecars_acked(controlplane: str, token: str | None) -> Result:
    try:
        reply = fetch(f"{controlplane}/api/v1/sidecars", token)
    except (OSError, ValueError) as exc:
        return Result("sidecars acked", False, str(exc))
    records = (reply.body or {}).get("sidecars", []) if isinstance(reply.body, dict) else []
    if reply.status in (401, 403):
        return Result(
            "sidecars acked",
            False,
            f"the control plane answered {reply.status}",
            "set CONSUL_HTTP_TOKEN to a token that may read the sidecars' status",
        )
    connected = [r for r in records if r.get("state") != "disconnected"]
    behind = [r for r in connected if r.get("state") != "acked"]
    if behind:
        names = ", ".join(
            f"{r.get('service')}/{r.get('instance')} {r.get('state')}" for r in behind[:5]
        )
        return Result(
            "sidecars acked",
            False,
            f"{len(behind)} of {len(connected)} not: {names}",
            "tether status shows why (a nack carries the sidecar's error)",
        )
    return Result(
        "sidecars acked",
        True,
        f"{len(connected)} connected, all on config version {reply.body.get('version')}",
    )


def ca_health(controlplane: str, token: str | None, now: Callable[[], float]) -> Result:
    """The mesh CA answers with its trust bundle, and the newest root is valid well past
    now (a week: time to rotate)."""
    from cryptography import x509

    try:
        reply = fetch(f"{controlplane}/api/v1/ca/bundle", token)
    except (OSError, ValueError) as exc:
        return Result("mesh CA", False, str(exc))
    body = reply.body if isinstance(reply.body, dict) else {}
    if reply.status == 503 and body.get("error") == "ca_not_configured":
        return Result(
            "mesh CA",
            None,
            "off: sidecars get no certificates",
            "set TETHER_CA_ENCRYPTION_KEY (or a key directory, or an operator CA) "
            "on the control plane: docs/identity.md",
        )
    if reply.status != 200:
        return Result(
            "mesh CA",
            False,
            f"the trust bundle answered {reply.status}: {body.get('message', body)}",
            "the control plane's log says why",
        )
    try:
        roots = [x509.load_pem_x509_certificate(p.encode()) for p in body.get("roots") or ()]
    except ValueError as exc:
        return Result("mesh CA", False, f"a root does not parse: {exc}")
    if not roots:
        return Result("mesh CA", False, "no root in the trust bundle")
    newest = max(r.not_valid_after_utc.timestamp() for r in roots)
    left = newest - now()
    if left < WEEK:
        return Result(
            "mesh CA",
            False,
            f"its newest root expires in {left / 86400:.1f} days",
            "rotate the root: POST /api/v1/ca/rotate (docs/identity.md)",
        )
    return Result(
        "mesh CA",
        True,
        f"trust domain {body.get('trustDomain')}, {len(roots)} "
        f"root(s), valid for {left / 86400:.0f} more days",
    )
