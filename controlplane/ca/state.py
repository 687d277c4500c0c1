"""The CA's state in the registry KV, read and written with check-and-set.

    tether/ca/roots    every trusted root (JSON): certificates, key references, which
                       one signs, when the others were rotated out
    tether/ca/serial   the next leaf serial number, and per root the NotAfter of the
                       last leaf it signed (when a rotated-out root may leave)

Replicas agree through these two keys only. The roots key is created with `cas=0`, so of
two replicas starting at once one root wins and the other adopts it. A serial is claimed
in one transaction that also checks the roots key's index: a leaf is never signed by a
root that was rotated out meanwhile, and a rotated-out root's last leaf is always
counted. Signing does not touch the roots key, so watchers of the roots (the trust
bundle) wake only when the roots change.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from controlplane.ca.errors import CAError
from controlplane.store import _registry_call

log = logging.getLogger("tether.controlplane.ca")

PREFIX = "tether/ca/"
ROOTS_KEY = PREFIX + "roots"
SERIAL_KEY = PREFIX + "serial"
# Keys of service tokens' namespace bindings (controlplane.ca.tokens).
TOKEN_BINDINGS = PREFIX + "tokens/"


def iso(t: dt.datetime) -> str:
    return t.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_iso(text: str) -> dt.datetime:
    return dt.datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.UTC)


@dataclass(frozen=True)
class RootRecord:
    """One trusted root. `signing_pem` signs leaves: the root itself (built-in) or the
    operator's CA certificate; `intermediate_pems` go out with every leaf it signs (the
    operator's chain below the root, and the cross-signed root after a rotation)."""

    id: str
    name: str
    root_pem: str
    signing_pem: str
    key: Mapping[str, str]
    provider: str
    serial: int
    intermediate_pems: tuple[str, ...] = ()
    active: bool = True
    rotated_out_at: str | None = None
    create_index: int = 0
    modify_index: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "root_pem": self.root_pem,
            "signing_pem": self.signing_pem,
            "key": dict(self.key),
            "provider": self.provider,
            "serial": self.serial,
            "intermediate_pems": list(self.intermediate_pems),
            "active": self.active,
            "rotated_out_at": self.rotated_out_at,
            "create_index": self.create_index,
            "modify_index": self.modify_index,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RootRecord:
        return cls(
            id=str(d["id"]),
            name=str(d["name"]),
            root_pem=str(d["root_pem"]),
            signing_pem=str(d["signing_pem"]),
            key={str(k): str(v) for k, v in dict(d["key"]).items()},
            provider=str(d["provider"]),
            serial=int(d["serial"]),
            intermediate_pems=tuple(str(p) for p in d.get("intermediate_pems") or ()),
            active=bool(d.get("active")),
            rotated_out_at=d.get("rotated_out_at"),
            create_index=int(d.get("create_index") or 0),
            modify_index=int(d.get("modify_index") or 0),
        )


@dataclass(frozen=True)
class RootsState:
    """What `tether/ca/roots` holds, and its ModifyIndex (0: not created yet)."""

    cluster_id: str = ""
    trust_domain: str = ""
    roots: tuple[RootRecord, ...] = ()
    index: int = 0

    @property
    def active(self) -> RootRecord | None:
        return next((r for r in self.roots if r.active), None)

    def encode(self) -> str:
        return json.dumps(
            {
                "cluster_id": self.cluster_id,
                "trust_domain": self.trust_domain,
                "roots": [r.to_dict() for r in self.roots],
            },
            separators=(",", ":"),
        )

    @classmethod
    def decode(cls, raw: Any, index: int) -> RootsState:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else str(raw or "")
        d = json.loads(text)
        return cls(
            cluster_id=str(d["cluster_id"]),
            trust_domain=str(d["trust_domain"]),
            roots=tuple(RootRecord.from_dict(r) for r in d["roots"]),
            index=index,
        )

    def with_roots(self, roots: tuple[RootRecord, ...]) -> RootsState:
        """`roots` stamped for the write after this state: a root new or changed in it
        gets the index this write is based on, plus one (stable, and increasing)."""
        stamp = self.index + 1
        old = {r.id: r for r in self.roots}
        out = []
        for r in roots:
            before = old.get(r.id)
            if before is None:
                r = replace(r, create_index=stamp, modify_index=stamp)
            elif before != r:
                r = replace(r, modify_index=stamp)
            out.append(r)
        return replace(self, roots=tuple(out))


@dataclass(frozen=True)
class SerialState:
    next: int = 1
    last_leaf_not_after: Mapping[str, str] = field(default_factory=dict)
    index: int = 0

    def encode(self) -> str:
        return json.dumps(
            {"next": self.next, "last_leaf_not_after": dict(self.last_leaf_not_after)},
            separators=(",", ":"),
        )

    @classmethod
    def decode(cls, raw: Any, index: int) -> SerialState:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else str(raw or "")
        d = json.loads(text)
        return cls(int(d["next"]), dict(d.get("last_leaf_not_after") or {}), index)


class RootsChangedError(CAError):
    """The roots changed between reading them and claiming a serial: read again."""


class CAStateStore:
    """CAS reads and writes of the two keys. `client` is the control plane's own
    registry client; writes an operator asks for (a rotation) pass the caller's token,
    so the registry's ACLs decide who may change the roots."""

    def __init__(self, client: Any, writer: Any | None = None) -> None:
        self.client = client
        # No default token: a write made for a caller carries only the caller's.
        self.writer = writer

    async def roots(self) -> RootsState:
        """The roots as stored now (a consistent read)."""
        _, state = await self.watch_roots(None, None)
        return state

    async def watch_roots(self, index: int | None, wait: str | None) -> tuple[int, RootsState]:
        """The registry's index for the roots key and the roots; with `index`, a
        blocking query (Consul's `index` and `wait`) that returns once they change."""
        with _registry_call():
            idx, entry = await self.client.kv.get(
                ROOTS_KEY,
                index=index,
                wait=wait,
                consistency=None if index else "consistent",
            )
        if entry is None:
            return int(idx or 0), RootsState()
        try:
            return int(idx or 0), RootsState.decode(entry.get("Value"), int(entry["ModifyIndex"]))
        except (ValueError, KeyError, TypeError) as exc:
            raise CAError(f"{ROOTS_KEY} does not decode: {exc}") from exc

    async def write_roots(
        self, state: RootsState, token: str | None = None, *, as_caller: bool = False
    ) -> bool:
        """Replace the roots if they are still at `state.index` (0: create). With
        `as_caller`, the write carries `token` alone (none: the anonymous token)."""
        client = self.client
        if as_caller:
            if self.writer is None:
                raise CAError("no registry client without a token of its own for callers' writes")
            client = self.writer
        with _registry_call():
            ok = await client.kv.put(ROOTS_KEY, state.encode(), cas=state.index, token=token)
        return bool(ok)

    async def serial(self) -> SerialState:
        with _registry_call():
            _, entry = await self.client.kv.get(SERIAL_KEY, consistency="consistent")
        if entry is None:
            return SerialState()
        try:
            return SerialState.decode(entry.get("Value"), int(entry["ModifyIndex"]))
        except (ValueError, KeyError, TypeError) as exc:
            raise CAError(f"{SERIAL_KEY} does not decode: {exc}") from exc

    async def claim_serial(
        self, roots: RootsState, root_id: str, not_after: dt.datetime, attempts: int = 32
    ) -> int:
        """The next serial for a leaf of `root_id` valid until `not_after`, claimed in
        one transaction with a check that the roots are still at `roots.index`."""
        for _ in range(attempts):
            cur = await self.serial()
            last = dict(cur.last_leaf_not_after)
            prev = last.get(root_id)
            if prev is None or parse_iso(prev) < not_after:
                last[root_id] = iso(not_after)
            nxt = SerialState(cur.next + 1, last)
            ops = [
                {"KV": {"Verb": "check-index", "Key": ROOTS_KEY, "Index": roots.index}},
                {
                    "KV": {
                        "Verb": "cas",
                        "Key": SERIAL_KEY,
                        "Index": cur.index,
                        "Value": base64.b64encode(nxt.encode().encode()).decode(),
                    }
                },
            ]
            code, body = await self._txn(ops)
            if code == 200:
                return cur.next
            if code != 409:
                raise CAError(f"the registry answered {code} to a serial claim: {body}")
            failed = _failed_ops(body)
            if 0 in failed:
                raise RootsChangedError("the CA roots changed while signing")
        raise CAError(f"lost {attempts} races for a serial number in a row")

    async def forget_roots(self, root_ids: set[str]) -> None:
        """Drop the last-leaf records of roots that left (best effort: one CAS try)."""
        cur = await self.serial()
        if not root_ids & set(cur.last_leaf_not_after):
            return
        last = {k: v for k, v in cur.last_leaf_not_after.items() if k not in root_ids}
        with _registry_call():
            await self.client.kv.put(
                SERIAL_KEY, SerialState(cur.next, last).encode(), cas=cur.index
            )

    async def _txn(self, ops: list[Any]) -> tuple[int, str]:
        with _registry_call():
            code, body = await self.client.http.put(
                lambda r: (int(r.code), str(r.body)),
                "/v1/txn",
                data=json.dumps(ops),
                headers=self.client.prepare_headers(None),
            )
        return code, body


def _failed_ops(body: str) -> set[int]:
    try:
        errors = json.loads(body).get("Errors") or []
    except (ValueError, AttributeError):
        return set()
    return {int(e.get("OpIndex", -1)) for e in errors if isinstance(e, dict)}
