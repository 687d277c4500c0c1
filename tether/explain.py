"""`tether explain`: what the mesh would do with one request, and why (pure).

`explain` takes the request (method, URL, headers, the calling service), the documents
the control plane serves (`GET /api/v1/resources`), the instances it reports
(`GET /api/v1/services`) and its sidecars' config versions (`GET /api/v1/sidecars`), and
returns the lines `tether explain` prints: the route rule that matches and why each
earlier one does not, the rule's filters (fault, rate limit, redirect, rewrite, mirror),
the split and its weights, the destination's endpoints with zone and health, the
balancer, the timeouts, retries and circuit breakers, and the authorization decision.

It decides with the sidecar's own code: the documents are decoded and compiled by
proxy/policy.py into the same `RoutingTable` a sidecar builds from its snapshot, rules
are matched by proxy/routing.py's compiled matchers, and the timeouts come from
proxy/cluster_spec.py. The control plane never imports proxy/ (DESIGN.md); the CLI
does (it also runs `tether sidecar`), so this module lives with the CLI and the control
plane only serves the data. Nothing here does I/O.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from proxy import policy as compiled
from proxy.balance.outlier import OutlierSpec
from proxy.circuit_breaker import CircuitBreakerSpec
from proxy.cluster_spec import PoolKeys, compile_specs
from proxy.errors import BadMessageError, PolicyError
from proxy.pool import PoolPolicy
from proxy.retry import _BITS as RETRY_ON_BITS
from proxy.retry import RetrySpec
from proxy.route_filters import RuleFilters
from proxy.routing import RequestMatch, ServicePolicy, StringMatch
from proxy.target import parse_authority
from wire import resources as schema

# A sidecar's request timeout when neither ServiceDefaults nor MeshConfig set one.
LISTENER_REQUEST_TIMEOUT = 15.0


@dataclass
class ExplainRequest:
    """The request to explain; `headers` by lower-case name."""

    url: str
    method: str = "GET"
    headers: dict[str, str] = field(default_factory=dict)
    caller: str = ""  # the calling service ("" : unknown)
    caller_namespace: str = schema.DEFAULT_NAMESPACE


class ExplainError(ValueError):
    """A request or documents that cannot be explained (a bad URL, a policy that does not
    compile)."""


def _describe_match(cond: StringMatch) -> str:
    if cond.kind in ("present", "absent"):
        return cond.kind
    return f"{cond.kind} {cond.value!r}"


def why_not(
    match: RequestMatch,
    method: str,
    path: str,
    headers: Mapping[str, str],
    query: Mapping[str, str],
) -> list[str]:
    """Every condition of `match` the request fails, in words (empty: it matches). Each
    condition is tested by its compiled matcher, as the sidecar tests it."""
    out = []
    if match.methods and method not in match.methods:
        out.append(f"method {method} is not {', '.join(sorted(match.methods))}")
    if match.path is not None and not match.path.test(path):
        out.append(f"path {path!r} does not match {_describe_match(match.path)}")
    for name, cond in match.headers:
        if not cond.test(headers.get(name)):
            got = headers.get(name)
            seen = "absent" if got is None else repr(got)
            out.append(f"header {name} is {seen}, wanted {_describe_match(cond)}")
    for name, cond in match.query:
        if not cond.test(query.get(name)):
            got = query.get(name)
            seen = "absent" if got is None else repr(got)
            out.append(f"query parameter {name} is {seen}, wanted {_describe_match(cond)}")
    return out


def _selector_matches(selector: Sequence[tuple[str, str]], inst: Mapping[str, Any]) -> bool:
    return all(str(inst.get(k, "")) == v for k, v in selector)


def _filters(f: RuleFilters, host: str, target: str) -> list[str]:
    out = []
    if f.rate_limit is not None:
        rl = f.rate_limit
        key = {"none": "one bucket", "caller": "per caller", "header": f"per {rl.header}"}[rl.key]
        out.append(
            f"rate limit at the {rl.at} sidecar: {rl.buckets.rate:g}/s, burst "
            f"{rl.buckets.burst:g}, {key}; over it: 429 rate_limited"
        )
    if f.redirect is not None:
        rd = f.redirect
        out.append(
            f"redirect: {rd.status} to {rd.location(host, target)} (the caller's sidecar answers)"
        )
    if f.fault is not None:
        fa = f.fault
        when = (
            " when " + ", ".join(f"{n} {_describe_match(c)}" for n, c in fa.headers)
            if fa.headers
            else ""
        )
        if fa.abort_status:
            out.append(f"fault: abort {fa.abort_status} for {fa.abort_fraction:g}%{when}")
        if fa.delay:
            out.append(f"fault: delay {fa.delay:g}s for {fa.delay_fraction:g}%{when}")
    if f.rewrite is not None:
        rw = f.rewrite
        new = rw.path(target)
        if new is not None:
            how = f"prefix {rw.prefix!r} -> {rw.replacement!r}" if rw.prefix else "regex"
            out.append(f"rewrite: path by {how}: {target} -> {new}")
        if rw.host is not None:
            out.append(f"rewrite: Host -> {rw.host}")
    if f.mirror is not None:
        m = f.mirror
        sub = f"/{m.subset}" if m.subset else ""
        out.append(f"mirror: {m.fraction:g}% copied to {m.service}{sub} (Host -shadow)")
    return out


def explain(
    req: ExplainRequest,
    resources: Sequence[Mapping[str, Any]],
    services: Sequence[Mapping[str, Any]] = (),
    sidecars: Sequence[Mapping[str, Any]] = (),
    version: int = 0,
) -> list[str]:
    """The lines of `tether explain` for `req` (see the module's docstring)."""
    try:
        url = urlsplit(req.url if "://" in req.url else f"http://{req.url}")
        auth = parse_authority(url.netloc.encode("ascii"), 443 if url.scheme == "https" else 80)
    except (BadMessageError, UnicodeEncodeError, ValueError) as exc:
        raise ExplainError(f"invalid URL {req.url!r}: {exc}") from None
    path = url.path or "/"
    target = path + (f"?{url.query}" if url.query else "")
    method = req.method.upper()
    headers = {k.lower(): v for k, v in req.headers.items()}
    query = dict(parse_qsl(url.query, keep_blank_values=True)) if url.query else {}
    who = f"{req.caller}.{req.caller_namespace}" if req.caller else "an app"
    lines = [f"request: {method} {url.geturl()} from {who}"]
    lines += _caller_lines(req, sidecars, version)
    try:
        decoded = compiled.decode(resources)
        table, mesh = compiled.compile_table(decoded, version)
        specs = compile_specs(table, mesh, PoolPolicy(), PoolKeys())
    except PolicyError as exc:
        raise ExplainError(f"the stored policy does not compile: {exc}") from None

    if auth.service is None:
        return [*lines, *_egress_lines(auth.host, mesh)]
    ns = auth.namespace or req.caller_namespace
    svc = auth.service
    lines.append(f"logical target: service {svc} in namespace {ns}")
    pol = table.policy(ns, svc)
    if auth.namespace is not None and not _known(services, svc, ns):
        # orders.payments: a mesh service if one is registered, else an egress host.
        lines.append(f"  no instance of {svc}.{ns} is registered: the host is called as egress")
        return [*lines, *_egress_lines(auth.host, mesh)]
    dest_svc, dest_ns, subset = svc, ns, None
    rule_filters: RuleFilters | None = None
    lines.append("route:")
    if pol is None or not pol.rules:
        lines.append(f"  no Route for {svc}: requests go to the service itself")
    else:
        rule = pol.match(method, path, pol.read_headers(_fields(headers)), url.query)
        for i, r in enumerate(pol.rules):
            if r is rule:
                cond = "every request" if r.match.catch_all else "all conditions hold"
                lines.append(f"  rules[{i}]: MATCHES ({cond})")
                break
            reasons = why_not(r.match, method, path, headers, query)
            lines.append(f"  rules[{i}]: no: {'; '.join(reasons)}")
        if rule is None:
            lines.append(f"  no rule matches: requests go to {svc} itself")
        else:
            dest_svc, dest_ns, subset = rule.service, rule.namespace, rule.subset
            rule_filters = rule.filters
            where = f"{dest_svc}" + (f" subset {subset}" if subset else "")
            lines.append(f"  destination: {where}")
            if rule.request_headers:
                lines.append(f"  request headers: {_edit(rule.request_headers)}")
            if rule.response_headers:
                lines.append(f"  response headers: {_edit(rule.response_headers)}")
    if rule_filters is not None:
        lines.append("filters (in order):")
        lines += [f"  {x}" for x in _filters(rule_filters, url.netloc, target)]
        if rule_filters.redirect is not None:
            return lines
    dest = pol if (dest_ns, dest_svc) == (ns, svc) else table.policy(dest_ns, dest_svc)
    lines += _split_lines(dest, subset)
    lines += _endpoint_lines(dest, dest_svc, dest_ns, subset, services, req)
    spec = specs.get(dest_ns, dest_svc)
    lb = spec.load_balancer
    if lb is None:
        lines.append("balancer: peak_ewma (the sidecar's default), preferring the caller's zone")
    else:
        zone = "preferring the caller's zone" if lb.locality else "ignoring zones"
        lines.append(f"balancer: {lb.policy} (ServiceDefaults), {zone}")
    request_timeout = spec.request_timeout or LISTENER_REQUEST_TIMEOUT
    lines.append(f"timeouts: connect {spec.connect_timeout:g}s, request {request_timeout:g}s")
    lines.append(f"retries: {_retry_line(spec.retry)}")
    lines.append(f"circuit breaker: {_breaker_line(spec.circuit_breaker)}")
    lines.append(f"outlier detection: {_outlier_line(spec.outlier_detection)}")
    d = dest.defaults if dest is not None else None
    svc_mtls = d.mtls if isinstance(d, schema.ServiceDefaultsSpec) else None
    mode = schema.effective_mtls_mode(mesh.mtls if mesh else None, svc_mtls, dest_ns)
    lines.append(f"mTLS at the destination: {mode} (callers proven by SPIFFE ID)")
    lines.append(_authorization_line(decoded, req, dest_ns, dest_svc, method, path, headers))
    return lines


def _authorization_line(
    decoded: Sequence[schema.Resource],
    req: ExplainRequest,
    dest_ns: str,
    dest_svc: str,
    method: str,
    path: str,
    headers: Mapping[str, str],
) -> str:
    """What the destination's inbound sidecar decides for this caller (its intentions,
    the mesh's default action, isolation), as proxy/authz.py would."""
    from proxy.authz import InboundAuthz
    from wire.authz import Source

    policy = InboundAuthz(dest_ns, dest_svc).compile(decoded)
    src = Source(req.caller_namespace, req.caller) if req.caller else None
    d = policy.decide(src, method, path, headers)
    verdict = "allowed" if d.allowed else "refused (403 forbidden_by_policy)"
    who = str(src) if src is not None else "an anonymous caller (no --from)"
    return f"authorization at the destination: {verdict} for {who}: {d.reason}"


def _seconds(value: float) -> str:
    return f"{value * 1000:g}ms" if value < 1 else f"{value:g}s"


def _retry_line(spec: RetrySpec | None) -> str:
    if spec is None or spec.attempts <= 1:
        return "none (1 attempt)"
    on = [name for name, bit in RETRY_ON_BITS.items() if spec.on & bit]
    text = f"{spec.attempts} attempts on {', '.join(on) or 'nothing'}"
    if spec.statuses:
        text += f" (statuses {', '.join(str(c) for c in sorted(spec.statuses))})"
    text += "; per try " + (_seconds(spec.per_try_timeout) if spec.per_try_timeout else "none")
    text += f"; backoff {_seconds(spec.backoff_base)}-{_seconds(spec.backoff_max)}"
    text += (
        f"; budget {spec.budget_ratio:.0%} over {_seconds(spec.budget_window)} "
        f"(min {spec.budget_min_per_second}/s)"
    )
    if not spec.non_idempotent:
        text += "; idempotent methods only"
    return text


def _breaker_line(spec: CircuitBreakerSpec | None) -> str:
    if spec is None:
        return "none configured"
    return (
        f"max {spec.max_connections} connections, {spec.max_pending_requests} pending, "
        f"{spec.max_active_requests} active requests, {spec.max_active_retries} active retries"
    )


def _outlier_line(spec: OutlierSpec | None) -> str:
    if spec is None:
        return "none configured"
    text = (
        f"eject after {spec.consecutive_5xx} consecutive 5xx for "
        f"{_seconds(spec.base_ejection)} (growing to {_seconds(spec.max_ejection)}), "
        f"at most {spec.max_ejection_percent}% of endpoints"
    )
    if spec.success_rate is not None:
        text += "; success-rate ejection on"
    if spec.failure_percentage is not None:
        text += "; failure-percentage ejection on"
    return text


def _fields(headers: Mapping[str, str]) -> list[tuple[bytes, bytes]]:
    return [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]


def _edit(edit: Any) -> str:
    parts = [f"remove {n}" for n in edit.remove]
    parts += [f"set {n}: {v}" for n, v in edit.set]
    parts += [f"add {n}: {v}" for n, v in edit.add]
    return ", ".join(parts)


def _known(services: Sequence[Mapping[str, Any]], svc: str, ns: str) -> bool:
    for s in services:
        if s.get("service") == svc:
            return any(i.get("namespace", "default") == ns for i in s.get("instances", ()))
    return False


def _caller_lines(
    req: ExplainRequest, sidecars: Sequence[Mapping[str, Any]], version: int
) -> list[str]:
    if not req.caller:
        return ["caller: not given (--from SERVICE): the control plane's current config"]
    mine = [
        s
        for s in sidecars
        if s.get("service") == req.caller and s.get("namespace") == req.caller_namespace
    ]
    if not mine:
        return [f"caller: no sidecar of {req.caller} is connected: the current config (v{version})"]
    acked = sorted({int(s.get("acked_version", 0)) for s in mine})
    state = "in sync" if acked == [version] else f"applied {', '.join(f'v{v}' for v in acked)}"
    return [f"caller: {len(mine)} sidecar(s) of {req.caller}, config v{version} ({state})"]


def _egress_lines(host: str, mesh: schema.MeshConfigSpec | None) -> list[str]:
    from proxy.policy_router import egress_allowed

    if mesh is None:
        return [f"egress to {host}: the sidecar's --egress flag decides (no MeshConfig)"]
    eg = mesh.egress
    ok = eg.mode == "allow" or egress_allowed(host, eg.hosts)
    verdict = "allowed" if ok else "denied: 403 egress_denied"
    return [f"egress to {host}: {verdict} (MeshConfig egress mode {eg.mode})"]


def _split_lines(dest: ServicePolicy | None, subset: str | None) -> list[str]:
    if dest is None or dest.split is None:
        if subset is not None:
            return [f"split: none; the rule names subset {subset}"]
        return ["split: none (every instance of the service)"]
    sp = dest.split
    weights = " ".join(f"{n}={w}" for n, w in sp.shares)
    if subset is not None:
        return [f"split: {weights}, bypassed: the rule names subset {subset}"]
    sticky = ""
    if sp.sticky_header:
        sticky = f", sticky by header {sp.sticky_header}"
    elif sp.sticky_cookie:
        sticky = f", sticky by cookie {sp.sticky_cookie}"
    return [f"split: {weights} (drawn per request{sticky})"]


def _endpoint_lines(
    dest: ServicePolicy | None,
    svc: str,
    ns: str,
    subset: str | None,
    services: Sequence[Mapping[str, Any]],
    req: ExplainRequest,
) -> list[str]:
    instances = [
        i
        for s in services
        if s.get("service") == svc
        for i in s.get("instances", ())
        if i.get("namespace", "default") == ns
    ]
    subsets = dict(dest.subsets) if dest is not None else {}
    wanted: list[str | None] = [subset]
    if subset is None and dest is not None and dest.split is not None:
        wanted = [n for n, _ in dest.split.shares]
    out = []
    for name in wanted:
        selector = subsets[name].selector if name is not None and name in subsets else ()
        chosen = [i for i in instances if _selector_matches(selector, i)]
        label = f"subset {name} ({', '.join(f'{k}={v}' for k, v in selector)})" if name else svc
        out.append(f"endpoints of {label}: {len(chosen)}")
        for i in sorted(chosen, key=lambda i: str(i.get("id", ""))):
            out.append(
                f"  {i.get('id', '')}  {i.get('address', '')}  zone {i.get('zone') or '-'}"
                f"  {i.get('health', '?')}"
            )
    return out
