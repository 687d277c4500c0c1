"""Authorization by intentions: may this caller make this request to this service?

Pure decisions over the `Intention` and `MeshConfig` resources (wire/resources.py), so
the inbound sidecar (which enforces them) and the control plane (Consul's
`/v1/connect/intentions/check` and `/v1/agent/connect/authorize`) answer the same way.
No I/O, no clock; RE2 is loaded only when an intention has a regex.

Semantics, as Consul's intentions:

- Every source of every Intention is one `Rule`: source namespace/service (either may
  be `*`; a `*` namespace goes with a `*` service) → destination namespace/service
  (the Intention's metadata, `*` allowed the same way).
- Rules are tried most specific first (Consul's precedence: exact destination before a
  wildcard one, then exact source before wildcards: 9 for ns/svc → ns/svc down to 1 for
  */* → */*; ties in name order, so the order is total and stable). The first rule
  whose source matches the caller decides:
  an L4 rule by its action; an L7 rule by its first permission that matches the
  request, or, when none does, the mesh's default action (no later rule is tried).
- No rule matches: the mesh's default action (`MeshConfig.spec.authorization.
  defaultAction`, `allow` when unset).
- A caller without a verified identity (no mTLS) is *anonymous*: it matches only rules
  whose source is `*` in namespace `*`.
- Isolation (`MeshConfig.spec.mtls.namespaces.<ns>.isolated`): a caller from another
  namespace (or anonymous) is let into an isolated namespace only by an allow that a
  rule of that namespace gives with the caller's namespace named explicitly; an allow
  from the default action, a wildcard source namespace or a wildcard destination
  namespace is refused. Isolation never turns a deny into an allow.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from wire import resources as schema

WILDCARD = schema.WILDCARD
NO_HEADERS: Mapping[str, str] = {}


class Source(NamedTuple):
    """A verified caller: the namespace and service of its SPIFFE ID."""

    namespace: str
    service: str

    def __str__(self) -> str:
        return f"{self.namespace}/{self.service}"


def source_of_spiffe_id(uri: str) -> Source | None:
    """`spiffe://<td>/ns/<ns>/dc/<dc>/svc/<svc>` → Source; None when it is not that
    form (the verifier has checked the certificate; this only reads the names)."""
    if not uri.startswith("spiffe://"):
        return None
    parts = uri[9:].split("/")
    if len(parts) != 7 or parts[1] != "ns" or parts[3] != "dc" or parts[5] != "svc":
        return None
    ns, svc = parts[2], parts[6]
    if not ns or not svc:
        return None
    return Source(ns, svc)


def precedence(src_ns: str, src_name: str, dst_ns: str, dst_name: str) -> int:
    """Consul's intention precedence: 9 (all exact) down to 1 (all wildcards)."""
    dst_exact = (dst_ns != WILDCARD) + (dst_name != WILDCARD)
    src_exact = (src_ns != WILDCARD) + (src_name != WILDCARD)
    return (3, 6, 9)[dst_exact] - (2 - src_exact)


# -- compiled conditions -------------------------------------------------------------------


def _compile_regex(pattern: str) -> Any:
    import re2  # only when an intention has a regex

    options = re2.Options()
    options.log_errors = False
    return re2.compile(pattern, options=options)


@dataclass(frozen=True, slots=True)
class TextMatch:
    """exact, prefix, suffix, regex (a full match) or present, optionally inverted."""

    kind: str
    value: str = ""
    pattern: Any = None
    invert: bool = False

    @classmethod
    def of(cls, kind: str, value: str = "", invert: bool = False) -> TextMatch:
        return cls(kind, value, _compile_regex(value) if kind == "regex" else None, invert)

    def test(self, text: str | None) -> bool:
        if text is None:
            hit = False
        else:
            kind = self.kind
            if kind == "exact":
                hit = text == self.value
            elif kind == "prefix":
                hit = text.startswith(self.value)
            elif kind == "suffix":
                hit = text.endswith(self.value)
            elif kind == "regex":
                hit = self.pattern.fullmatch(text) is not None
            else:  # present
                hit = True
        return hit != self.invert


@dataclass(frozen=True, slots=True)
class Permission:
    """One L7 permission: its action and the requests it matches (all conditions)."""

    allow: bool
    methods: frozenset[str] = frozenset()
    path: TextMatch | None = None
    headers: tuple[tuple[str, TextMatch], ...] = ()

    def test(self, method: str, path: str, headers: Mapping[str, str]) -> bool:
        if self.methods and method not in self.methods:
            return False
        if self.path is not None and not self.path.test(path):
            return False
        for name, cond in self.headers:  # noqa: SIM110  (a plain loop is cheaper)
            if not cond.test(headers.get(name)):
                return False
        return True


@dataclass(frozen=True, slots=True)
class Rule:
    """One source of one Intention."""

    source_namespace: str
    source_name: str
    destination_namespace: str
    destination_name: str
    action: str | None  # "allow" / "deny"; None for an L7 rule
    permissions: tuple[Permission, ...] = ()
    description: str = ""
    precedence: int = field(default=0, compare=False)

    def matches(self, src: Source | None) -> bool:
        if src is None:
            return self.source_namespace == WILDCARD and self.source_name == WILDCARD
        return (self.source_namespace in (WILDCARD, src.namespace)) and (
            self.source_name in (WILDCARD, src.service)
        )

    def applies_to(self, namespace: str, service: str) -> bool:
        return self.destination_namespace in (WILDCARD, namespace) and (
            self.destination_name in (WILDCARD, service)
        )

    @property
    def sort_key(self) -> tuple[int, str, str, str, str]:
        return (
            -self.precedence,
            self.destination_namespace,
            self.destination_name,
            self.source_namespace,
            self.source_name,
        )

    def __str__(self) -> str:
        return (
            f"{self.source_namespace}/{self.source_name} => "
            f"{self.destination_namespace}/{self.destination_name} "
            f"(Precedence: {self.precedence})"
        )


class Decision(NamedTuple):
    """The answer for one request: allowed or not, and why. The reason's text is made
    only when asked for (logs, APIs): a request pays for no string formatting.

    `why`: "l4" (an L4 rule's action), "l7" (an L7 rule's permission `permission`),
    "l7-none" (an L7 rule, no permission matched: the default action), "l7-as-deny"
    (an L7 rule where only L4 is judged), "default" (no rule), "isolated" (an allow
    refused by isolation; `cause` is that allow, `namespace` and `source` name who)."""

    allowed: bool
    why: str
    rule: Rule | None = None
    permission: int = -1
    cause: Decision | None = None
    namespace: str = ""
    source: Source | None = None

    @property
    def reason(self) -> str:
        why, rule = self.why, self.rule
        if why == "l4":
            return f"Matched L4 intention: {rule}"
        if why == "l7":
            return f"Matched L7 intention: {rule}, permission [{self.permission}]"
        if why == "l7-as-deny":
            return f"Matched L7 intention: {rule}"
        if why == "isolated":
            who = str(self.source) if self.source is not None else "an anonymous caller"
            cause = self.cause.reason if self.cause is not None else ""
            return (
                f"Namespace {self.namespace} is isolated: no intention of it names the "
                f"namespace of {who} ({cause})"
            )
        default = (
            f"Default behavior configured by MeshConfig ({'allow' if self.allowed else 'deny'})"
        )
        if why == "l7-none":
            return f"Matched L7 intention: {rule}, but no permission; {default}"
        return default


def _text_match(spec: schema.IntentionHeaderMatchSpec) -> TextMatch:
    for kind in ("exact", "prefix", "suffix", "regex"):
        value = getattr(spec, kind)
        if value is not None:
            return TextMatch.of(kind, value, spec.invert)
    return TextMatch.of("present", "", spec.invert)


def _permission(spec: schema.IntentionPermissionSpec) -> Permission:
    http = spec.http
    path = None
    if http.path is not None:
        p = http.path
        if p.exact is not None:
            path = TextMatch.of("exact", p.exact)
        elif p.prefix is not None:
            path = TextMatch.of("prefix", p.prefix)
        elif p.regex is not None:
            path = TextMatch.of("regex", p.regex)
    return Permission(
        allow=spec.action == "allow",
        methods=frozenset(http.methods),
        path=path,
        headers=tuple((h.name.lower(), _text_match(h)) for h in http.headers),
    )


def rules_of(res: schema.Resource) -> list[Rule]:
    """An Intention resource's rules (one per source)."""
    spec = res.spec
    assert isinstance(spec, schema.IntentionSpec)
    dst_ns, dst_name = res.namespace, res.name
    out = []
    for src in spec.sources:
        src_ns = src.namespace if src.namespace is not None else dst_ns
        out.append(
            Rule(
                source_namespace=src_ns,
                source_name=src.name,
                destination_namespace=dst_ns,
                destination_name=dst_name,
                action=src.action,
                permissions=tuple(_permission(p) for p in src.permissions),
                description=src.description,
                precedence=precedence(src_ns, src.name, dst_ns, dst_name),
            )
        )
    return out


def sort_rules(rules: Iterable[Rule]) -> list[Rule]:
    """Evaluation order: highest precedence first, then by names (a total order)."""
    return sorted(rules, key=lambda r: r.sort_key)


# -- evaluation ----------------------------------------------------------------------------

# A rule and the decisions it can make: L4 (or None), per permission, none matching;
# and the header names its permissions read (lower-case bytes).
CompiledRule = tuple[
    Rule, Decision | None, tuple[tuple[Permission, Decision], ...], Decision, frozenset[bytes]
]


@dataclass(frozen=True)
class DestinationPolicy:
    """The rules that can apply to one destination service, in evaluation order, and the
    mesh settings; what one inbound sidecar checks each request against."""

    namespace: str
    service: str
    rules: tuple[Rule, ...]
    default_allow: bool = True
    isolated: bool = False
    # Lower-case header names any permission reads (bytes, as the sidecar's heads are).
    header_names: frozenset[bytes] = frozenset()
    # Whether any rule has L7 permissions (else a decision depends on the source alone).
    has_l7: bool = False
    # Per rule, the decisions it can make, made once here (a request allocates none):
    # (rule, its L4 decision or None, one per permission, the no-permission one).
    _compiled: tuple[CompiledRule, ...] = field(default=(), compare=False, repr=False)
    _default_decision: Decision = field(
        default=Decision(True, "default"), compare=False, repr=False
    )

    def __post_init__(self) -> None:
        compiled = []
        for rule in self.rules:
            l4 = Decision(rule.action == "allow", "l4", rule) if rule.action is not None else None
            perms = tuple(
                (p, Decision(p.allow, "l7", rule, i)) for i, p in enumerate(rule.permissions)
            )
            names = frozenset(n.encode("latin-1") for p in rule.permissions for n, _ in p.headers)
            none = Decision(self.default_allow, "l7-none", rule)
            compiled.append((rule, l4, perms, none, names))
        object.__setattr__(self, "_compiled", tuple(compiled))
        object.__setattr__(self, "_default_decision", Decision(self.default_allow, "default"))

    @property
    def trivially_allows(self) -> bool:
        """Nothing to check: no rules, default allow, not isolated."""
        return not self.rules and self.default_allow and not self.isolated

    def decide(
        self,
        src: Source | None,
        method: str = "GET",
        path: str = "/",
        headers: Mapping[str, str] | None = None,
        *,
        l4_only: bool = False,
    ) -> Decision:
        """`l4_only`: as Consul's check and authorize, a matching L7 rule denies."""
        entry = self.first(src)
        fixed = self.fixed(src, entry)
        if fixed is not None:
            return fixed
        assert entry is not None
        if l4_only:
            return Decision(False, "l7-as-deny", entry[0])
        return self.permit(src, entry, method, path, headers if headers is not None else NO_HEADERS)

    def first(self, src: Source | None) -> CompiledRule | None:
        """The rule that decides for `src` (the first whose source matches), or None:
        it depends on the caller alone, so a sidecar finds it once per connection."""
        for entry in self._compiled:
            if entry[0].matches(src):
                return entry
        return None

    def fixed(self, src: Source | None, entry: CompiledRule | None) -> Decision | None:
        """The decision when it does not depend on the request (no rule, or an L4 one);
        None for an L7 rule, whose permissions judge each request (`permit`)."""
        if entry is None:
            d = self._default_decision
        elif entry[1] is not None:
            d = entry[1]
        else:
            return None
        return self._isolate(src, d) if self.isolated else d

    def permit(
        self,
        src: Source | None,
        entry: CompiledRule,
        method: str,
        path: str,
        headers: Mapping[str, str],
    ) -> Decision:
        """An L7 rule's decision for one request: its first matching permission, else the
        default action."""
        d = entry[3]
        for perm, decision in entry[2]:
            if perm.test(method, path, headers):
                d = decision
                break
        return self._isolate(src, d) if self.isolated else d

    def _isolate(self, src: Source | None, d: Decision) -> Decision:
        if not (d.allowed and self.isolated):
            return d
        if src is not None and src.namespace == self.namespace:
            return d
        rule = d.rule
        if (
            src is not None
            and rule is not None
            and d.why != "l7-none"
            and rule.destination_namespace == self.namespace
            and rule.source_namespace == src.namespace
        ):
            return d
        return Decision(False, "isolated", rule, d.permission, d, self.namespace, src)


_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")


def normalize_path(path: str) -> str:
    """The path L7 permissions are matched against, as Envoy's `normalize_path` and
    `merge_slashes` make it: percent-encoded unreserved characters decoded (RFC 3986
    6.2.2.2, other escapes upper-cased and kept, so `%2F` stays an escaped slash), runs
    of `/` merged, and `.` and `..` segments removed (RFC 3986 5.2.4). A path that
    needs none of it is returned as is (the usual case, checked first)."""
    if "%" not in path and "//" not in path and "/." not in path:
        return path
    if "%" in path:
        out: list[str] = []
        i, n = 0, len(path)
        while i < n:
            ch = path[i]
            if ch == "%" and i + 2 < n and _is_hex(path[i + 1 : i + 3]):
                decoded = chr(int(path[i + 1 : i + 3], 16))
                out.append(decoded if decoded in _UNRESERVED else path[i : i + 3].upper())
                i += 3
            else:
                out.append(ch)
                i += 1
        path = "".join(out)
    segments: list[str] = []
    parts = path.split("/")
    for j, seg in enumerate(parts[1:] if path.startswith("/") else parts):
        last = j == len(parts) - (2 if path.startswith("/") else 1)
        if seg == "..":
            if segments:
                segments.pop()
            if last:
                segments.append("")
        elif seg == ".":
            if last:
                segments.append("")
        elif seg == "" and not last:
            continue  # merge slashes
        else:
            segments.append(seg)
    return "/" + "/".join(segments)


def _is_hex(text: str) -> bool:
    return len(text) == 2 and all(c in "0123456789abcdefABCDEF" for c in text)


def read_headers(
    names: frozenset[bytes], headers: Sequence[tuple[bytes, bytes]]
) -> Mapping[str, str]:
    """The request headers the permissions read, by lower-case name; several values of
    one name joined by ',' (as Envoy's header matchers see them)."""
    out: dict[str, str] = {}
    if not names:
        return out
    for raw_name, raw_value in headers:
        low = raw_name.lower()
        if low in names:
            name = low.decode("latin-1")
            value = raw_value.decode("latin-1")
            out[name] = f"{out[name]},{value}" if name in out else value
    return out


@dataclass(frozen=True)
class Intentions:
    """Every rule of a set of resources, and the mesh settings; answers for any
    destination (the control plane) or compiles one destination's policy (a sidecar)."""

    rules: tuple[Rule, ...] = ()
    default_allow: bool = True
    isolated: frozenset[str] = frozenset()

    @classmethod
    def compile(cls, resources: Iterable[schema.Resource]) -> Intentions:
        """Raises the RE2 error of a regex that does not compile (checked before)."""
        rules: list[Rule] = []
        default_allow = True
        isolated: frozenset[str] = frozenset()
        for res in resources:
            if isinstance(res.spec, schema.IntentionSpec):
                rules += rules_of(res)
            elif isinstance(res.spec, schema.MeshConfigSpec):
                default_allow = res.spec.authorization.default_action == "allow"
                isolated = frozenset(ns for ns, p in res.spec.mtls.namespaces.items() if p.isolated)
        return cls(tuple(sort_rules(rules)), default_allow, isolated)

    def for_destination(self, namespace: str, service: str) -> DestinationPolicy:
        rules = tuple(r for r in self.rules if r.applies_to(namespace, service))
        names = frozenset(
            name.encode("latin-1") for r in rules for p in r.permissions for name, _ in p.headers
        )
        return DestinationPolicy(
            namespace,
            service,
            rules,
            self.default_allow,
            namespace in self.isolated,
            names,
            any(r.action is None for r in rules),
        )

    def matching(self, by: str, namespace: str, name: str) -> list[Rule]:
        """Consul's match: the rules whose destination (or source) is `namespace/name`
        or a wildcard covering it, in evaluation order."""
        if by == "destination":
            return [r for r in self.rules if r.applies_to(namespace, name)]
        return [
            r
            for r in self.rules
            if r.source_namespace in (WILDCARD, namespace) and r.source_name in (WILDCARD, name)
        ]
