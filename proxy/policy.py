"""The sidecar's applied policy: check a pushed snapshot, compile it, make it live.

`Policy.apply` is what the policy client calls for each snapshot. It decodes every
resource again with the shared schema (`wire.resources`, which the control plane imports
too; the sidecar imports nothing of `controlplane/`), compiles them into an immutable
`RoutingTable` and `ClusterSpecs`, and then switches make-before-break, as Envoy does
with xDS: clusters for every new destination and the subset clusters of every new
subset exist before the table that routes to them goes live in one assignment;
clusters no longer used are dropped last.
Any error leaves the running table untouched and is raised for the NACK.

On the hot path, `route(namespace, service)` is one dict lookup; the first request to
a service the control plane has not heard of also notes an interest in it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from proxy import balance
from proxy.authz import InboundAuthz
from proxy.balance import Balancer, WeightedRoundRobin
from proxy.circuit_breaker import CircuitBreakerSpec
from proxy.cluster import Cluster, ServiceDirectory
from proxy.cluster_spec import ClusterSpecs, PoolKeys, compile_specs, default_specs
from proxy.errors import PolicyError
from proxy.hedging import HedgeSpec
from proxy.pool import PoolPolicy
from proxy.retry import RetrySpec
from proxy.route_filters import (
    BucketStore,
    Fault,
    Mirror,
    RateLimit,
    Redirect,
    Rewrite,
    RuleFilters,
    TokenBuckets,
)
from proxy.routing import (
    NO_EDIT,
    HeaderEdit,
    RegexError,
    RequestMatch,
    RouteRule,
    RoutingTable,
    ServicePolicy,
    Split,
    StringMatch,
    Subset,
)
from proxy.rule_index import INDEX_MIN, RuleIndex
from wire import push as protocol
from wire import resources as schema

log = logging.getLogger("tether.policy")

# How long `apply` waits for discovery's first answer about a new destination.
RESOLVE_TIMEOUT = 3.0


# -- compiling ---------------------------------------------------------------------------


def _string_match(
    exact: str | None, regex: str | None, present: bool | None, where: str
) -> StringMatch:
    if exact is not None:
        return StringMatch.of("exact", exact)
    if regex is not None:
        try:
            return StringMatch.of("regex", regex)
        except RegexError as exc:
            raise PolicyError(f"{where}.regex: {exc}") from None
    return StringMatch("present" if present in (True, None) else "absent")


def _edit(spec: schema.HeaderChangeSpec | None) -> HeaderEdit:
    if spec is None:
        return NO_EDIT
    return HeaderEdit(
        add=tuple((k.lower(), v) for k, v in spec.add.items()),
        set=tuple((k.lower(), v) for k, v in spec.set.items()),
        remove=tuple(k.lower() for k in spec.remove),
    )


def _rule(
    res: schema.Resource, i: int, rule: schema.RouteRuleSpec, buckets: BucketStore | None = None
) -> RouteRule:
    where = f"{res.key}: spec.rules[{i}]"
    m = rule.match
    path = None
    if m.path is not None:
        p = m.path
        if p.exact is not None:
            path = StringMatch.of("exact", p.exact)
        elif p.prefix is not None:
            path = StringMatch.of("prefix", p.prefix)
        elif p.regex is not None:
            try:
                path = StringMatch.of("regex", p.regex)
            except RegexError as exc:
                raise PolicyError(f"{where}.match.path.regex: {exc}") from None
    headers = tuple(
        (h.name.lower(), _string_match(h.exact, h.regex, h.present, f"{where}.match.headers[{j}]"))
        for j, h in enumerate(m.headers)
    )
    query = tuple(
        (q.name, _string_match(q.exact, q.regex, q.present, f"{where}.match.queryParams[{j}]"))
        for j, q in enumerate(m.query_params)
    )
    methods = frozenset({m.method.upper()}) if m.method else frozenset()
    return RouteRule(
        match=RequestMatch(methods, path, headers, query),
        service=rule.destination.service or res.name,
        namespace=res.namespace,
        subset=rule.destination.subset,
        request_headers=_edit(rule.request_headers),
        response_headers=_edit(rule.response_headers),
        label=f"{res.name}.{res.namespace}#{i}",
        filters=_filters(res, i, rule, buckets),
        retry=RetrySpec.of(rule.retries) if rule.retries is not None else None,
        circuit_breaker=(
            CircuitBreakerSpec.of(rule.circuit_breaker) if rule.circuit_breaker else None
        ),
        hedge=HedgeSpec.of(rule.hedging) if rule.hedging is not None else None,
    )


def _filters(
    res: schema.Resource, i: int, rule: schema.RouteRuleSpec, buckets: BucketStore | None
) -> RuleFilters | None:
    """A rule's L7 filters (proxy/route_filters.py), or None when it has none."""
    if not (rule.fault or rule.rate_limit or rule.redirect or rule.rewrite or rule.mirror):
        return None
    where = f"{res.key}: spec.rules[{i}]"
    names: set[str] = set()
    fault = None
    if rule.fault is not None:
        f = rule.fault
        fheaders = tuple(
            (h.name.lower(),
             _string_match(h.exact, h.regex, h.present, f"{where}.fault.headers[{j}]"))
            for j, h in enumerate(f.headers)
        )  # fmt: skip
        names.update(n for n, _ in fheaders)
        fault = Fault(
            headers=fheaders,
            delay=f.delay.fixed if f.delay else 0.0,
            delay_fraction=f.delay.percentage if f.delay else 0.0,
            abort_status=f.abort.status if f.abort else 0,
            abort_fraction=f.abort.percentage if f.abort else 0.0,
        )
    limit = None
    if rule.rate_limit is not None:
        rl = rule.rate_limit

        def make() -> TokenBuckets:
            return TokenBuckets(rl.requests, rl.interval, rl.burst or rl.requests, rl.max_keys)

        # A snapshot that leaves this rule's limit as it was keeps its buckets.
        key = (res.namespace, res.name, i, rl)
        tb = buckets.get(key, make) if buckets is not None else make()
        header = (rl.header or "").lower()
        if rl.key == "header":
            names.add(header)
        limit = RateLimit(tb, rl.at, rl.key, header)
    redirect = None
    if rule.redirect is not None:
        rd = rule.redirect
        redirect = Redirect(rd.status, rd.scheme, rd.host, rd.port, rd.path)
    rewrite = None
    if rule.rewrite is not None:
        rw = rule.rewrite
        mp = rule.match.path
        pattern = None
        if rw.regex is not None:
            try:
                pattern = StringMatch.of("regex", rw.regex.pattern).pattern
            except RegexError as exc:
                raise PolicyError(f"{where}.rewrite.regex.pattern: {exc}") from None
        rewrite = Rewrite(
            prefix=mp.prefix if rw.prefix is not None and mp is not None else None,
            replacement=rw.prefix or "",
            pattern=pattern,
            substitution=rw.regex.substitution if rw.regex is not None else "",
            host=rw.host,
        )
    mirror = None
    if rule.mirror is not None:
        mi = rule.mirror
        mirror = Mirror(
            service=mi.service or rule.destination.service or res.name,
            namespace=res.namespace,
            subset=mi.subset,
            fraction=mi.percentage,
            max_body=mi.max_body_bytes,
        )
    return RuleFilters(fault, limit, redirect, rewrite, mirror, frozenset(names))


def decode(resources: Sequence[Mapping[str, Any]]) -> list[schema.Resource]:
    """Every resource decoded and checked by the shared schema; PolicyError naming all
    problems."""
    out: list[schema.Resource] = []
    problems: list[str] = []
    for i, data in enumerate(resources):
        try:
            res = schema.Resource.from_dict(data)
        except schema.SchemaError as exc:
            meta = data.get("metadata") if isinstance(data.get("metadata"), dict) else {}
            name = f"{data.get('kind')} {meta.get('namespace', '')}/{meta.get('name')}"  # type: ignore[union-attr]
            problems += [f"resources[{i}] ({name}): {p}" for p in exc.problems if p.is_error]
            continue
        # The same meaning checks the control plane ran (a snapshot may come from a
        # replica of another version, or from a KV written behind the API's back).
        errors = [p for p in schema.check_resource(res) if p.is_error]
        if errors:
            problems += [f"resources[{i}] ({res.key}): {p}" for p in errors]
        else:
            out.append(res)
    if problems:
        raise PolicyError("; ".join(problems))
    return out


def compile_table(
    resources: Iterable[schema.Resource],
    version: int = 0,
    hash_: str = "",
    buckets: BucketStore | None = None,
) -> tuple[RoutingTable, schema.MeshConfigSpec | None]:
    """The RoutingTable for these resources (and the MeshConfig among them); rate-limit
    buckets are taken from `buckets` when it has them, and added to it."""
    routes: dict[tuple[str, str], schema.Resource] = {}
    splits: dict[tuple[str, str], schema.Resource] = {}
    defaults: dict[tuple[str, str], schema.Resource] = {}
    mesh: schema.MeshConfigSpec | None = None
    for res in resources:
        key = (res.namespace, res.name)
        if isinstance(res.spec, schema.MeshConfigSpec):
            mesh = res.spec
        elif isinstance(res.spec, schema.RouteSpec):
            routes[key] = res
        elif isinstance(res.spec, schema.TrafficSplitSpec):
            splits[key] = res
        elif isinstance(res.spec, schema.ServiceDefaultsSpec):
            defaults[key] = res
    services: dict[tuple[str, str], ServicePolicy] = {}
    for key in {*routes, *splits, *defaults}:
        ns, svc = key
        rules: tuple[RouteRule, ...] = ()
        if key in routes:
            res = routes[key]
            assert isinstance(res.spec, schema.RouteSpec)
            rules = tuple(_rule(res, i, r, buckets) for i, r in enumerate(res.spec.rules))
        split = None
        subsets: dict[str, Subset] = {}
        if key in splits:
            res = splits[key]
            spec = splits[key].spec
            assert isinstance(spec, schema.TrafficSplitSpec)
            total = sum(s.weight for s in spec.subsets)
            if total != 100:
                raise PolicyError(f"{res.key}: subset weights sum to {total}, not 100")
            for s in spec.subsets:
                if s.name in subsets:
                    raise PolicyError(f"{res.key}: subset {s.name!r} defined twice")
                subsets[s.name] = Subset(s.name, tuple(sorted(s.selector.items())))
            sticky = spec.sticky
            split = Split(
                shares=tuple((s.name, s.weight) for s in spec.subsets),
                sticky_header=sticky.header.lower() if sticky and sticky.header else None,
                sticky_cookie=sticky.cookie if sticky else None,
                cookie_ttl=sticky.ttl if sticky else None,
            )
        dflt = defaults[key].spec if key in defaults else None
        services[key] = ServicePolicy(
            service=svc,
            namespace=ns,
            rules=rules,
            split=split,
            subsets=subsets,
            defaults=dflt,
        )

    # Which request headers each logical service's decision can read: its rules', and
    # the sticky header/cookie of every split a request to it can end in.
    def sticky_names(pol: ServicePolicy | None) -> set[bytes]:
        if pol is None or pol.split is None:
            return set()
        sp = pol.split
        if sp.sticky_header:
            return {sp.sticky_header.encode()}
        return {b"cookie"} if sp.sticky_cookie else set()

    for key, pol in list(services.items()):
        names = sticky_names(pol)
        for rule in pol.rules:
            names.update(n.encode() for n, _ in rule.match.headers)
            if rule.filters is not None:
                names.update(n.encode() for n in rule.filters.header_names)
            if rule.subset is None:
                names |= sticky_names(services.get((rule.namespace, rule.service)))
        index = RuleIndex(pol.rules) if len(pol.rules) > INDEX_MIN else None
        services[key] = dataclasses.replace(pol, header_names=frozenset(names), index=index)
    # A route may name a subset only of a destination that defines it.
    for pol in services.values():
        for i, rule in enumerate(pol.rules):
            if rule.subset is None:
                continue
            dest = services.get((rule.namespace, rule.service))
            if dest is None or rule.subset not in dest.subsets:
                raise PolicyError(
                    f"Route {pol.namespace}/{pol.service}: spec.rules[{i}].destination: "
                    f"subset {rule.subset!r} of {rule.service} is not defined by a TrafficSplit"
                )
        for i, rule in enumerate(pol.rules):
            mirror = rule.filters.mirror if rule.filters is not None else None
            if mirror is None or mirror.subset is None:
                continue
            dest = services.get((mirror.namespace, mirror.service))
            if dest is None or mirror.subset not in dest.subsets:
                raise PolicyError(
                    f"Route {pol.namespace}/{pol.service}: spec.rules[{i}].mirror: subset "
                    f"{mirror.subset!r} of {mirror.service} is not defined by a TrafficSplit"
                )
    return RoutingTable(services, version, hash_), mesh


# -- the live policy ---------------------------------------------------------------------


class SubsetCluster:
    """A cluster holding the endpoints of `parent` that a subset selects (kept in step)."""

    def __init__(self, parent: Cluster, subset: Subset, balancer: Balancer) -> None:
        self.parent = parent
        self.subset = subset
        self.cluster = Cluster(parent.service, parent.namespace, balancer)
        self.cluster.name = f"{parent.name}/{subset.name}"
        self.generation = -1

    def current(self) -> Cluster:
        parent = self.parent
        if parent.generation != self.generation:
            self.generation = parent.generation
            self.cluster.set_endpoints(self.subset.filter(parent.endpoints), parent.source)
        return self.cluster


_UNKNOWN: Any = object()


def _routing(pol: ServicePolicy | None) -> ServicePolicy | None:
    """`pol` if it changes where requests go (rules or a split), else None: a service
    with only ServiceDefaults keeps the plain path."""
    return pol if pol is not None and (pol.rules or pol.split is not None) else None


class Policy:
    """The policy a sidecar runs; starts empty (defaults) and changes only by `apply`."""

    def __init__(
        self,
        directory: ServiceDirectory,
        *,
        namespace: str = "default",
        interest: Callable[[str, str], None] | None = None,
        balancer_factory: Callable[[], Balancer] = WeightedRoundRobin,
        resolve_timeout: float = RESOLVE_TIMEOUT,
        zone: str = "",
    ) -> None:
        self.directory = directory
        self.namespace = namespace
        self.zone = zone
        self.interest = interest
        self.balancer_factory = balancer_factory
        self.resolve_timeout = resolve_timeout
        self.table = RoutingTable()
        self.mesh: schema.MeshConfigSpec | None = None
        self.resources: tuple[dict[str, Any], ...] = ()
        self.version = 0
        self.hash = ""
        self.applied_at = 0.0
        # The inbound listener's intentions (proxy/authz.py), compiled and switched with
        # each snapshot; None: this policy does not authorize (tests, no inbound).
        self.inbound_authz: InboundAuthz | None = None
        self.subset_clusters: dict[tuple[str, str, str], SubsetCluster] = {}
        # Every cluster's compiled settings (proxy/cluster_spec.py: balancer, timeouts),
        # resolved against the sidecar's own pool policy (`use_pool_policy`).
        self.pool_keys = PoolKeys()
        self.pool_policy = PoolPolicy()
        self.specs: ClusterSpecs = default_specs(self.pool_policy, self.pool_keys)
        # ServiceDefaults' balancers in force, and what each cluster had before them.
        self.balancers: dict[tuple[str, str], balance.LoadBalancerPolicy] = {}
        self._replaced: dict[tuple[str, str], tuple[Cluster, Balancer]] = {}
        # The hot path's one lookup: every service seen so far -> its policy or None.
        self._routes: dict[tuple[str, str], ServicePolicy | None] = {}
        self._lock = asyncio.Lock()
        # The rate-limit buckets of the applied table (kept while a rule's limit stays).
        self.buckets = BucketStore()
        # Called after each snapshot is in force (the sidecar's mTLS mode follows it).
        self.on_applied: list[Callable[[], None]] = []

    # -- hot path --------------------------------------------------------------------------

    def route(self, namespace: str, service: str) -> ServicePolicy | None:
        """The policy for a logical target; None sends it to its own cluster as is."""
        pol = self._routes.get((namespace, service), _UNKNOWN)
        if pol is _UNKNOWN:
            pol = _routing(self.table.policy(namespace, service))
            self._routes[(namespace, service)] = pol
            if self.interest is not None:
                self.interest(service, namespace)
        return pol  # type: ignore[no-any-return]

    def subset_cluster(self, namespace: str, service: str, subset: str) -> Cluster | None:
        """The cluster of one subset; None when the table does not define the subset or
        discovery does not know the service."""
        key = (namespace, service, subset)
        sc = self.subset_clusters.get(key)
        parent = self.directory.lookup(namespace, service)
        if sc is None or sc.parent is not parent:
            # The service appeared after the snapshot was applied, or discovery made a
            # new cluster for it: build the subset over what discovery has now.
            spec = self.table.subset(namespace, service, subset)
            if spec is None or parent is None:
                return None
            sc = SubsetCluster(parent, spec, self._balancer(self.balancers.get(key[:2])))
            self.subset_clusters = {**self.subset_clusters, key: sc}
        return sc.current()

    def defaults(self, namespace: str, service: str) -> schema.ServiceDefaultsSpec | None:
        pol = self.table.policy(namespace, service)
        d = pol.defaults if pol is not None else None
        return d if isinstance(d, schema.ServiceDefaultsSpec) else None

    # -- applying ------------------------------------------------------------------------

    async def apply(self, snapshot: protocol.Snapshot) -> None:
        """Check, compile, make, switch, break. Raises PolicyError; then nothing changed."""
        async with self._lock:
            resources = decode(snapshot.resources)
            self.buckets.discard()
            table, mesh = compile_table(resources, snapshot.version, snapshot.hash, self.buckets)
            authz = self.inbound_authz
            try:
                inbound = authz.compile(resources) if authz is not None else None
            except Exception as exc:  # checked by decode already: a bug if it gets here
                raise PolicyError(f"intentions: {exc}") from None
            specs = compile_specs(table, mesh, self.pool_policy, self.pool_keys)
            lb = specs.load_balancers()
            # Make: clusters for every destination, then the subsets over them, and the
            # balancers ServiceDefaults ask for.
            wanted = table.subsets_in_use()
            parents = {(ns, svc) for ns, svc, _ in wanted} | table.destinations() | set(lb)
            clusters = await self._resolve_all(parents)
            new_balancers: dict[tuple[str, str], tuple[Cluster, Balancer]] = {}
            for key, lbp in lb.items():
                cluster = clusters.get(key)
                replaced = self._replaced.get(key)
                same_cluster = replaced is not None and replaced[0] is cluster
                if cluster is None or (self.balancers.get(key) == lbp and same_cluster):
                    continue
                new_balancers[key] = (cluster, balance.build_balancer(lbp, self.zone))
            made: dict[tuple[str, str, str], SubsetCluster] = {}
            for ns, svc, name in wanted:
                subset = table.subset(ns, svc, name)
                parent = clusters.get((ns, svc))
                if subset is None or parent is None:
                    continue  # an unknown service: requests to it fail as without policy
                old = self.subset_clusters.get((ns, svc, name))
                same_lb = self.balancers.get((ns, svc)) == lb.get((ns, svc))
                if old is not None and old.parent is parent and old.subset == subset and same_lb:
                    made[(ns, svc, name)] = old
                else:
                    made[(ns, svc, name)] = SubsetCluster(
                        parent, subset, self._balancer(lb.get((ns, svc)))
                    )
            for sc in made.values():
                sc.current()
            # Switch (no await from here on, so no request sees half of it).
            self.table, self.mesh = table, mesh
            if authz is not None and inbound is not None:
                authz.install(inbound)
            self.specs = specs
            self.buckets.commit()
            self._routes = {key: _routing(table.policy(*key)) for key in self._routes}
            for key, pol in table.services.items():
                self._routes[key] = _routing(pol)
            self.version, self.hash = snapshot.version, snapshot.hash
            self.resources = snapshot.resources
            self.applied_at = asyncio.get_running_loop().time()
            for key, (cluster, balancer) in new_balancers.items():
                prev = self._replaced.get(key)
                if prev is None or prev[0] is not cluster:
                    self._replaced[key] = (cluster, cluster.balancer)
                balancer.update(cluster.endpoints)
                cluster.balancer = balancer
            # Break: subsets nothing routes to any more; balancers of ServiceDefaults
            # that are gone give way to what the cluster had.
            self.subset_clusters = made
            for key in [k for k in self._replaced if k not in lb]:
                cluster, original = self._replaced.pop(key)
                original.update(cluster.endpoints)
                cluster.balancer = original
            self.balancers = {k: v for k, v in lb.items() if k in self._replaced}
        for callback in self.on_applied:
            callback()

    def use_pool_policy(self, pool_policy: PoolPolicy) -> None:
        """The sidecar's own pool settings (its connect timeout applies where neither
        ServiceDefaults nor MeshConfig set one): the specs are compiled again over them."""
        self.pool_policy = pool_policy
        self.specs = compile_specs(self.table, self.mesh, pool_policy, self.pool_keys)

    def _balancer(self, lbp: balance.LoadBalancerPolicy | None) -> Balancer:
        return balance.build_balancer(lbp, self.zone) if lbp else self.balancer_factory()

    async def _resolve_all(self, keys: Iterable[tuple[str, str]]) -> dict[tuple[str, str], Cluster]:
        keys = list(keys)

        async def one(ns: str, svc: str) -> Cluster | None:
            found = self.directory.lookup(ns, svc)
            if found is not None:
                return found
            try:
                return await asyncio.wait_for(self.directory.resolve(ns, svc), self.resolve_timeout)
            except Exception as exc:
                # Discovery's trouble is not the snapshot's fault: no NACK for it; the
                # subset is built when the service shows up (`subset_cluster`).
                log.info("policy: %s.%s not resolved yet (%r)", svc, ns, exc)
                return None

        found = await asyncio.gather(*(one(ns, svc) for ns, svc in keys))
        return {k: c for k, c in zip(keys, found, strict=True) if c is not None}

    def describe(self) -> dict[str, Any]:
        """What `/config_dump` shows of the policy."""
        return {
            "version": self.version,
            "hash": self.hash,
            "resources": list(self.resources),
            "subsets": sorted(f"{svc}.{ns}/{name}" for ns, svc, name in self.subset_clusters),
        }

    def __repr__(self) -> str:
        n = len(self.table.services)
        return f"<Policy v{self.version} {self.hash or 'defaults'} services={n}>"
