"""An index over a Route's rules, so a request is tested only against rules that can match.

Matching is first-match-wins in order (proxy/routing.py). With many rules a linear scan
costs microseconds per rule (an RE2 call through its Python binding alone is ~4.6 µs),
so a Route with more than `INDEX_MIN` rules gets a `RuleIndex`, built once per snapshot:
each rule is filed under one condition that every request it matches must meet (its
key): an exact path (a dict lookup), a path prefix (one lookup per distinct prefix
length), a path regex (all of them in one RE2 set, one pass over the path), or an exact
header value (a lookup per indexed header name); rules without such a condition are
always candidates. A request's candidates are the rules whose key it meets, tested in
rule order with the full matcher, so the first that matches is the one the linear scan
finds (tests/test_rule_index.py checks that on random rules and requests).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from proxy.routing import RouteRule

INDEX_MIN = 16


class RuleIndex:
    """Candidates for a request among one Route's rules (see the module's docstring)."""

    __slots__ = (
        "always",
        "exact",
        "header_names",
        "headers",
        "prefix_lengths",
        "prefixes",
        "regex_rules",
        "regexes",
    )

    def __init__(self, rules: Sequence[RouteRule]) -> None:
        self.exact: dict[str, list[int]] = {}
        self.prefixes: dict[str, list[int]] = {}
        self.regex_rules: list[int] = []
        self.headers: dict[str, dict[str, list[int]]] = {}
        self.always: list[int] = []
        regexes: Any = None
        for i, rule in enumerate(rules):
            m = rule.match
            p = m.path
            if p is not None and p.kind == "exact":
                self.exact.setdefault(p.value, []).append(i)
            elif p is not None and p.kind == "prefix":
                self.prefixes.setdefault(p.value, []).append(i)
            elif p is not None and p.kind == "regex":
                if regexes is None:
                    regexes = _regex_set()
                regexes.Add(p.value)
                self.regex_rules.append(i)
            else:
                key = next(((n, c.value) for n, c in m.headers if c.kind == "exact"), None)
                if key is None:
                    self.always.append(i)
                else:
                    self.headers.setdefault(key[0], {}).setdefault(key[1], []).append(i)
        if regexes is not None:
            regexes.Compile()
        self.regexes = regexes
        self.prefix_lengths = sorted({len(p) for p in self.prefixes})
        self.header_names = tuple(self.headers)

    def candidates(self, path: str, headers: Mapping[str, str]) -> list[int]:
        """The indexes of the rules that may match, in rule order."""
        out = list(self.always)
        got = self.exact.get(path)
        if got is not None:
            out += got
        prefixes = self.prefixes
        n = len(path)
        for length in self.prefix_lengths:
            if length > n:
                break
            got = prefixes.get(path[:length])
            if got is not None:
                out += got
        if self.regexes is not None:
            hits = self.regexes.Match(path)
            if hits:
                rr = self.regex_rules
                out += [rr[h] for h in hits]
        for name in self.header_names:
            value = headers.get(name)
            if value is not None:
                got = self.headers[name].get(value)
                if got is not None:
                    out += got
        out.sort()
        return out

    def __repr__(self) -> str:
        return (
            f"<RuleIndex exact={len(self.exact)} prefixes={len(self.prefixes)} "
            f"regexes={len(self.regex_rules)} headers={len(self.header_names)} "
            f"always={len(self.always)}>"
        )


def _regex_set() -> Any:
    """An empty RE2 set of full-match patterns (RE2 imported only for Routes with regex
    paths: proxy/routing.py says why)."""
    import re2

    options = re2.Options()
    options.log_errors = False
    return re2.Set.FullMatchSet(options)
