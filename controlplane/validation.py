"""Validation of policy documents before anything is stored: schema, then meaning.

`validate` takes the files of one apply (names and text), the resources already in
force, and optionally the registry's view of instances, and returns the decoded
resources with every `Problem` found:

- schema (from `controlplane.schema`): YAML syntax, unknown fields, wrong types,
  missing fields, kinds not supported yet;
- one resource's meaning (`schema.check_resource`): weights summing to 100, regexes
  that compile, rules after a catch-all that can never match, names;
- between resources: the same resource twice in one apply, a Route to a subset no
  TrafficSplit defines (or a change that removes a subset a Route still uses), HTTP
  routing for a service declared `tcp`. Everything is resolved inside one namespace,
  which is what makes namespaces isolate;
- against the registry (warnings only, instances may appear later): a resource for a
  service no instance has registered (a typo in the name?), a subset whose selector
  matches no instance.

Each problem names the file, the document (number, kind and name), the field path
and the line. The module does no I/O: the caller fetches the registry's view.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from controlplane.schema import (
    CLUSTER_KINDS,
    DEFAULT_NAMESPACE,
    FUTURE_KINDS,
    FieldPath,
    Problem,
    Resource,
    ResourceKey,
    RouteSpec,
    SchemaError,
    ServiceDefaultsSpec,
    SourceDocument,
    TrafficSplitSpec,
    canonical_kind,
    check_resource,
    decode_document,
    format_path,
    load_documents,
    parse_path,
)

# (namespace, service) → the Meta of each registered instance.
InstanceView = Mapping[tuple[str, str], Sequence[Mapping[str, str]]]


@dataclass
class Validated:
    """The outcome: resources in document order, and every problem (errors and warnings)."""

    resources: list[Resource] = field(default_factory=list)
    sources: dict[ResourceKey, SourceDocument] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.is_error]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if not p.is_error]

    @property
    def ok(self) -> bool:
        return not self.errors


def instance_namespace(meta: Mapping[str, str]) -> str:
    """An instance's namespace: its Meta `namespace`, `default` when it has none."""
    return meta.get("namespace") or DEFAULT_NAMESPACE


def selects(selector: Mapping[str, str], meta: Mapping[str, str]) -> bool:
    return all(meta.get(k) == v for k, v in selector.items())


def decode_files(files: Iterable[tuple[str, str]]) -> Validated:
    """Schema and single-resource checks of every document of every file."""
    out = Validated()
    for name, text in files:
        try:
            docs = load_documents(text, name)
        except SchemaError as exc:
            out.problems += exc.problems
            continue
        for doc in docs:
            res, problems = decode_document(doc)
            out.problems += problems
            if res is None:
                continue
            for p in check_resource(res):
                located = doc.problem(p.message, parse_path(p.path), severity=p.severity)
                out.problems.append(located)
            if res.key in out.sources:
                first = out.sources[res.key]
                out.problems.append(
                    doc.problem(
                        f"{res.key} is already defined in {first.file} document {first.index}",
                        ("metadata", "name"),
                    )
                )
                continue
            out.sources[res.key] = doc
            out.resources.append(res)
    return out


def validate(
    files: Iterable[tuple[str, str]],
    existing: Mapping[ResourceKey, Resource] | None = None,
    instances: InstanceView | None = None,
) -> Validated:
    """Everything about an apply of `files` over the `existing` resources."""
    out = decode_files(files)
    if out.errors:
        return out
    view = dict(existing or {})
    view.update({r.key: r for r in out.resources})
    out.problems += check_references(view, out.sources, changed=set(out.sources))
    if instances is not None:
        out.problems += check_instances(out.resources, out.sources, instances)
    return out


def validate_deletion(
    keys: Iterable[ResourceKey], existing: Mapping[ResourceKey, Resource]
) -> list[Problem]:
    """What would break if `keys` were deleted (a Route left pointing at no subset)."""
    gone = set(keys)
    view = {k: r for k, r in existing.items() if k not in gone}
    return check_references(view, {}, changed=gone)


def check_references(
    view: Mapping[ResourceKey, Resource],
    sources: Mapping[ResourceKey, SourceDocument],
    changed: set[ResourceKey],
) -> list[Problem]:
    """Cross-resource checks over the resources that would be in force.

    Only problems that involve a `changed` resource are reported, so an apply is never
    blamed for what it did not touch. A problem lands on the Route's document when the
    Route is part of the apply, otherwise on the resource whose change caused it.
    """
    problems: list[Problem] = []
    for key, res in view.items():
        if not isinstance(res.spec, RouteSpec):
            continue
        ns, service = key.namespace, key.name
        sd = view.get(ResourceKey("ServiceDefaults", ns, service))
        if (
            sd is not None
            and isinstance(sd.spec, ServiceDefaultsSpec)
            and sd.spec.protocol == "tcp"
            and (key in changed or sd.key in changed)
        ):
            msg = f"service {service!r} is declared tcp; a Route needs http"
            problems.append(_blame(key, sd.key, sources, msg, ("spec",), ("spec", "protocol")))
        for i, rule in enumerate(res.spec.rules):
            dest = rule.destination
            if dest.subset is None:
                continue
            target = dest.service or service
            split_key = ResourceKey("TrafficSplit", ns, target)
            if key not in changed and split_key not in changed:
                continue
            split = view.get(split_key)
            names = (
                {s.name for s in split.spec.subsets}
                if split is not None and isinstance(split.spec, TrafficSplitSpec)
                else set()
            )
            if dest.subset in names:
                continue
            path: FieldPath = ("spec", "rules", i, "destination", "subset")
            if split is None:
                msg = (
                    f"subset {dest.subset!r}: no TrafficSplit {ns}/{target} defines subsets"
                    if key in changed
                    else f"Route {ns}/{service} rules[{i}] still sends to its subset "
                    f"{dest.subset!r}"
                )
            else:
                msg = (
                    f"subset {dest.subset!r} is not defined by TrafficSplit {ns}/{target} "
                    f"(it defines {', '.join(sorted(names))})"
                    if key in changed
                    else f"subset {dest.subset!r} is still used by Route {ns}/{service} rules[{i}]"
                )
            problems.append(_blame(key, split_key, sources, msg, path, ("spec", "subsets")))
        problems += check_route_limits(key, res.spec, view, sources, changed)
    return problems + check_mirror_references(view, sources, changed)


def check_mirror_references(
    view: Mapping[ResourceKey, Resource],
    sources: Mapping[ResourceKey, SourceDocument],
    changed: set[ResourceKey],
) -> list[Problem]:
    """A rule's `mirror.subset` must be one its shadow service's TrafficSplit defines."""
    problems: list[Problem] = []
    for key, res in view.items():
        if not isinstance(res.spec, RouteSpec):
            continue
        for i, rule in enumerate(res.spec.rules):
            mirror = rule.mirror
            if mirror is None or mirror.subset is None:
                continue
            target = mirror.service or rule.destination.service or key.name
            split_key = ResourceKey("TrafficSplit", key.namespace, target)
            if key not in changed and split_key not in changed:
                continue
            split = view.get(split_key)
            if isinstance(split.spec if split else None, TrafficSplitSpec):
                assert split is not None and isinstance(split.spec, TrafficSplitSpec)
                if mirror.subset in {s.name for s in split.spec.subsets}:
                    continue
            msg = (
                f"mirror subset {mirror.subset!r} is not defined by a TrafficSplit "
                f"{key.namespace}/{target}"
            )
            path: FieldPath = ("spec", "rules", i, "mirror", "subset")
            problems.append(_blame(key, split_key, sources, msg, path, ("spec", "subsets")))
    return problems


# A Route rule's circuit-breaker limits, by field name, and how they read in documents.
_LIMITS = (
    ("max_connections", "maxConnections"),
    ("max_pending_requests", "maxPendingRequests"),
    ("max_active_requests", "maxActiveRequests"),
    ("max_active_retries", "maxActiveRetries"),
)


def check_route_limits(
    key: ResourceKey,
    spec: RouteSpec,
    view: Mapping[ResourceKey, Resource],
    sources: Mapping[ResourceKey, SourceDocument],
    changed: set[ResourceKey],
) -> list[Problem]:
    """A rule's circuit breaker may only narrow its destination's: a limit above the
    destination ServiceDefaults' (or, without one there, MeshConfig's) is refused."""
    problems: list[Problem] = []
    mesh_key = ResourceKey("MeshConfig", "", "mesh")
    for i, rule in enumerate(spec.rules):
        cb = rule.circuit_breaker
        if cb is None:
            continue
        target = rule.destination.service or key.name
        sd_key = ResourceKey("ServiceDefaults", key.namespace, target)
        outer_key = sd_key
        sd = view.get(sd_key)
        outer = (
            sd.spec.circuit_breaker
            if sd is not None and isinstance(sd.spec, ServiceDefaultsSpec)
            else None
        )
        if outer is None:
            mesh = view.get(mesh_key)
            outer = getattr(mesh.spec, "circuit_breaker", None) if mesh is not None else None
            outer_key = mesh_key
        if outer is None or not {key, outer_key} & changed:
            continue
        for attr, name in _LIMITS:
            mine, theirs = getattr(cb, attr), getattr(outer, attr)
            if mine > theirs:
                msg = (
                    f"circuitBreaker.{name} {mine} is above the {outer_key.kind} limit "
                    f"{theirs} of service {target!r}"
                )
                path: FieldPath = ("spec", "rules", i, "circuitBreaker", name)
                problems.append(
                    _blame(key, outer_key, sources, msg, path, ("spec", "circuitBreaker", name))
                )
    return problems


def _blame(
    primary: ResourceKey,
    secondary: ResourceKey,
    sources: Mapping[ResourceKey, SourceDocument],
    message: str,
    primary_path: FieldPath,
    secondary_path: FieldPath,
) -> Problem:
    if primary in sources:
        return sources[primary].problem(message, primary_path)
    if secondary in sources:
        return sources[secondary].problem(message, secondary_path)
    # A deletion: no document to point at.
    return Problem(
        message,
        kind=secondary.kind,
        namespace=secondary.namespace or None,
        name=secondary.name,
    )


def check_instances(
    resources: Iterable[Resource],
    sources: Mapping[ResourceKey, SourceDocument],
    instances: InstanceView,
) -> list[Problem]:
    """Warnings for services no instance has registered, and for subsets that select no
    instance registered right now."""
    problems: list[Problem] = []

    def warn(res: Resource, msg: str, path: FieldPath) -> None:
        doc = sources.get(res.key)
        if doc is not None:
            problems.append(doc.problem(msg, path, severity="warning"))
            return
        problems.append(
            Problem(
                msg,
                format_path(path),
                kind=res.kind,
                namespace=res.namespace,
                name=res.name,
                severity="warning",
            )
        )

    unregistered_named: set[tuple[str, str]] = set()  # once per service, at its first
    for res in resources:
        metas = instances.get((res.namespace, res.name))
        if metas is None or res.kind in CLUSTER_KINDS:
            continue
        if not metas:
            if (res.namespace, res.name) in unregistered_named:
                continue
            unregistered_named.add((res.namespace, res.name))
            warn(
                res,
                f"no instance of service {res.namespace}/{res.name} is registered "
                "(a typo in the name? instances may also register later)",
                ("metadata", "name"),
            )
            continue
        if not isinstance(res.spec, TrafficSplitSpec):
            continue
        for i, subset in enumerate(res.spec.subsets):
            if any(selects(subset.selector, m) for m in metas):
                continue
            msg = (
                f"subset {subset.name!r} selects no instance of {res.namespace}/{res.name} "
                f"yet (of {len(metas)} registered)"
            )
            warn(res, msg, ("spec", "subsets", i, "selector"))
    return problems


def identities(files: Iterable[tuple[str, str]]) -> tuple[list[ResourceKey], list[Problem]]:
    """The resources documents name (for delete -f): kind and metadata only; the spec
    is not checked, so a document that no longer validates can still be deleted."""
    keys: list[ResourceKey] = []
    problems: list[Problem] = []
    for name, text in files:
        try:
            docs = load_documents(text, name)
        except SchemaError as exc:
            problems += exc.problems
            continue
        for doc in docs:
            d = doc.data
            if not isinstance(d, dict):
                problems.append(doc.problem("a resource must be a mapping"))
                continue
            kind = d.get("kind")
            canon = canonical_kind(kind) if isinstance(kind, str) else None
            if canon is None or canon in FUTURE_KINDS or canon != kind:
                problems.append(doc.problem(f"unknown kind {kind!r}", ("kind",)))
                continue
            meta = d.get("metadata")
            name_ = meta.get("name") if isinstance(meta, dict) else None
            if not isinstance(name_, str) or not name_:
                problems.append(doc.problem("missing field 'name'", ("metadata",)))
                continue
            ns = meta.get("namespace") if isinstance(meta, dict) else None
            if canon in CLUSTER_KINDS:
                ns = ""
            elif ns is None:
                ns = DEFAULT_NAMESPACE
            elif not isinstance(ns, str):
                problems.append(doc.problem("expected a string", ("metadata", "namespace")))
                continue
            keys.append(ResourceKey(canon, ns, name_))
    return keys, problems
