"""Consul's ACL rule language: parse a policy's Rules (HCL or JSON) and decide access.

Sans-IO and pure. A `RuleSet` holds, per resource kind, exact rules (`key "a/b"`) and
prefix rules (`key_prefix "a/"`), plus the single-valued kinds (`operator = "read"`).
Decisions follow Consul's `policyAuthorizer`: for a segment, an exact rule wins, else
the longest prefix rule; `write` grants read, list and write, `list` grants read and
list, `read` grants read, `deny` grants nothing; no matching rule means "no opinion",
and the caller falls back to the default (deny when ACLs are on). Several policies on
one token merge per segment with deny > write > list > read, as Consul merges them.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from registry import nesting

Level = Literal["read", "write", "list", "deny"]
Access = Literal["read", "write", "list"]

PREFIXED_KINDS = ("key", "service", "node", "session", "event", "agent", "query")
SINGLE_KINDS = ("operator", "acl", "keyring", "mesh", "peering")
_LEVELS: tuple[str, ...] = ("read", "write", "list", "deny")
_PRECEDENCE = {"deny": 4, "write": 3, "list": 2, "read": 1}


class RuleError(ValueError):
    """Rules that do not parse or name an unknown kind or level."""


def _grants(level: str, access: Access) -> bool:
    if level == "write":
        return True
    if level == "list":
        return access in ("read", "list")
    if level == "read":
        return access == "read"
    return False


@dataclass
class RuleSet:
    exact: dict[str, dict[str, str]] = field(default_factory=dict)
    prefix: dict[str, dict[str, str]] = field(default_factory=dict)
    single: dict[str, str] = field(default_factory=dict)

    def level(self, kind: str, segment: str) -> str | None:
        """The rule level that applies to `segment` of `kind`, if any rule does."""
        if kind in SINGLE_KINDS:
            return self.single.get(kind)
        ex = self.exact.get(kind)
        if ex is not None:
            lvl = ex.get(segment)
            if lvl is not None:
                return lvl
        best: str | None = None
        best_len = -1
        for p, lvl in self.prefix.get(kind, {}).items():
            if len(p) > best_len and segment.startswith(p):
                best, best_len = lvl, len(p)
        return best

    def decide(self, kind: str, segment: str, access: Access) -> bool | None:
        """True/False when a rule decides, None when none applies (use the default)."""
        lvl = self.level(kind, segment)
        if lvl is None:
            return None
        return _grants(lvl, access)

    def decide_write_prefix(self, kind: str, prefix: str) -> bool | None:
        """Write on everything under `prefix` (Consul's KeyWritePrefix).

        Denied if any rule under the prefix grants less than write; otherwise decided
        by the rule that applies to the prefix itself (None when there is none).
        """
        for rules in (self.exact.get(kind, {}), self.prefix.get(kind, {})):
            for seg, lvl in rules.items():
                if seg.startswith(prefix) and seg != prefix and lvl != "write":
                    return False
        ex = self.exact.get(kind, {}).get(prefix)
        if ex is not None and ex != "write":
            return False
        best: str | None = None
        best_len = -1
        for p, lvl in self.prefix.get(kind, {}).items():
            if len(p) > best_len and prefix.startswith(p):
                best, best_len = lvl, len(p)
        if best is None:
            return None
        return best == "write"

    def add(self, kind: str, segment: str | None, level: str, *, exact: bool) -> None:
        if kind in SINGLE_KINDS:
            _merge_into(self.single, kind, level)
            return
        table = self.exact if exact else self.prefix
        assert segment is not None
        _merge_into(table.setdefault(kind, {}), segment, level)

    @staticmethod
    def merge(sets: Iterable[RuleSet]) -> RuleSet:
        out = RuleSet()
        for rs in sets:
            for kind, rules in rs.exact.items():
                for seg, lvl in rules.items():
                    out.add(kind, seg, lvl, exact=True)
            for kind, rules in rs.prefix.items():
                for seg, lvl in rules.items():
                    out.add(kind, seg, lvl, exact=False)
            for kind, lvl in rs.single.items():
                out.add(kind, None, lvl, exact=True)
        return out


def _merge_into(table: dict[str, str], seg: str, level: str) -> None:
    old = table.get(seg)
    if old is None or _PRECEDENCE[level] > _PRECEDENCE[old]:
        table[seg] = level


# -- parsing ---------------------------------------------------------------------------


def parse_rules(text: str) -> RuleSet:
    """Parse Rules in Consul's JSON form or its HCL form; RuleError says what is wrong."""
    src = text.strip()
    if src.startswith('"'):
        # A JSON string holding the rules (py-consul json.dumps-es whatever it is given).
        try:
            inner = nesting.loads(src)
        except ValueError as exc:
            raise RuleError(f"invalid JSON string: {exc}") from exc
        if not isinstance(inner, str):
            raise RuleError("rules must be an object")
        src = inner.strip()
    if not src:
        return RuleSet()
    if src.startswith("{"):
        try:
            doc = nesting.loads(src)
        except ValueError as exc:
            raise RuleError(f"invalid JSON: {exc}") from exc
    else:
        try:
            nesting.check_depth(src)
        except nesting.NestingError as exc:
            raise RuleError(f"invalid HCL: {exc}") from exc
        doc = parse_hcl(src)
    if not isinstance(doc, dict):
        raise RuleError("rules must be an object")
    return rules_from_doc(doc)


def _blocks(value: Any, where: str) -> list[tuple[str, Any]]:
    """`{"seg": {...}}` or the list-of-objects form HCL-to-JSON produces."""
    items: list[tuple[str, Any]] = []
    if isinstance(value, dict):
        items.extend(value.items())
    elif isinstance(value, list):
        for part in value:
            if not isinstance(part, dict):
                raise RuleError(f"{where}: expected an object")
            items.extend(part.items())
    else:
        raise RuleError(f"{where}: expected an object")
    return items


def _policy_of(body: Any, where: str) -> str:
    if isinstance(body, list):
        merged: dict[str, Any] = {}
        for part in body:
            if isinstance(part, dict):
                merged.update(part)
        body = merged
    if not isinstance(body, dict):
        raise RuleError(f"{where}: expected an object with a policy")
    lowered = {str(k).lower(): v for k, v in body.items()}
    level = lowered.get("policy")
    if level is None:
        # `intentions` alone is allowed on services; it grants nothing here.
        if "intentions" in lowered:
            return ""
        raise RuleError(f"{where}: missing policy")
    return _level(level, where)


def _level(value: Any, where: str) -> str:
    if not isinstance(value, str) or value not in _LEVELS:
        raise RuleError(f"{where}: invalid policy {value!r} (want read, write, list or deny)")
    return value


def rules_from_doc(doc: dict[str, Any]) -> RuleSet:
    rs = RuleSet()
    for name, value in doc.items():
        kind, _, suffix = name.partition("_")
        if name in SINGLE_KINDS:
            level = _level(value, name)
            if level == "list":
                raise RuleError(f"{name}: invalid policy 'list'")
            rs.add(name, None, level, exact=True)
            continue
        if kind not in PREFIXED_KINDS or suffix not in ("", "prefix"):
            raise RuleError(f"unknown rule {name!r}")
        for seg, body in _blocks(value, name):
            level = _policy_of(body, f'{name} "{seg}"')
            if not level:
                continue
            if level == "list" and kind != "key":
                raise RuleError(f"{name} \"{seg}\": 'list' applies to keys only")
            rs.add(kind, str(seg), level, exact=suffix == "")
    return rs


# -- the HCL subset Consul policies use ----------------------------------------------

_TOKEN = re.compile(
    r"""
    (?P<ws>\s+|\#[^\n]*|//[^\n]*|/\*.*?\*/)
  | (?P<str>"(?:[^"\\]|\\.)*")
  | (?P<ident>[A-Za-z_][A-Za-z0-9_\-]*)
  | (?P<num>-?\d+(?:\.\d+)?)
  | (?P<punct>[{}=\[\],])
    """,
    re.VERBOSE | re.DOTALL,
)


def _tokens(src: str) -> list[tuple[str, str, int]]:
    out: list[tuple[str, str, int]] = []
    pos = 0
    while pos < len(src):
        m = _TOKEN.match(src, pos)
        if m is None:
            line = src.count("\n", 0, pos) + 1
            raise RuleError(f"line {line}: unexpected {src[pos]!r}")
        kind = m.lastgroup or ""
        if kind != "ws":
            text = m.group()
            if kind == "str":
                try:
                    text = json.loads(text)
                except ValueError as exc:
                    line = src.count("\n", 0, pos) + 1
                    raise RuleError(f"line {line}: bad string {text}: {exc}") from exc
            out.append((kind, text, src.count("\n", 0, pos) + 1))
        pos = m.end()
    return out


class _HclParser:
    def __init__(self, src: str) -> None:
        self.toks = _tokens(src)
        self.i = 0

    def peek(self) -> tuple[str, str, int] | None:
        return self.toks[self.i] if self.i < len(self.toks) else None

    def take(self, want: str | None = None) -> tuple[str, str, int]:
        tok = self.peek()
        if tok is None:
            raise RuleError("unexpected end of rules")
        if want is not None and tok[1] != want and tok[0] != want:
            raise RuleError(f"line {tok[2]}: expected {want!r}, got {tok[1]!r}")
        self.i += 1
        return tok

    def body(self, closing: bool) -> dict[str, Any]:
        out: dict[str, Any] = {}
        while True:
            tok = self.peek()
            if tok is None:
                if closing:
                    raise RuleError("unexpected end of rules: missing '}'")
                return out
            if tok[1] == "}" and tok[0] == "punct":
                if not closing:
                    raise RuleError(f"line {tok[2]}: unexpected '}}'")
                self.i += 1
                return out
            if tok[1] == "," and tok[0] == "punct":
                self.i += 1
                continue
            if tok[0] not in ("ident", "str"):
                raise RuleError(f"line {tok[2]}: expected a name, got {tok[1]!r}")
            name = self.take()[1]
            labels: list[str] = []
            while (nxt := self.peek()) is not None and nxt[0] == "str":
                labels.append(self.take()[1])
            nxt = self.take()
            if nxt[1] == "=":
                value = self.value()
            elif nxt[1] == "{":
                value = self.body(True)
            else:
                raise RuleError(f"line {nxt[2]}: expected '=' or '{{', got {nxt[1]!r}")
            target = out
            if labels:
                target = out.setdefault(name, {})
                for label in labels[:-1]:
                    target = target.setdefault(label, {})
                target[labels[-1]] = value
            else:
                out[name] = value

    def value(self) -> Any:
        tok = self.take()
        if tok[0] in ("str", "num", "ident"):
            return tok[1]
        if tok[1] == "{":
            return self.body(True)
        if tok[1] == "[":
            items: list[Any] = []
            while (nxt := self.peek()) is not None and nxt[1] != "]":
                if nxt[1] == ",":
                    self.i += 1
                    continue
                items.append(self.value())
            self.take("]")
            return items
        raise RuleError(f"line {tok[2]}: unexpected {tok[1]!r}")


def parse_hcl(src: str) -> dict[str, Any]:
    return _HclParser(src).body(False)


# -- synthesized rules -----------------------------------------------------------------


def service_identity_rules(service: str) -> RuleSet:
    """Consul's service identity: write its service (and sidecar), read the catalog."""
    rs = RuleSet()
    rs.add("service", service, "write", exact=True)
    rs.add("service", f"{service}-sidecar-proxy", "write", exact=True)
    rs.add("service", "", "read", exact=False)
    rs.add("node", "", "read", exact=False)
    return rs


def node_identity_rules(node: str) -> RuleSet:
    """Consul's node identity: write its node, read every service."""
    rs = RuleSet()
    rs.add("node", node, "write", exact=True)
    rs.add("service", "", "read", exact=False)
    return rs
