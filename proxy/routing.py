"""Route matching and traffic splitting: from a request to a concrete destination (pure).

The outbound path asks `RoutingTable.policy(namespace, service)` for the logical target
the app dialled; None (no policy) leaves the request on its plain cluster, so requests to
services without policy pay one dict lookup. Otherwise `ServicePolicy.decide` matches the
ordered rules (first match wins; no match or no Route sends the service to itself), then
the destination's `Split` picks a subset by weight (the rng is an argument) or by a
sticky header/cookie hash, and the result names service, namespace, subset and the header
edits to make. A `Subset` is a filter of a cluster's endpoints by registry Meta.

Nothing here does I/O or reads a clock; tables are built once per applied snapshot
(proxy/policy.py) and never mutated, so a request sees one table from start to end.
"""

from __future__ import annotations

import random
import zlib
from collections.abc import Iterable, Mapping, MutableSequence, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import parse_qsl

from proxy.balance import Endpoint

if TYPE_CHECKING:
    from proxy.route_filters import RuleFilters
    from proxy.rule_index import RuleIndex

MatchKind = Literal["exact", "prefix", "regex", "present", "absent"]


class RegexError(ValueError):
    """A route regex RE2 cannot compile."""


def _compile_regex(pattern: str) -> Any:
    # Imported here, when a policy has a regex: the RE2 binding and the C++ runtime it
    # loads are about 2.5 MB of an idle sidecar's memory (docs/benchmarks.md).
    import re2

    options = re2.Options()
    options.log_errors = False
    try:
        return re2.compile(pattern, options=options)
    except re2.error as exc:
        reason = exc.args[0] if exc.args else exc
        if isinstance(reason, bytes):
            reason = reason.decode("utf-8", "replace")
        raise RegexError(f"not an RE2 regular expression: {reason}") from None


@dataclass(frozen=True, slots=True)
class StringMatch:
    """One condition on a string value: exact, prefix, regex (full match), present, absent."""

    kind: MatchKind
    value: str = ""
    # A compiled RE2 pattern: matching is linear in the input, so no user regex can
    # stall the sidecar's event loop (Python's backtracking `re` could, for seconds).
    pattern: Any = None

    @classmethod
    def of(cls, kind: MatchKind, value: str = "") -> StringMatch:
        """Raises RegexError for a pattern RE2 refuses (backreferences, lookaround)."""
        return cls(kind, value, _compile_regex(value) if kind == "regex" else None)

    def test(self, value: str | None) -> bool:
        kind = self.kind
        if value is None:
            return kind == "absent"
        if kind == "exact":
            return value == self.value
        if kind == "prefix":
            return value.startswith(self.value)
        if kind == "regex":
            assert self.pattern is not None
            return self.pattern.fullmatch(value) is not None
        return kind == "present"


@dataclass(frozen=True, slots=True)
class RequestMatch:
    """All conditions of one rule; an empty match is a catch-all."""

    methods: frozenset[str] = frozenset()
    path: StringMatch | None = None
    headers: tuple[tuple[str, StringMatch], ...] = ()
    query: tuple[tuple[str, StringMatch], ...] = ()

    @property
    def catch_all(self) -> bool:
        return not (self.methods or self.path or self.headers or self.query)

    def test(self, method: str, path: str, headers: Mapping[str, str]) -> bool:
        """Every condition but the query's (parsed only when a rule gets that far)."""
        if self.methods and method not in self.methods:
            return False
        if self.path is not None and not self.path.test(path):
            return False
        # A plain loop: all() over a generator costs more per request.
        for name, cond in self.headers:  # noqa: SIM110
            if not cond.test(headers.get(name)):
                return False
        return True

    def test_query(self, query: Mapping[str, str]) -> bool:
        return all(cond.test(query.get(name)) for name, cond in self.query)


@dataclass(frozen=True, slots=True)
class HeaderEdit:
    """Header changes in order: remove, then set (replace), then add (append).

    Names are lower case; the proxy's headers are (name, value) byte pairs.
    """

    add: tuple[tuple[str, str], ...] = ()
    set: tuple[tuple[str, str], ...] = ()
    remove: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.add or self.set or self.remove)

    def apply(self, headers: MutableSequence[tuple[bytes, bytes]]) -> None:
        drop = {n.encode() for n in self.remove} | {n.encode() for n, _ in self.set}
        if drop:
            headers[:] = [(n, v) for n, v in headers if n.lower() not in drop]
        for name, value in self.set:
            headers.append((name.encode(), value.encode()))
        for name, value in self.add:
            headers.append((name.encode(), value.encode()))


NO_EDIT = HeaderEdit()
EMPTY_QUERY: Mapping[str, str] = {}


@dataclass(frozen=True, slots=True)
class RouteRule:
    match: RequestMatch
    service: str
    namespace: str
    subset: str | None = None
    request_headers: HeaderEdit = NO_EDIT
    response_headers: HeaderEdit = NO_EDIT
    # What metrics, spans and access logs call it: `<route>.<namespace>#<rule index>`.
    label: str = ""
    # The rule's L7 filters (proxy/route_filters.py: fault, rate limit, redirect,
    # rewrite, mirror); None: none.
    filters: RuleFilters | None = None
    # The rule's own retries and limits (proxy/retry.py, proxy/circuit_breaker.py
    # specs); None: the destination's.
    retry: Any = None
    circuit_breaker: Any = None
    hedge: Any = None  # proxy/hedging.py's HedgeSpec; None: the destination's


@dataclass(frozen=True, slots=True)
class Subset:
    """Instances of a service whose registry Meta has every key/value of `selector`."""

    name: str
    selector: tuple[tuple[str, str], ...]

    def selects(self, ep: Endpoint) -> bool:
        meta = ep.meta
        return all(meta.get(k) == v for k, v in self.selector)

    def filter(self, endpoints: Iterable[Endpoint]) -> list[Endpoint]:
        return [ep for ep in endpoints if self.selects(ep)]


@dataclass(frozen=True, slots=True)
class Split:
    """Weighted shares of a service's traffic between its subsets."""

    shares: tuple[tuple[str, int], ...]
    sticky_header: str | None = None
    sticky_cookie: str | None = None
    cookie_ttl: float | None = None
    total: int = field(init=False)
    # Cumulative weights, so a choice is one pass over a handful of entries.
    bounds: tuple[int, ...] = field(init=False)
    names: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        acc, bounds = 0, []
        for _, w in self.shares:
            acc += w
            bounds.append(acc)
        object.__setattr__(self, "total", acc)
        object.__setattr__(self, "bounds", tuple(bounds))
        object.__setattr__(self, "names", tuple(name for name, _ in self.shares))

    def by_weight(self, rng: random.Random) -> str | None:
        return self._at(int(rng.random() * self.total))

    def _at(self, point: int) -> str | None:
        names = self.names
        for i, bound in enumerate(self.bounds):
            if point < bound:
                return names[i]
        return names[-1] if names else None

    def choose(self, headers: Mapping[str, str], rng: random.Random) -> tuple[str | None, str]:
        """The subset for one request, and a Set-Cookie value to pin it ("" for none).

        Header stickiness hashes the header's value onto the weights (the same value
        always lands on the same subset while weights stay); cookie stickiness names the
        subset in the cookie, set on the first response, and honoured while that subset
        still has a share.
        """
        if self.total <= 0:
            return None, ""
        if self.sticky_header is not None:
            value = headers.get(self.sticky_header)
            if value:
                return self._at(zlib.crc32(value.encode()) % self.total), ""
        elif self.sticky_cookie is not None:
            pinned = cookie_value(headers.get("cookie"), self.sticky_cookie)
            if pinned is not None and self.weight_of(pinned) > 0:
                return pinned, ""
            name = self.by_weight(rng)
            if name is None:
                return None, ""
            cookie = f"{self.sticky_cookie}={name}; Path=/; HttpOnly"
            if self.cookie_ttl is not None:
                cookie += f"; Max-Age={int(self.cookie_ttl)}"
            return name, cookie
        return self.by_weight(rng), ""

    def weight_of(self, subset: str) -> int:
        for name, w in self.shares:
            if name == subset:
                return w
        return 0


def cookie_value(header: str | None, name: str) -> str | None:
    if not header:
        return None
    for part in header.split(";"):
        k, eq, v = part.strip().partition("=")
        if eq and k == name:
            return v.strip().strip('"')
    return None


@dataclass(slots=True)
class Decision:
    """Where one request goes: a service, namespace and optional subset, plus edits.

    Not frozen: one is made per request, and a frozen dataclass's __init__ is slower.
    """

    service: str
    namespace: str
    subset: str | None
    request_headers: HeaderEdit = NO_EDIT
    response_headers: HeaderEdit = NO_EDIT
    rule: RouteRule | None = None  # the rule that matched (None: the service itself)


@dataclass(frozen=True, slots=True)
class ServicePolicy:
    """Everything the sidecar knows about one destination service."""

    service: str
    namespace: str
    rules: tuple[RouteRule, ...] = ()
    split: Split | None = None
    subsets: Mapping[str, Subset] = field(default_factory=dict)
    # The ServiceDefaults object of the shared schema, or None (kept opaque here).
    defaults: object | None = None
    # Lower-case header names the rules and splits read (the only ones decoded).
    header_names: frozenset[bytes] = frozenset()
    # For many rules, the candidates per request (proxy/rule_index.py); None: a scan.
    index: RuleIndex | None = None

    def match(
        self, method: str, path: str, headers: Mapping[str, str], qs: str = ""
    ) -> RouteRule | None:
        query: Mapping[str, str] | None = None
        index = self.index
        rules: Sequence[RouteRule] = self.rules
        if index is not None:
            rules = [rules[i] for i in index.candidates(path, headers)]
        for rule in rules:
            m = rule.match
            if not m.test(method, path, headers):
                continue
            if m.query:
                if query is None:
                    query = dict(parse_qsl(qs, keep_blank_values=True)) if qs else EMPTY_QUERY
                if not m.test_query(query):
                    continue
            return rule
        return None

    def read_headers(self, headers: Sequence[tuple[bytes, bytes]]) -> Mapping[str, str]:
        """The request headers this policy reads, by lower-case name (first value wins;
        cookies joined); the others are not even decoded."""
        names = self.header_names
        if not names:
            return EMPTY_QUERY
        out: dict[str, str] = {}
        for raw_name, raw_value in headers:
            low = raw_name.lower()
            if low in names:
                name = low.decode("latin-1")
                value = raw_value.decode("latin-1")
                if name not in out:
                    out[name] = value
                elif name == "cookie":
                    out[name] = f"{out[name]}; {value}"
        return out


@dataclass(frozen=True)
class RoutingTable:
    """The applied policy of one sidecar: per destination service, its ServicePolicy."""

    services: Mapping[tuple[str, str], ServicePolicy] = field(default_factory=dict)
    version: int = 0
    hash: str = ""

    def policy(self, namespace: str, service: str) -> ServicePolicy | None:
        return self.services.get((namespace, service))

    def decide(
        self,
        policy: ServicePolicy,
        method: str,
        target: str,
        headers: Mapping[str, str],
        rng: random.Random,
    ) -> Decision:
        """Route and split one request for the logical service `policy` describes.

        `target` is the request target (path and query); `headers` has lower-case names.
        """
        path, _, qs = target.partition("?")
        rule = policy.match(method, path, headers, qs) if policy.rules else None
        if rule is None:
            service, namespace, subset = policy.service, policy.namespace, None
            req, resp = NO_EDIT, NO_EDIT
        else:
            service, namespace, subset = rule.service, rule.namespace, rule.subset
            req, resp = rule.request_headers, rule.response_headers
        if subset is None:
            if service == policy.service and namespace == policy.namespace:
                dest: ServicePolicy | None = policy
            else:
                dest = self.services.get((namespace, service))
            if dest is not None and dest.split is not None:
                subset, cookie = dest.split.choose(headers, rng)
                if cookie:
                    resp = HeaderEdit(
                        add=(*resp.add, ("set-cookie", cookie)), set=resp.set, remove=resp.remove
                    )
        return Decision(service, namespace, subset, req, resp, rule)

    def subsets_in_use(self) -> set[tuple[str, str, str]]:
        """(namespace, service, subset) for every subset a rule or split can choose."""
        used: set[tuple[str, str, str]] = set()
        for (ns, svc), pol in self.services.items():
            if pol.split is not None:
                used.update((ns, svc, name) for name, _ in pol.split.shares)
            for rule in pol.rules:
                if rule.subset is not None:
                    used.add((rule.namespace, rule.service, rule.subset))
                mirror = rule.filters.mirror if rule.filters is not None else None
                if mirror is not None and mirror.subset is not None:
                    used.add((mirror.namespace, mirror.service, mirror.subset))
        return used

    def subset(self, namespace: str, service: str, name: str) -> Subset | None:
        pol = self.services.get((namespace, service))
        return pol.subsets.get(name) if pol is not None else None

    def destinations(self) -> set[tuple[str, str]]:
        """Every (namespace, service) a request could be sent to under this table."""
        out = set(self.services)
        for pol in self.services.values():
            out.update((r.namespace, r.service) for r in pol.rules)
            for r in pol.rules:
                mirror = r.filters.mirror if r.filters is not None else None
                if mirror is not None:
                    out.add((mirror.namespace, mirror.service))
        return out
