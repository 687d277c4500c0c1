"""Tether's policy resources, as both the control plane and the sidecars read them.

Resources are Kubernetes-style documents::

    apiVersion: tether.dev/v1alpha1
    kind: TrafficSplit            # ServiceDefaults | Route | TrafficSplit | MeshConfig | Intention
    metadata: {name: orders, namespace: default, labels: {team: shop}}
    spec: {...}

Each kind's `spec` is a frozen dataclass (config classes end in `Spec` or `Policy`).
The same field declarations drive decoding (`Resource.from_dict`: unknown fields, wrong
types, missing fields and "exactly one of" groups become `Problem`s naming the field
path, `spec.rules[2].match.path.regex`), encoding (`Resource.to_dict`, omitting
defaults the author did not write: a field written with its default value is kept,
`Resource.explicit`, so `from_dict(to_dict(r)) == r`), and the JSON Schema that
`controlplane.schema` writes to `docs/schema/`, so the three cannot drift apart.

Meaning across resources is checked by `controlplane.validation`; one resource's
meaning (weights summing to 100, regexes compiling as RE2, rules that can never match)
by `check_resource` here, which a sidecar runs again on a pushed snapshot. This module
imports only the standard library (and RE2 when a regex is checked): YAML with line
numbers lives in `controlplane.schema`, so a sidecar never loads PyYAML.

Naming: a service's `ServiceDefaults`, `Route` and `TrafficSplit` are each named after
the service they configure (one of each per service and namespace, as Consul's
config entries); `MeshConfig` is mesh-wide, named `mesh`, without a namespace. An
`Intention` is named after its destination service, or `*` (every service of its
namespace; namespace `*` too: every service of the mesh).
"""

# ruff: noqa: RUF009  (spec_field() is the schema's dataclass field specifier)
from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import (
    Annotated,
    Any,
    ClassVar,
    Literal,
    NamedTuple,
    TypeGuard,
    Union,
    get_args,
    get_origin,
)
from typing import get_type_hints as _get_type_hints

API_VERSION = "tether.dev/v1alpha1"
DEFAULT_NAMESPACE = "default"
MESH_CONFIG_NAME = "mesh"

# Field paths: names as written in documents (camelCase) and list indexes.
FieldPath = tuple[str | int, ...]

# A duration is written as Go/Kubernetes write it ("250ms", "5s", "1m30s") and held
# as float seconds.
Duration = Annotated[float, "duration"]

Severity = Literal["error", "warning"]


# -- problems ----------------------------------------------------------------------------


def format_path(path: Sequence[str | int]) -> str:
    """`("spec", "rules", 2, "match")` → `spec.rules[2].match`."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else part
    return out


@dataclass
class Problem:
    """One thing wrong with a document: where (file, document, field path, line), and what.

    `document` counts from 1 in the order documents appear in the file (empty
    documents count too, so the number matches what the author sees).
    """

    message: str
    path: str = ""
    line: int | None = None
    column: int | None = None
    file: str | None = None
    document: int | None = None
    kind: str | None = None
    namespace: str | None = None
    name: str | None = None
    severity: Severity = "error"

    @property
    def is_error(self) -> bool:
        return self.severity == "error"

    def where(self) -> str:
        parts = []
        loc = self.file or ""
        if self.line is not None:
            loc = f"{loc}:{self.line}" if loc else f"line {self.line}"
        if loc:
            parts.append(loc)
        what = ""
        if self.kind and self.name:
            ns = f"{self.namespace}/" if self.namespace else ""
            what = f"{self.kind} {ns}{self.name}"
        if self.document is not None:
            parts.append(f"document {self.document}" + (f" ({what})" if what else ""))
        elif what:
            parts.append(what)
        if self.path:
            parts.append(self.path)
        return ": ".join(parts)

    def __str__(self) -> str:
        where = self.where()
        tag = "" if self.is_error else "warning: "
        return f"{where}: {tag}{self.message}" if where else f"{tag}{self.message}"

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Problem:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


class SchemaError(ValueError):
    """Documents that do not fit the schema; `problems` says every way they do not."""

    def __init__(self, problems: Sequence[Problem]) -> None:
        self.problems = list(problems)
        first = str(self.problems[0]) if self.problems else "invalid document"
        more = len(self.problems) - 1
        super().__init__(first + (f" (and {more} more)" if more > 0 else ""))


# -- field declarations ------------------------------------------------------------------


def spec_field(doc: str, *, default: Any = dataclasses.MISSING, factory: Any = None) -> Any:
    """A schema field: its documentation (for the JSON Schema) and its default."""
    md = {"doc": doc}
    if factory is not None:
        return field(default_factory=factory, metadata=md)
    if default is dataclasses.MISSING:
        return field(metadata=md)
    return field(default=default, metadata=md)


def camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(p.capitalize() for p in rest)


# -- the resources -----------------------------------------------------------------------

Protocol = Literal["http", "tcp", "http2", "grpc"]
BalancerName = Literal["round_robin", "random", "least_request", "peak_ewma", "ring_hash", "maglev"]
HashSource = Literal["header", "cookie", "query_parameter", "source_ip"]
EgressMode = Literal["allow", "deny"]

FUTURE = "is not supported yet"


@dataclass(frozen=True)
class MetadataSpec:
    """Who a resource is. `generation` is set by the control plane (ignored on input)."""

    name: str = spec_field("The resource's name; for per-service kinds, the service's name.")
    namespace: str = spec_field(
        "Namespace; resources only affect services of their own namespace.",
        default=DEFAULT_NAMESPACE,
    )
    labels: dict[str, str] = spec_field("Free-form labels.", factory=dict)
    annotations: dict[str, str] = spec_field("Free-form annotations.", factory=dict)
    generation: int = spec_field(
        "Set by the control plane: how many times the spec has changed.", default=0
    )


@dataclass(frozen=True)
class HashPolicy:
    """One thing a consistent-hash balancer (ring_hash, maglev) may hash a request by."""

    field: HashSource = spec_field("header, cookie, query_parameter or source_ip.")
    name: str = spec_field("The header, cookie or parameter name (not for source_ip).", default="")
    terminal: bool = spec_field("If present, do not combine with later policies.", default=False)


@dataclass(frozen=True)
class SlowStartPolicy:
    """Ramp a new instance's share of requests up instead of sending it a full share."""

    window: Duration = spec_field("How long the ramp lasts.")
    aggression: float = spec_field("1.0 ramps linearly; larger ramps faster early.", default=1.0)
    min_weight_percent: float = spec_field("The share it starts at, in percent.", default=10.0)


@dataclass(frozen=True)
class LoadBalancerPolicy:
    """How a caller picks an instance of a service: `proxy.balance.build_balancer` takes
    this very type."""

    policy: BalancerName = spec_field(
        "round_robin, random, least_request (power of two choices), peak_ewma, "
        "ring_hash or maglev.",
        default="peak_ewma",
    )
    hash_policies: tuple[HashPolicy, ...] = spec_field(
        "ring_hash, maglev: what to hash, the first present wins.", default=()
    )
    choice_count: int = spec_field("least_request: how many instances to compare.", default=2)
    ring_size: int = spec_field("ring_hash: ring points per lowest-weight instance.", default=1024)
    max_ring_size: int = spec_field("ring_hash: cap on the whole ring.", default=262144)
    table_size: int = spec_field("maglev: lookup table size (a prime).", default=16381)
    locality: bool = spec_field("Prefer instances in the caller's zone.", default=True)
    locality_threshold: float = spec_field(
        "Stay in the caller's zone while at least this share (0-1] of its instances is available.",
        default=0.7,
    )
    slow_start: SlowStartPolicy | None = spec_field(
        "Ramp new instances up (not for ring_hash or maglev); unset: no slow start.",
        default=None,
    )


MTLSMode = Literal["strict", "permissive"]


@dataclass(frozen=True)
class ServiceMTLSPolicy:
    """How a service's inbound sidecars treat plaintext callers."""

    mode: MTLSMode | None = spec_field(
        "strict (plaintext refused: 400 mtls_required) or permissive (mTLS and plaintext, "
        "for a migration); unset: the namespace's, then the mesh's.",
        default=None,
    )


@dataclass(frozen=True)
class NamespaceMTLSPolicy:
    """mTLS settings of one namespace."""

    mode: MTLSMode | None = spec_field(
        "strict or permissive for the namespace's services; unset: the mesh's.", default=None
    )
    isolated: bool = spec_field(
        "Only intentions of this namespace that name the caller's namespace let other "
        "namespaces' callers in (not the default action, not wildcard namespaces).",
        default=False,
    )


@dataclass(frozen=True)
class MeshMTLSPolicy:
    """Mutual TLS between sidecars (every sidecar attached to a control plane with a CA)."""

    mode: MTLSMode = spec_field(
        "strict (default: plaintext refused) or permissive (both accepted).", default="strict"
    )
    namespaces: dict[str, NamespaceMTLSPolicy] = spec_field(
        "Per-namespace settings, by namespace name.", factory=dict
    )


def effective_mtls_mode(
    mesh: MeshMTLSPolicy | None, service: ServiceMTLSPolicy | None, namespace: str
) -> MTLSMode:
    """The mode a service's inbound sidecars run: its ServiceDefaults' if set, else its
    namespace's in the MeshConfig, else the mesh's (strict without any MeshConfig)."""
    if service is not None and service.mode is not None:
        return service.mode
    if mesh is None:
        return "strict"
    ns = mesh.namespaces.get(namespace)
    if ns is not None and ns.mode is not None:
        return ns.mode
    return mesh.mode


RetryOn = Literal[
    "connect-failure",
    "refused-stream",
    "reset",
    "5xx",
    "gateway-error",
    "retriable-status-codes",
    "retriable-headers",
    # gRPC calls (HTTP/2 streams), by grpc-status, as Envoy's retry_on names them.
    "cancelled",
    "deadline-exceeded",
    "internal",
    "resource-exhausted",
    "unavailable",
]
RETRY_ON_DEFAULT: tuple[RetryOn, ...] = ("connect-failure", "refused-stream", "reset")


@dataclass(frozen=True)
class BackoffPolicy:
    """Wait before a retry: a random time in [0, min(max, base * 2**(retry - 1))] (full
    jitter)."""

    base: Duration = spec_field("The first retry's cap.", default=0.025)
    max: Duration = spec_field("The cap of every retry's wait.", default=0.25)


@dataclass(frozen=True)
class RetryBudgetPolicy:
    """Retries allowed over a sliding window: `ratio` of the requests, plus `minPerSecond`."""

    ratio: float = spec_field("Retries per request over the window, 0-1.", default=0.2)
    window: Duration = spec_field("The sliding window.", default=10.0)
    min_per_second: int = spec_field("Retries always allowed per second.", default=10)


@dataclass(frozen=True)
class RetryPolicy:
    """Send a failed request again, to another instance where there is one."""

    attempts: int = spec_field("Attempts in all, the first included (at least 1).", default=2)
    per_try_timeout: Duration | None = spec_field(
        "Timeout of each attempt (until its response head); unset: only the request's.",
        default=None,
    )
    retry_on: tuple[RetryOn, ...] = spec_field(
        "What is retried: connect-failure, refused-stream, reset, 5xx, gateway-error "
        "(502, 503, 504), retriable-status-codes, retriable-headers; for gRPC calls by "
        "grpc-status: cancelled, deadline-exceeded, internal, resource-exhausted, unavailable.",
        default=RETRY_ON_DEFAULT,
    )
    retriable_status_codes: tuple[int, ...] = spec_field(
        "Statuses retried with retriable-status-codes.", default=()
    )
    retriable_headers: tuple[str, ...] = spec_field(
        "Response headers whose presence makes a response retriable (retriable-headers).",
        default=(),
    )
    backoff: BackoffPolicy = spec_field("Wait before each retry.", factory=BackoffPolicy)
    budget: RetryBudgetPolicy = spec_field(
        "How many retries the destination takes.", factory=RetryBudgetPolicy
    )
    retry_non_idempotent: bool = spec_field(
        "Retry POST, PATCH, CONNECT too (only if the application de-duplicates).", default=False
    )
    buffer_limit: int = spec_field(
        "Request body bytes kept for a replay; a longer body is never retried.", default=65536
    )
    allow_header_override: bool = spec_field(
        "Let x-tether-retry-attempts / x-tether-retry-on request headers lower or change "
        "this policy per request.",
        default=False,
    )


@dataclass(frozen=True)
class CircuitBreakerPolicy:
    """Resource limits; past one the request gets 503 `overflow` at once."""

    max_connections: int = spec_field("Connections to each instance.", default=1024)
    max_pending_requests: int = spec_field(
        "Requests waiting for a connection to each instance.", default=1024
    )
    max_active_requests: int = spec_field("Requests in flight to the service.", default=1024)
    max_active_retries: int = spec_field("Retries in flight to the service.", default=3)


@dataclass(frozen=True)
class SuccessRatePolicy:
    """Eject instances whose success rate is below mean - stdevFactor * stdev."""

    minimum_hosts: int = spec_field("Instances with enough requests needed.", default=5)
    request_volume: int = spec_field("Requests an instance needs in the interval.", default=100)
    stdev_factor: float = spec_field("How many standard deviations below the mean.", default=1.9)


@dataclass(frozen=True)
class FailurePercentagePolicy:
    """Eject instances failing at least `threshold` percent of their requests."""

    threshold: int = spec_field("Failure percentage, 0-100.", default=85)
    minimum_hosts: int = spec_field("Instances with enough requests needed.", default=5)
    request_volume: int = spec_field("Requests an instance needs in the interval.", default=50)


@dataclass(frozen=True)
class OutlierDetectionPolicy:
    """Take failing instances out of rotation for a while; back through one trial request."""

    consecutive_5xx: int = spec_field(
        "Consecutive 5xx (connect failures, resets and timeouts included) that eject; 0: off.",
        default=5,
    )
    consecutive_gateway_errors: int = spec_field(
        "Consecutive 502/503/504 (and local failures) that eject; 0: off.", default=0
    )
    consecutive_connect_failures: int = spec_field(
        "Consecutive connect failures that eject; 0: off.", default=0
    )
    interval: Duration = spec_field(
        "How often success rate and failure percentage are evaluated.", default=1.0
    )
    success_rate: SuccessRatePolicy | None = spec_field(
        "Success-rate ejection; unset: off.", default=None
    )
    failure_percentage: FailurePercentagePolicy | None = spec_field(
        "Failure-percentage ejection; unset: off.", default=None
    )
    base_ejection_time: Duration = spec_field(
        "First ejection's length; each further one lasts one base longer.", default=30.0
    )
    max_ejection_time: Duration = spec_field("Cap on an ejection's length.", default=300.0)
    max_ejection_percent: int = spec_field(
        "Most instances ejected at once, in percent (at least one may always be).", default=10
    )


@dataclass(frozen=True)
class HedgingPolicy:
    """Send an idempotent request a second time, to another instance, when the first
    attempt has no response head after `delay` (or after `delayPercentile` of the
    latest requests' latencies); the first head wins, the other attempt is cancelled."""

    ONE_OF: ClassVar[tuple[tuple[str, ...], ...]] = (("delay", "delayPercentile"),)

    delay: Duration | None = spec_field(
        "How long the first attempt waits for its response head.", default=None
    )
    max_hedges: int = spec_field("Hedges per request (1).", default=1)
    idempotent: bool = spec_field(
        "Hedge every method (the requests are idempotent); false: GET, HEAD, OPTIONS only.",
        default=False,
    )
    delay_percentile: float | None = spec_field(
        "Instead of delay: this percentile (0-100, exclusive) of the latest requests' "
        "latencies to the destination, within minDelay-maxDelay.",
        default=None,
    )
    min_delay: Duration = spec_field("With delayPercentile: the shortest delay.", default=0.005)
    max_delay: Duration = spec_field(
        "With delayPercentile: the longest delay, and the delay until minSamples are in.",
        default=0.25,
    )
    min_samples: int = spec_field(
        "With delayPercentile: latencies needed before the percentile is used (1-128).",
        default=20,
    )


@dataclass(frozen=True)
class HealthCheckPolicy:
    """Active health checks by the caller's sidecar: an HTTP GET of `path` on each
    instance it sends to, through the same mTLS as its requests; an instance is used only
    while both this check and the registry's say it is healthy."""

    path: str = spec_field("The path probed (a 2xx answer is a success).")
    interval: Duration = spec_field(
        "Time between two probes of an instance (jittered by up to 10%).", default=5.0
    )
    timeout: Duration = spec_field(
        "A probe's time to connect and read the response head (at most `interval`).",
        default=1.0,
    )
    unhealthy_threshold: int = spec_field(
        "Consecutive failed probes that take a healthy instance out of rotation.", default=2
    )
    healthy_threshold: int = spec_field(
        "Consecutive successful probes that bring a failed instance back.", default=2
    )


@dataclass(frozen=True)
class ServiceDefaultsSpec:
    """Per-service defaults: protocol, balancing and timeouts."""

    FUTURE_FIELDS: ClassVar[frozenset[str]] = frozenset(
        {"retryPolicy", "fault", "faultInjection", "mirror", "rateLimit"}
    )

    # Fields written here that live on a Route rule: the error says where.
    MOVED_FIELDS: ClassVar[dict[str, str]] = {
        k: f"a Route rule's '{k}' (spec.rules[].{k} of the service's Route)"
        for k in ("fault", "mirror", "rateLimit")
    }

    protocol: Protocol = spec_field(
        "http, tcp, http2 or grpc (HTTP/2: the app is served h2c).", default="http"
    )
    opaque_ports: tuple[int, ...] = spec_field(
        "Ports carried as opaque TCP, without protocol detection.", default=()
    )
    load_balancer: LoadBalancerPolicy = spec_field(
        "How callers balance over its instances.", factory=LoadBalancerPolicy
    )
    connect_timeout: Duration | None = spec_field(
        "Connect timeout; unset: MeshConfig's.", default=None
    )
    request_timeout: Duration | None = spec_field(
        "Whole-request timeout; unset: MeshConfig's.", default=None
    )
    mtls: ServiceMTLSPolicy = spec_field(
        "mTLS mode of the service's inbound sidecars.", factory=ServiceMTLSPolicy
    )
    retries: RetryPolicy | None = spec_field(
        "Retries of calls to the service; unset: MeshConfig's.", default=None
    )
    circuit_breaker: CircuitBreakerPolicy | None = spec_field(
        "Resource limits of calls to the service; unset: MeshConfig's.", default=None
    )
    outlier_detection: OutlierDetectionPolicy | None = spec_field(
        "Ejection of failing instances; unset: MeshConfig's.", default=None
    )
    health_check: HealthCheckPolicy | None = spec_field(
        "Active health checks of its instances by callers' sidecars; unset: MeshConfig's.",
        default=None,
    )
    hedging: HedgingPolicy | None = spec_field(
        "Hedged requests to the service; unset: none.", default=None
    )


@dataclass(frozen=True)
class PathMatchSpec:
    """Exactly one of exact, prefix or regex (a full match of the path, no query)."""

    ONE_OF: ClassVar[tuple[tuple[str, ...], ...]] = (("exact", "prefix", "regex"),)

    exact: str | None = spec_field("The path equals this.", default=None)
    prefix: str | None = spec_field("The path starts with this.", default=None)
    regex: str | None = spec_field(
        "The whole path matches this regular expression (RE2 syntax).", default=None
    )


@dataclass(frozen=True)
class HeaderMatchSpec:
    """A header (name case-insensitive) equals, matches, or is present/absent."""

    ONE_OF: ClassVar[tuple[tuple[str, ...], ...]] = (("exact", "regex", "present"),)

    name: str = spec_field("Header name.")
    exact: str | None = spec_field("The value equals this.", default=None)
    regex: str | None = spec_field(
        "The whole value matches this regular expression (RE2 syntax).", default=None
    )
    present: bool | None = spec_field("true: the header is present; false: absent.", default=None)


@dataclass(frozen=True)
class QueryParamMatchSpec:
    """A query parameter equals, matches, or is present/absent."""

    ONE_OF: ClassVar[tuple[tuple[str, ...], ...]] = (("exact", "regex", "present"),)

    name: str = spec_field("Query parameter name (case-sensitive).")
    exact: str | None = spec_field("The value equals this.", default=None)
    regex: str | None = spec_field(
        "The whole value matches this regular expression (RE2 syntax).", default=None
    )
    present: bool | None = spec_field(
        "true: the parameter is present; false: absent.", default=None
    )


@dataclass(frozen=True)
class RouteMatchSpec:
    """All given conditions must hold; an empty match matches every request."""

    path: PathMatchSpec | None = spec_field("Path condition.", default=None)
    method: str | None = spec_field("HTTP method, e.g. GET.", default=None)
    headers: tuple[HeaderMatchSpec, ...] = spec_field("Header conditions (all).", default=())
    query_params: tuple[QueryParamMatchSpec, ...] = spec_field(
        "Query parameter conditions (all).", default=()
    )

    @property
    def is_catch_all(self) -> bool:
        if self.method or self.headers or self.query_params:
            return False
        p = self.path
        return p is None or p.prefix == "/" or (p.regex is not None and p.regex in (".*", "/.*"))


@dataclass(frozen=True)
class DestinationSpec:
    """Where a matching request goes: a service of the same namespace, and a subset of it."""

    service: str | None = spec_field("Service; unset: the Route's own service.", default=None)
    subset: str | None = spec_field(
        "A subset defined by the destination's TrafficSplit; unset: the service's split.",
        default=None,
    )


@dataclass(frozen=True)
class HeaderChangeSpec:
    """Header edits, applied in the order remove, set, add."""

    add: dict[str, str] = spec_field("Append a value (keep existing ones).", factory=dict)
    set: dict[str, str] = spec_field("Replace the header with this value.", factory=dict)
    remove: tuple[str, ...] = spec_field("Remove these headers.", default=())


@dataclass(frozen=True)
class RouteRuleSpec:
    """A match and where matching requests go; rules are tried in order, first match wins."""

    FUTURE_FIELDS: ClassVar[frozenset[str]] = frozenset({"retryPolicy", "faultInjection"})

    match: RouteMatchSpec = spec_field("Conditions; empty: every request.", factory=RouteMatchSpec)
    destination: DestinationSpec = spec_field(
        "Where to send; empty: the Route's own service.", factory=DestinationSpec
    )
    request_headers: HeaderChangeSpec | None = spec_field(
        "Edits to the request's headers.", default=None
    )
    response_headers: HeaderChangeSpec | None = spec_field(
        "Edits to the response's headers.", default=None
    )
    retries: RetryPolicy | None = spec_field(
        "Retries of matching requests; unset: the destination's.", default=None
    )
    circuit_breaker: CircuitBreakerPolicy | None = spec_field(
        "Limits of matching requests, within the destination's; unset: none of its own.",
        default=None,
    )
    hedging: HedgingPolicy | None = spec_field(
        "Hedged requests for matching requests; unset: the destination's.", default=None
    )
    # L7 traffic policy per rule (docs/traffic.md): run at the caller's sidecar, except
    # a rate limit with `at: inbound`.
    fault: FaultSpec | None = spec_field(
        "Inject delays and aborts (resilience testing).", default=None
    )
    rewrite: RewriteSpec | None = spec_field(
        "Rewrite the path (prefix or regex) and the Host before forwarding.", default=None
    )
    redirect: RedirectSpec | None = spec_field(
        "Answer with a redirect instead of forwarding.", default=None
    )
    rate_limit: RateLimitSpec | None = spec_field(
        "A token bucket; over the limit: 429 rate_limited with Retry-After.", default=None
    )
    mirror: MirrorSpec | None = spec_field(
        "Copy a share of requests to a shadow service (responses discarded).", default=None
    )


@dataclass(frozen=True)
class FaultDelaySpec:
    """Hold a share of requests for a fixed time before forwarding them."""

    fixed: Duration = spec_field("How long.")
    percentage: float = spec_field("Share of requests delayed, 0-100.", default=100.0)


@dataclass(frozen=True)
class FaultAbortSpec:
    """Answer a share of requests with a status instead of forwarding them."""

    status: int = spec_field("The status to answer with (200-599).")
    percentage: float = spec_field("Share of requests aborted, 0-100.", default=100.0)


@dataclass(frozen=True)
class FaultSpec:
    """Fault injection: a delay, an abort or both, for every request or only those whose
    headers match (all of `headers`)."""

    delay: FaultDelaySpec | None = spec_field("Delay before forwarding.", default=None)
    abort: FaultAbortSpec | None = spec_field("Abort with a status.", default=None)
    headers: tuple[HeaderMatchSpec, ...] = spec_field(
        "Only requests with these headers (all) get the fault; empty: every request.",
        default=(),
    )


@dataclass(frozen=True)
class RegexRewriteSpec:
    """Replace the whole path's matches of `pattern` (RE2) by `substitution` (\\1 refers
    to a group)."""

    pattern: str = spec_field("RE2 regular expression, searched in the path.")
    substitution: str = spec_field("Replacement; \\1..\\9 are the pattern's groups.")


@dataclass(frozen=True)
class RewriteSpec:
    """Rewrite the request before forwarding: path by prefix or regex, and the Host."""

    prefix: str | None = spec_field(
        "Replace the prefix the rule's match.path.prefix matched with this.", default=None
    )
    regex: RegexRewriteSpec | None = spec_field("Rewrite the path by a regex.", default=None)
    host: str | None = spec_field("Replace the Host header with this.", default=None)


RedirectScheme = Literal["http", "https"]


@dataclass(frozen=True)
class RedirectSpec:
    """Answer with a redirect: the request's URL with the given parts replaced."""

    status: int = spec_field("301, 302, 303, 307 or 308.", default=302)
    scheme: RedirectScheme | None = spec_field("http or https; unset: http.", default=None)
    host: str | None = spec_field("Host; unset: the request's.", default=None)
    port: int | None = spec_field("Port; unset: none (the scheme's default).", default=None)
    path: str | None = spec_field("Path; unset: the request's path and query.", default=None)


RateLimitSide = Literal["outbound", "inbound"]
RateLimitKey = Literal["none", "caller", "header"]


@dataclass(frozen=True)
class RateLimitSpec:
    """A token bucket: `requests` tokens every `interval`, holding at most `burst`."""

    requests: int = spec_field("Tokens added per interval.")
    interval: Duration = spec_field("The refill interval.", default=1.0)
    burst: int | None = spec_field("Bucket size; unset: `requests`.", default=None)
    at: RateLimitSide = spec_field(
        "outbound: at each caller's sidecar, per caller; inbound: at the service's own "
        "sidecars, over all callers (keyed by `key`).",
        default="outbound",
    )
    key: RateLimitKey = spec_field(
        "none: one bucket; caller: one per caller identity (inbound only); header: one "
        "per value of `header`.",
        default="none",
    )
    header: str | None = spec_field("The header for key: header.", default=None)
    max_keys: int = spec_field(
        "Buckets kept (least recently used dropped): bounds memory.", default=10000
    )


@dataclass(frozen=True)
class MirrorSpec:
    """Copy a share of requests to a shadow; its responses are discarded."""

    service: str | None = spec_field("Shadow service; unset: the rule's destination.",
                                     default=None)  # fmt: skip
    subset: str | None = spec_field("A subset of it (from its TrafficSplit).", default=None)
    percentage: float = spec_field("Share of requests copied, 0-100.", default=100.0)
    max_body_bytes: int = spec_field(
        "Requests with larger bodies are not mirrored (counted).", default=65536
    )


@dataclass(frozen=True)
class RouteSpec:
    """HTTP routing for calls to a service (the Route's name); unmatched calls go to it."""

    rules: tuple[RouteRuleSpec, ...] = spec_field("Rules in order; first match wins.")


@dataclass(frozen=True)
class SubsetSpec:
    """Instances of the service whose registry Meta has all of `selector`, and its share."""

    name: str = spec_field("Subset name (Route destinations refer to it).")
    selector: dict[str, str] = spec_field(
        "Registry Meta the instances must have, e.g. version: v2."
    )
    weight: int = spec_field("Share of requests, 0-100; all weights sum to 100.")


@dataclass(frozen=True)
class StickyPolicy:
    """Keep a client on one subset, keyed by a request header or a cookie."""

    ONE_OF: ClassVar[tuple[tuple[str, ...], ...]] = (("header", "cookie"),)

    header: str | None = spec_field("Hash this request header to pick the subset.", default=None)
    cookie: str | None = spec_field(
        "Pin by this cookie (set on first response when absent).", default=None
    )
    ttl: Duration | None = spec_field("Cookie lifetime; unset: a session cookie.", default=None)


@dataclass(frozen=True)
class TrafficSplitSpec:
    """Weighted shares of a service's traffic between subsets of its instances."""

    subsets: tuple[SubsetSpec, ...] = spec_field("The subsets and their weights.")
    sticky: StickyPolicy | None = spec_field("Stickiness; unset: every request is drawn anew.",
                                             default=None)  # fmt: skip
    analysis: AnalysisSpec | None = spec_field(
        "Progressive delivery: the control plane moves weight to the canary step by step "
        "while it meets the thresholds, and back to 0 when it breaks one.",
        default=None,
    )


@dataclass(frozen=True)
class AnalysisSpec:
    """A canary analysis: `canary` gets each step's weight in turn (`stable` the rest of
    what the two hold), each held for `interval`, while the canary's numbers (from the
    sidecars' stats) meet the thresholds; a breach rolls the canary back to 0."""

    canary: str = spec_field("The subset being promoted.")
    stable: str = spec_field("The subset that gives up weight to it.")
    steps: tuple[int, ...] = spec_field("The canary's weights in order, e.g. [5, 25, 50, 100].")
    interval: Duration = spec_field("How long each step is held and watched.")
    min_requests: int = spec_field(
        "Requests to the canary the stats window must hold before a step may advance.",
        default=20,
    )
    min_success_rate: float | None = spec_field(
        "Lowest acceptable share of the canary's requests answered below 500, in percent.",
        default=None,
    )
    max_p99: Duration | None = spec_field(
        "Highest acceptable 99th-percentile latency of the canary's requests.", default=None
    )


@dataclass(frozen=True)
class EgressPolicy:
    """Calls to hosts outside the mesh: allowed by default, or only to listed hosts."""

    mode: EgressMode = spec_field("allow: any host; deny: only `hosts`.", default="allow")
    hosts: tuple[str, ...] = spec_field(
        "Hosts always allowed: `api.example.com` or `*.example.com`.", default=()
    )


IntentionAction = Literal["allow", "deny"]
# An intention's source or destination that stands for every service (or namespace).
WILDCARD = "*"


@dataclass(frozen=True)
class MeshAuthorizationPolicy:
    """What the inbound sidecar does with a call no intention decides."""

    default_action: IntentionAction = spec_field(
        "allow or deny: the answer when no intention matches the caller (or an L7 "
        "intention's permissions match none of its requests).",
        default="allow",
    )


@dataclass(frozen=True)
class TracingPolicy:
    """Tracing's sampling (the sidecar's OTEL_TRACES_SAMPLER, when set, wins)."""

    sampling_ratio: float = spec_field(
        "Share of new traces recorded, 0-1 (parent-based: a caller's decision is kept).",
        default=1.0,
    )


@dataclass(frozen=True)
class MeshConfigSpec:
    """Mesh-wide defaults."""

    FUTURE_FIELDS: ClassVar[frozenset[str]] = frozenset({"tls", "rateLimit"})

    egress: EgressPolicy = spec_field("Egress policy.", factory=EgressPolicy)
    connect_timeout: Duration = spec_field("Default connect timeout.", default=5.0)
    request_timeout: Duration = spec_field("Default whole-request timeout.", default=15.0)
    authorization: MeshAuthorizationPolicy = spec_field(
        "Authorization at the inbound sidecar: the default action.",
        factory=MeshAuthorizationPolicy,
    )
    mtls: MeshMTLSPolicy = spec_field(
        "mTLS between sidecars: the mode, and per-namespace settings.", factory=MeshMTLSPolicy
    )
    retries: RetryPolicy | None = spec_field(
        "Default retries; unset: none (a service's or route's own apply).", default=None
    )
    circuit_breaker: CircuitBreakerPolicy | None = spec_field(
        "Default resource limits; unset: none.", default=None
    )
    outlier_detection: OutlierDetectionPolicy | None = spec_field(
        "Default ejection of failing instances; unset: none.", default=None
    )
    health_check: HealthCheckPolicy | None = spec_field(
        "Default active health checks by callers' sidecars; unset: none.", default=None
    )
    hedging: HedgingPolicy | None = spec_field(
        "Default hedged requests; unset: none (a service's or route's own apply).",
        default=None,
    )
    tracing: TracingPolicy | None = spec_field(
        "Tracing sampling; absent: OpenTelemetry's default (parent-based, always on).",
        default=None,
    )


@dataclass(frozen=True)
class IntentionHeaderMatchSpec:
    """A request header (name case-insensitive; several values joined by ',') is
    present, or equals, starts with, ends with or matches; `invert` negates it."""

    ONE_OF: ClassVar[tuple[tuple[str, ...], ...]] = (
        ("exact", "prefix", "suffix", "regex", "present"),
    )

    name: str = spec_field("Header name.")
    exact: str | None = spec_field("The value equals this.", default=None)
    prefix: str | None = spec_field("The value starts with this.", default=None)
    suffix: str | None = spec_field("The value ends with this.", default=None)
    regex: str | None = spec_field(
        "The whole value matches this regular expression (RE2 syntax).", default=None
    )
    present: bool | None = spec_field(
        "true: the header is present (false is not allowed: use invert).", default=None
    )
    invert: bool = spec_field("Negate the condition.", default=False)


@dataclass(frozen=True)
class IntentionHTTPMatchSpec:
    """L7 conditions of a permission; all given ones must hold (at least one is given)."""

    path: PathMatchSpec | None = spec_field(
        "Path condition (the path without the query).", default=None
    )
    methods: tuple[str, ...] = spec_field("Methods, e.g. [GET, HEAD]; empty: any.", default=())
    headers: tuple[IntentionHeaderMatchSpec, ...] = spec_field(
        "Header conditions (all).", default=()
    )


@dataclass(frozen=True)
class IntentionPermissionSpec:
    """An action for the requests an L7 match selects; a source's permissions are tried
    in order and the first match decides."""

    action: IntentionAction = spec_field("allow or deny.")
    http: IntentionHTTPMatchSpec = spec_field("Which requests.")


@dataclass(frozen=True)
class IntentionSourceSpec:
    """Who may (or may not) call: a service, or `*`, of a namespace, or `*`.

    Exactly one of `action` (every request of the caller: an L4 intention) or
    `permissions` (an L7 intention: the first matching permission decides, none
    matching leaves it to the mesh's default action)."""

    name: str = spec_field("The calling service, or '*' for every service.")
    namespace: str | None = spec_field(
        "Its namespace, or '*' for every namespace; unset: the Intention's namespace.",
        default=None,
    )
    action: IntentionAction | None = spec_field("allow or deny (L4).", default=None)
    permissions: tuple[IntentionPermissionSpec, ...] = spec_field(
        "L7 permissions, in order (instead of action).", default=()
    )
    description: str = spec_field("Free-form description.", default="")


@dataclass(frozen=True)
class IntentionSpec:
    """Which callers may call the Intention's service (its name; `*`: every service of
    its namespace; name and namespace `*`: every service of the mesh), as Consul's
    service-intentions config entry. The most specific matching source decides."""

    sources: tuple[IntentionSourceSpec, ...] = spec_field("The callers, in any order.")


AnySpec = Union[ServiceDefaultsSpec, RouteSpec, TrafficSplitSpec, MeshConfigSpec, IntentionSpec]  # noqa: UP007

SPEC_TYPES: dict[str, type[Any]] = {
    "ServiceDefaults": ServiceDefaultsSpec,
    "Route": RouteSpec,
    "TrafficSplit": TrafficSplitSpec,
    "MeshConfig": MeshConfigSpec,
    "Intention": IntentionSpec,
}
KINDS: tuple[str, ...] = tuple(SPEC_TYPES)
# Mesh-wide kinds: no namespace.
CLUSTER_KINDS = frozenset({"MeshConfig"})
# Kinds later work brings; refused until their behaviour exists.
FUTURE_KINDS = frozenset(
    {
        "RetryPolicy",
        "FaultInjection",
        "Mirror",
        "RateLimit",
        "AuthorizationPolicy",
        "MTLSPolicy",
        "PeerAuthentication",
    }
)
# Kinds other meshes have, or reserved kinds whose behaviour arrived as fields of
# another kind: refused, naming what takes their place here.
REPLACED_KINDS: dict[str, str] = {
    "MTLSPolicy": "MeshConfig spec.mtls (mode, namespaces.<ns>.mode) and ServiceDefaults "
    "spec.mtls.mode",
    "PeerAuthentication": "MeshConfig spec.mtls (mode, namespaces.<ns>.mode) and "
    "ServiceDefaults spec.mtls.mode",
    "AuthorizationPolicy": "the Intention kind and MeshConfig spec.mtls.namespaces.<ns>.isolated",
    "FaultInjection": "a Route rule's 'fault' field (spec.rules[].fault)",
    "Mirror": "a Route rule's 'mirror' field (spec.rules[].mirror)",
    "RateLimit": "a Route rule's 'rateLimit' field (spec.rules[].rateLimit)",
}


def replaced_kind_message(kind: str) -> str | None:
    """Why a kind of another mesh is refused, naming what replaces it (None: not one)."""
    instead = REPLACED_KINDS.get(kind)
    return None if instead is None else f"kind {kind} is not a Tether kind: use {instead}"


# Metadata other tools set: accepted (so `get -o yaml | apply` works) and ignored.
# (`generation` is a field: the store sets it, whatever a document says.)
SERVER_SET_METADATA = frozenset({"resourceVersion", "uid", "creationTimestamp"})

_KIND_ALIASES: dict[str, str] = {}
for _k in (*KINDS, *FUTURE_KINDS):
    _KIND_ALIASES[_k.lower()] = _k
    _KIND_ALIASES[_k.lower() + "s"] = _k
_KIND_ALIASES.update({"sd": "ServiceDefaults", "ts": "TrafficSplit", "mc": "MeshConfig"})
_KIND_ALIASES.update({"ixn": "Intention", "serviceintentions": "Intention"})


def canonical_kind(name: str) -> str | None:
    """`trafficsplits`, `TrafficSplit`, `ts` → `TrafficSplit`; None when unknown."""
    return _KIND_ALIASES.get(name.lower())


class ResourceKey(NamedTuple):
    """A resource's identity: kind, namespace ("" for mesh-wide kinds), name."""

    kind: str
    namespace: str
    name: str

    def __str__(self) -> str:
        if self.namespace:
            return f"{self.kind} {self.namespace}/{self.name}"
        return f"{self.kind} {self.name}"


@dataclass(frozen=True)
class Resource:
    """One document: kind, metadata and the kind's spec."""

    kind: str
    metadata: MetadataSpec
    spec: AnySpec
    api_version: str = API_VERSION
    # Paths (document names, from the top: ("spec", "protocol")) of the fields the
    # author wrote with their default value: encoded too, though a default.
    explicit: frozenset[FieldPath] = frozenset()

    @property
    def key(self) -> ResourceKey:
        return ResourceKey(self.kind, self.metadata.namespace, self.metadata.name)

    @property
    def name(self) -> str:
        return self.metadata.name

    @property
    def namespace(self) -> str:
        return self.metadata.namespace

    def to_dict(self, defaults: bool = False) -> dict[str, Any]:
        """The document as applied (explicit fields kept); `defaults`: every field, the
        defaults filled in (what is in force, as `tether get --show-defaults` shows)."""
        meta = encode(self.metadata)
        if self.kind in CLUSTER_KINDS:
            meta.pop("namespace", None)
        else:
            meta["namespace"] = self.metadata.namespace
        return {
            "apiVersion": self.api_version,
            "kind": self.kind,
            "metadata": meta,
            "spec": encode(self.spec, ("spec",), self.explicit, defaults),
        }

    @classmethod
    def from_dict(cls, data: Any) -> Resource:
        """Decode a document (parsed JSON/YAML); raise SchemaError naming every problem."""
        decoder = Decoder()
        res = decoder.resource(data)
        if decoder.problems or res is None:
            raise SchemaError(decoder.problems or [Problem("invalid document")])
        return res

    def with_generation(self, generation: int) -> Resource:
        meta = dataclasses.replace(self.metadata, generation=generation)
        return dataclasses.replace(self, metadata=meta)

    def same_content(self, other: Resource) -> bool:
        """Equal apart from server-set metadata (what a re-apply would not change)."""
        a, b = self.metadata, other.metadata
        return (
            self.kind == other.kind
            and self.spec == other.spec
            and self.explicit == other.explicit
            and (a.name, a.namespace, a.labels, a.annotations)
            == (b.name, b.namespace, b.labels, b.annotations)
        )


# -- decoding ----------------------------------------------------------------------------

_INVALID: Any = object()
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_UNITS: dict[str, Fraction] = {
    "ns": Fraction(1, 10**9),
    "us": Fraction(1, 10**6),
    "µs": Fraction(1, 10**6),
    "ms": Fraction(1, 1000),
    "s": Fraction(1),
    "m": Fraction(60),
    "h": Fraction(3600),
}


def parse_duration(text: str) -> float:
    """Go's duration syntax ("1m30s", "250ms", "0.5s") → seconds; ValueError otherwise."""
    s = text.strip()
    if s == "0":
        return 0.0
    pos, total = 0, Fraction(0)
    for m in _DURATION_PART.finditer(s):
        if m.start() != pos:
            break
        total += Fraction(m.group(1)) * _UNITS[m.group(2)]
        pos = m.end()
    if pos != len(s) or not s:
        raise ValueError(f"invalid duration {text!r}: expected e.g. '5s', '250ms', '1m30s'")
    return float(total)


def format_duration(seconds: float) -> str:
    """Seconds → the shortest Go duration that parses back to exactly the same float."""
    if seconds == 0:
        return "0s"
    for unit, size in (("h", 3600), ("m", 60), ("s", 1), ("ms", 1e-3), ("us", 1e-6)):
        n = round(seconds / size)
        if n and abs(n * size - seconds) < 1e-12 * max(1.0, seconds):
            text = f"{n}{unit}"
            if parse_duration(text) == seconds:
                return text
    return f"{seconds!r}s"


@dataclass(frozen=True)
class FieldInfo:
    attr: str
    key: str  # the name in documents
    type: Any
    required: bool
    doc: str
    default: Any


_FIELDS: dict[type[Any], tuple[FieldInfo, ...]] = {}


def fields_of(cls: type[Any]) -> tuple[FieldInfo, ...]:
    """The schema fields of a dataclass (cached: the types never change)."""
    got = _FIELDS.get(cls)
    if got is None:
        got = _FIELDS[cls] = _fields_of(cls)
    return got


def _fields_of(cls: type[Any]) -> tuple[FieldInfo, ...]:
    hints = _get_type_hints(cls, include_extras=True)
    out = []
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            default, required = f.default, False
        elif f.default_factory is not dataclasses.MISSING:
            default, required = f.default_factory(), False
        else:
            default, required = None, True
        out.append(
            FieldInfo(
                f.name, camel(f.name), hints[f.name], required, f.metadata.get("doc", ""), default
            )
        )
    return tuple(out)


def _is_schema_class(tp: Any) -> TypeGuard[type[Any]]:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _is_duration(tp: Any) -> bool:
    return get_origin(tp) is Annotated and "duration" in get_args(tp)[1:]


def _optional_inner(tp: Any) -> Any | None:
    """`X | None` → X; None when `tp` is not optional."""
    if get_origin(tp) in (Union, _UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(get_args(tp)) == 2:
            return args[0]
    return None


_UnionType = type(int | None)


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return type(value).__name__


class Decoder:
    """Decodes plain data into the schema's dataclasses, collecting every problem.

    `positions` (from `load_documents`) maps a field path to the (line, column) of its
    value, and `key_positions` to the line of its key; problems then carry lines.
    """

    def __init__(
        self,
        positions: Mapping[FieldPath, tuple[int, int]] | None = None,
        key_positions: Mapping[FieldPath, tuple[int, int]] | None = None,
    ) -> None:
        self.positions = positions or {}
        self.key_positions = key_positions or {}
        self.problems: list[Problem] = []
        # Fields of the resource being decoded written with their default value.
        self.explicit: set[FieldPath] = set()

    def fail(self, path: FieldPath, message: str) -> Any:
        pos = locate(self.positions, path, self.key_positions)
        line, col = pos if pos else (None, None)
        self.problems.append(Problem(message, format_path(path), line, col))
        return _INVALID

    def resource(self, data: Any) -> Resource | None:
        self.explicit = set()
        if not isinstance(data, dict):
            self.fail((), f"a resource must be a mapping, not {_type_name(data)}")
            return None
        for key in data:
            if key not in ("apiVersion", "kind", "metadata", "spec", "status"):
                self.fail((key,), f"unknown field {key!r}")
        api = data.get("apiVersion")
        if api is None:
            self.fail((), f"missing field 'apiVersion' (expected {API_VERSION!r})")
        elif api != API_VERSION:
            self.fail(("apiVersion",), f"unsupported apiVersion {api!r}: expected {API_VERSION!r}")
        kind = data.get("kind")
        if kind is None:
            self.fail((), "missing field 'kind'")
            return None
        if not isinstance(kind, str):
            self.fail(("kind",), f"expected a string, got {_type_name(kind)}")
            return None
        replaced = replaced_kind_message(kind)
        if replaced is not None:
            self.fail(("kind",), replaced)
            return None
        if kind in FUTURE_KINDS:
            self.fail(("kind",), f"kind {kind} {FUTURE}")
            return None
        spec_type = SPEC_TYPES.get(kind)
        if spec_type is None:
            self.fail(("kind",), f"unknown kind {kind!r} (known: {', '.join(KINDS)})")
            return None
        meta = self.metadata(kind, data.get("metadata", _MISSING))
        if "spec" not in data:
            self.fail((), "missing field 'spec'")
            return None
        raw_spec = data["spec"]
        if raw_spec is None:
            raw_spec = {}
        spec = self.value(spec_type, raw_spec, ("spec",))
        if meta is _INVALID or spec is _INVALID or self.problems:
            return None
        explicit = frozenset(p for p in self.explicit if p[:1] == ("spec",))
        return Resource(kind, meta, spec, explicit=explicit)

    def metadata(self, kind: str, data: Any) -> Any:
        path: FieldPath = ("metadata",)
        if data is _MISSING or data is None:
            return self.fail((), "missing field 'metadata'")
        if not isinstance(data, dict):
            return self.fail(path, f"expected a mapping, got {_type_name(data)}")
        given = {k: v for k, v in data.items() if k not in SERVER_SET_METADATA}
        if kind in CLUSTER_KINDS:
            if given.get("namespace") not in (None, ""):
                self.fail(
                    (*path, "namespace"),
                    f"{kind} is mesh-wide: it takes no namespace",
                )
            given.pop("namespace", None)
        meta = self.value(MetadataSpec, given, path)
        if meta is _INVALID:
            return _INVALID
        if kind in CLUSTER_KINDS:
            meta = dataclasses.replace(meta, namespace="")
            if meta.name != MESH_CONFIG_NAME:
                self.fail((*path, "name"), f"{kind} must be named {MESH_CONFIG_NAME!r}")
        return meta

    def value(self, tp: Any, value: Any, path: FieldPath) -> Any:
        inner = _optional_inner(tp)
        if inner is not None:
            return None if value is None else self.value(inner, value, path)
        if _is_duration(tp):
            if not isinstance(value, str):
                return self.fail(
                    path, f"expected a duration such as '5s' or '250ms', got {_type_name(value)}"
                )
            try:
                return parse_duration(value)
            except ValueError as exc:
                return self.fail(path, str(exc))
        origin = get_origin(tp)
        if origin is Literal:
            choices = get_args(tp)
            if value not in choices or not isinstance(value, str):
                want = ", ".join(repr(c) for c in choices)
                return self.fail(path, f"expected one of {want}, got {value!r}")
            return value
        if tp is bool:
            if not isinstance(value, bool):
                return self.fail(path, f"expected a boolean, got {_type_name(value)}")
            return value
        if tp is int:
            if isinstance(value, bool) or not isinstance(value, int):
                return self.fail(path, f"expected an integer, got {_type_name(value)}")
            return value
        if tp is float:
            if isinstance(value, bool) or not isinstance(value, int | float):
                return self.fail(path, f"expected a number, got {_type_name(value)}")
            return float(value)
        if tp is str:
            if not isinstance(value, str):
                hint = ""
                if isinstance(value, bool | int | float):
                    hint = " (quote it to make it a string)"
                return self.fail(path, f"expected a string, got {_type_name(value)}{hint}")
            return value
        if origin is tuple:
            (item_tp, _) = get_args(tp)
            if not isinstance(value, list):
                return self.fail(path, f"expected a list, got {_type_name(value)}")
            items = [self.value(item_tp, v, (*path, i)) for i, v in enumerate(value)]
            return _INVALID if any(i is _INVALID for i in items) else tuple(items)
        if origin is dict:
            if not isinstance(value, dict):
                return self.fail(path, f"expected a mapping, got {_type_name(value)}")
            out: dict[str, Any] = {}
            ok = True
            item_tp = get_args(tp)[1]
            for k, v in value.items():
                if not isinstance(k, str):
                    self.fail(path, f"keys must be strings, got {_type_name(k)}")
                    ok = False
                    continue
                item = self.value(item_tp, v, (*path, k))
                ok = ok and item is not _INVALID
                out[k] = item
            return out if ok else _INVALID
        if _is_schema_class(tp):
            return self.dataclass(tp, value, path)
        raise TypeError(f"schema type {tp!r} not handled")  # a bug in this module

    def dataclass(self, cls: type[Any], value: Any, path: FieldPath) -> Any:
        if not isinstance(value, dict):
            return self.fail(path, f"expected a mapping, got {_type_name(value)}")
        infos = fields_of(cls)
        by_key = {f.key: f for f in infos}
        future: frozenset[str] = getattr(cls, "FUTURE_FIELDS", frozenset())
        moved: dict[str, str] = getattr(cls, "MOVED_FIELDS", {})
        ok = True
        for key in value:
            if key in by_key:
                continue
            ok = False
            if key in moved:
                self.fail((*path, key), f"field {key!r} belongs to {moved[key]}")
            elif key in future:
                self.fail((*path, key), f"field {key!r} {FUTURE}")
            else:
                known = ", ".join(sorted(by_key))
                self.fail((*path, key), f"unknown field {key!r} (known: {known})")
        kwargs: dict[str, Any] = {}
        for f in infos:
            raw = value.get(f.key)
            if raw is None:
                if f.required:
                    self.fail(path, f"missing field {f.key!r}")
                    ok = False
                continue
            decoded = self.value(f.type, raw, (*path, f.key))
            if decoded is _INVALID:
                ok = False
            else:
                kwargs[f.attr] = decoded
                if not f.required and decoded == f.default:
                    self.explicit.add((*path, f.key))
        for group in getattr(cls, "ONE_OF", ()):
            present = [k for k in group if value.get(k) is not None]
            if len(present) != 1:
                choices = ", ".join(group)
                got = f"got {', '.join(present)}" if present else "got none"
                self.fail(path, f"exactly one of {choices} is required ({got})")
                ok = False
        if not ok:
            return _INVALID
        return cls(**kwargs)


_MISSING: Any = object()


def locate(
    positions: Mapping[FieldPath, tuple[int, int]],
    path: Sequence[str | int],
    key_positions: Mapping[FieldPath, tuple[int, int]] | None = None,
) -> tuple[int, int] | None:
    """The (line, column) of `path`, or of its nearest ancestor that has one.

    Where the field's key was written wins over where its value starts: for a block
    mapping the value starts on the next line, but the author thinks of `match:`.
    """
    p = tuple(path)
    keys = key_positions or {}
    while True:
        if p in keys:
            return keys[p]
        if p in positions:
            return positions[p]
        if not p:
            return None
        p = p[:-1]


# -- encoding ----------------------------------------------------------------------------


def encode(
    obj: Any,
    path: FieldPath = (),
    explicit: frozenset[FieldPath] = frozenset(),
    defaults: bool = False,
) -> dict[str, Any]:
    """A schema dataclass → plain data with document names, leaving out defaults except
    those `explicit` names (paths from the top; `obj` is at `path`), or none (`defaults`;
    unset optional fields stay out)."""
    out: dict[str, Any] = {}
    for f in fields_of(type(obj)):
        v = getattr(obj, f.attr)
        here = (*path, f.key)
        left_out = not f.required and v == f.default and here not in explicit
        if left_out and (not defaults or v is None):
            continue
        out[f.key] = _encode_value(f.type, v, here, explicit, defaults)
    return out


def _encode_value(
    tp: Any,
    v: Any,
    path: FieldPath = (),
    explicit: frozenset[FieldPath] = frozenset(),
    defaults: bool = False,
) -> Any:
    if v is None:
        return None
    inner = _optional_inner(tp)
    if inner is not None:
        return _encode_value(inner, v, path, explicit, defaults)
    if _is_duration(tp):
        return format_duration(v)
    if dataclasses.is_dataclass(v):
        return encode(v, path, explicit, defaults)
    if isinstance(v, tuple):
        (item_tp, _) = get_args(tp)
        return [_encode_value(item_tp, x, (*path, i), explicit, defaults) for i, x in enumerate(v)]
    if isinstance(v, dict):
        (_, item_tp) = get_args(tp)
        return {k: _encode_value(item_tp, x, (*path, k), explicit, defaults) for k, x in v.items()}
    return v


# -- meaning of one resource -------------------------------------------------------------

_TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_LABEL_KEY = re.compile(
    r"^([a-z0-9]([-a-z0-9.]*[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$"
)
_LABEL_VALUE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?$")
_HOST_PATTERN = re.compile(
    r"^(\*\.)?([a-z0-9]([-a-z0-9]*[a-z0-9])?\.)*[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
)
# Headers a route may not edit: they frame the message, so the proxy owns them.
FORBIDDEN_HEADERS = frozenset(
    {"connection", "content-length", "transfer-encoding", "keep-alive", "upgrade", "te",
     "trailer", "proxy-connection"}
)  # fmt: skip
MAX_REGEX = 1024


def valid_name(name: str) -> bool:
    """A DNS-1123 label: what services, namespaces and subsets are named."""
    return len(name) <= 63 and _NAME.match(name) is not None


def _is_prime(n: int) -> bool:
    if n < 2:
        return False
    i = 2
    while i * i <= n:
        if n % i == 0:
            return False
        i += 1
    return True


class _Checker:
    def __init__(self) -> None:
        self.problems: list[Problem] = []

    def add(self, path: FieldPath, message: str, severity: Severity = "error") -> None:
        self.problems.append(Problem(message, format_path(path), severity=severity))

    def regex(self, path: FieldPath, pattern: str) -> None:
        """Route regexes are RE2 (what the sidecar matches with: linear time, no
        backreferences or lookaround), so they are compiled by RE2 here too."""
        if len(pattern) > MAX_REGEX:
            self.add(path, f"regular expression longer than {MAX_REGEX} characters")
            return
        # Imported here: the C extension is needed only once a regex is checked.
        import re2

        options = re2.Options()
        options.log_errors = False  # the problem goes to the caller, not to stderr
        try:
            re2.compile(pattern, options=options)
        except re2.error as exc:
            reason = exc.args[0] if exc.args else exc
            if isinstance(reason, bytes):
                reason = reason.decode("utf-8", "replace")
            self.add(
                path,
                f"invalid regular expression (RE2 syntax: no backreferences or "
                f"lookaround): {reason}",
            )

    def token(self, path: FieldPath, name: str, what: str) -> None:
        if not _TOKEN.match(name):
            self.add(path, f"invalid {what} {name!r}")

    def positive(self, path: FieldPath, seconds: float | None) -> None:
        if seconds is not None and seconds <= 0:
            self.add(path, "must be greater than zero")


def check_resource(res: Resource) -> list[Problem]:
    """What is wrong with one decoded resource on its own (no other resources needed).

    The control plane runs it before storing and a sidecar again before applying a
    snapshot. Problems carry field paths; `controlplane.validation` adds lines.
    """
    c = _Checker()
    meta = res.metadata
    # An Intention may name every service (`*`), and then every namespace too (`*`).
    wild_name = res.kind == "Intention" and meta.name == WILDCARD
    wild_ns = wild_name and meta.namespace == WILDCARD
    if not valid_name(meta.name) and not wild_name:
        c.add(("metadata", "name"), f"invalid name {meta.name!r}: lower-case letters, digits "
              "and '-', starting and ending with a letter or digit, at most 63")  # fmt: skip
    if res.kind not in CLUSTER_KINDS and not valid_name(meta.namespace) and not wild_ns:
        hint = ""
        if res.kind == "Intention" and meta.namespace == WILDCARD:
            hint = " (namespace '*' goes with name '*' only)"
        c.add(("metadata", "namespace"), f"invalid namespace {meta.namespace!r}{hint}")
    for k, v in meta.labels.items():
        if not _LABEL_KEY.match(k) or len(k) > 317:
            c.add(("metadata", "labels", k), f"invalid label key {k!r}")
        if not _LABEL_VALUE.match(v) or len(v) > 63:
            c.add(("metadata", "labels", k), f"invalid label value {v!r}")
    spec = res.spec
    if isinstance(spec, ServiceDefaultsSpec):
        _check_service_defaults(c, spec)
    elif isinstance(spec, RouteSpec):
        _check_route(c, spec)
    elif isinstance(spec, TrafficSplitSpec):
        _check_split(c, spec)
    elif isinstance(spec, MeshConfigSpec):
        _check_mesh(c, spec)
    elif isinstance(spec, IntentionSpec):
        _check_intention(c, spec, meta.namespace)
    return c.problems


def _check_service_defaults(c: _Checker, spec: ServiceDefaultsSpec) -> None:
    seen: set[int] = set()
    for i, port in enumerate(spec.opaque_ports):
        if not 1 <= port <= 65535:
            c.add(("spec", "opaquePorts", i), f"port {port} out of range 1-65535")
        elif port in seen:
            c.add(("spec", "opaquePorts", i), f"port {port} listed twice")
        seen.add(port)
    lb = spec.load_balancer
    at: FieldPath = ("spec", "loadBalancer")
    hashing = lb.policy in ("ring_hash", "maglev")
    if hashing and not lb.hash_policies:
        c.add(at, f"{lb.policy} needs 'hashPolicies' (header, cookie, query_parameter or "
              "source_ip)")  # fmt: skip
    if not hashing and lb.hash_policies:
        c.add((*at, "hashPolicies"), f"only ring_hash and maglev hash, not {lb.policy}")
    if hashing and lb.slow_start is not None:
        c.add((*at, "slowStart"), f"{lb.policy} does not ramp (it would move keys)")
    for i, h in enumerate(lb.hash_policies):
        hp: FieldPath = (*at, "hashPolicies", i)
        if h.field == "source_ip" and h.name:
            c.add((*hp, "name"), "source_ip takes no name")
        elif h.field != "source_ip":
            if not h.name:
                c.add(hp, f"hashing by {h.field} needs 'name'")
            elif h.field != "query_parameter":
                c.token((*hp, "name"), h.name, f"{h.field} name")
    if not 2 <= lb.choice_count <= 16:
        c.add((*at, "choiceCount"), "must be between 2 and 16")
    if not 1 <= lb.ring_size <= 8_388_608:
        c.add((*at, "ringSize"), "must be between 1 and 8388608")
    if not lb.ring_size <= lb.max_ring_size <= 8_388_608:
        c.add((*at, "maxRingSize"), "must be between ringSize and 8388608")
    if not _is_prime(lb.table_size) or lb.table_size > 5_000_011:
        c.add((*at, "tableSize"), f"must be a prime up to 5000011, got {lb.table_size}")
    if not 0 < lb.locality_threshold <= 1:
        c.add((*at, "localityThreshold"), "must be in (0, 1]")
    if lb.slow_start is not None:
        ss = lb.slow_start
        c.positive((*at, "slowStart", "window"), ss.window)
        if not ss.aggression > 0:
            c.add((*at, "slowStart", "aggression"), "must be greater than zero")
        if not 0 <= ss.min_weight_percent <= 100:
            c.add((*at, "slowStart", "minWeightPercent"), "must be within 0-100")
    c.positive(("spec", "connectTimeout"), spec.connect_timeout)
    c.positive(("spec", "requestTimeout"), spec.request_timeout)
    _check_resilience(c, ("spec",), spec)


def _check_route(c: _Checker, spec: RouteSpec) -> None:
    catch_all: int | None = None
    matches: dict[RouteMatchSpec, int] = {}
    for i, rule in enumerate(spec.rules):
        at: FieldPath = ("spec", "rules", i)
        m = rule.match
        if catch_all is not None:
            c.add(at, f"can never match: rule [{catch_all}] before it matches every request")
        elif m in matches:
            c.add(at, f"can never match: rule [{matches[m]}] before it has the same match")
        matches.setdefault(m, i)
        if catch_all is None and m.is_catch_all:
            catch_all = i
        if m.path is not None:
            p = m.path
            for key, text in (("exact", p.exact), ("prefix", p.prefix)):
                if text is not None and not text.startswith("/"):
                    c.add((*at, "match", "path", key), "a path starts with '/'")
            if p.regex is not None:
                c.regex((*at, "match", "path", "regex"), p.regex)
        if m.method is not None:
            c.token((*at, "match", "method"), m.method, "method")
            if m.method != m.method.upper():
                c.add((*at, "match", "method"), f"methods are upper-case: {m.method.upper()!r}")
        for j, hm in enumerate(m.headers):
            c.token((*at, "match", "headers", j, "name"), hm.name, "header name")
            if hm.regex is not None:
                c.regex((*at, "match", "headers", j, "regex"), hm.regex)
        for j, qm in enumerate(m.query_params):
            if not qm.name:
                c.add((*at, "match", "queryParams", j, "name"), "must not be empty")
            if qm.regex is not None:
                c.regex((*at, "match", "queryParams", j, "regex"), qm.regex)
        d = rule.destination
        if d.service is not None and not valid_name(d.service):
            c.add((*at, "destination", "service"), f"invalid service name {d.service!r}"
                  " (a service of the Route's namespace)")  # fmt: skip
        if d.subset is not None and not valid_name(d.subset):
            c.add((*at, "destination", "subset"), f"invalid subset name {d.subset!r}")
        for key, change in (("requestHeaders", rule.request_headers),
                            ("responseHeaders", rule.response_headers)):  # fmt: skip
            if change is not None:
                _check_header_change(c, (*at, key), change)
        _check_resilience(c, at, rule)
        _check_rule_traffic(c, at, rule)


REDIRECT_STATUSES = (301, 302, 303, 307, 308)


def _check_percentage(c: _Checker, path: FieldPath, value: float) -> None:
    if not 0 <= value <= 100:
        c.add(path, f"percentage {value} out of range 0-100")


def _check_rule_traffic(c: _Checker, at: FieldPath, rule: RouteRuleSpec) -> None:
    """The L7 fields of one rule: fault, rewrite, redirect, rateLimit, mirror."""
    f = rule.fault
    if f is not None:
        fa: FieldPath = (*at, "fault")
        if f.delay is None and f.abort is None:
            c.add(fa, "a fault needs 'delay', 'abort' or both")
        if f.delay is not None:
            if not 0 < f.delay.fixed <= 3600:
                c.add((*fa, "delay", "fixed"), "must be greater than zero and at most 1h")
            _check_percentage(c, (*fa, "delay", "percentage"), f.delay.percentage)
        if f.abort is not None:
            if not 200 <= f.abort.status <= 599:
                c.add((*fa, "abort", "status"), f"status {f.abort.status} out of range 200-599")
            _check_percentage(c, (*fa, "abort", "percentage"), f.abort.percentage)
        for j, hm in enumerate(f.headers):
            c.token((*fa, "headers", j, "name"), hm.name, "header name")
            if hm.regex is not None:
                c.regex((*fa, "headers", j, "regex"), hm.regex)
    rw = rule.rewrite
    if rw is not None:
        ra: FieldPath = (*at, "rewrite")
        if rw.prefix is None and rw.regex is None and rw.host is None:
            c.add(ra, "a rewrite needs 'prefix', 'regex' or 'host'")
        if rw.prefix is not None and rw.regex is not None:
            c.add(ra, "at most one of prefix, regex (got both)")
        if rw.prefix is not None:
            p = rule.match.path
            if p is None or p.prefix is None:
                c.add((*ra, "prefix"), "a prefix rewrite needs the rule's match.path.prefix")
            if not rw.prefix.startswith("/"):
                c.add((*ra, "prefix"), "a path starts with '/'")
        if rw.regex is not None:
            c.regex((*ra, "regex", "pattern"), rw.regex.pattern)
            if any(ch in rw.regex.substitution for ch in "\r\n\0 "):
                c.add((*ra, "regex", "substitution"), "no spaces, CR, LF or NUL in a path")
        if rw.host is not None and not _valid_authority(rw.host):
            c.add((*ra, "host"), f"invalid host {rw.host!r}")
    rd = rule.redirect
    if rd is not None:
        da: FieldPath = (*at, "redirect")
        if rd.status not in REDIRECT_STATUSES:
            c.add((*da, "status"), f"status {rd.status} is not one of 301, 302, 303, 307, 308")
        if rd.host is not None and not _valid_authority(rd.host):
            c.add((*da, "host"), f"invalid host {rd.host!r}")
        if rd.port is not None and not 1 <= rd.port <= 65535:
            c.add((*da, "port"), f"port {rd.port} out of range 1-65535")
        if rd.path is not None and (
            not rd.path.startswith("/") or any(ch in rd.path for ch in "\r\n\0 ")
        ):
            c.add((*da, "path"), "a path starts with '/' and has no spaces, CR, LF or NUL")
        for other in ("rewrite", "mirror", "fault", "rate_limit"):
            if getattr(rule, other) is not None:
                c.add(da, f"a redirect answers at once: it cannot have '{camel(other)}'")
        if rule.destination.service is not None or rule.destination.subset is not None:
            c.add(da, "a redirect answers at once: it cannot have a 'destination'")
    rl = rule.rate_limit
    if rl is not None:
        la: FieldPath = (*at, "rateLimit")
        if not 1 <= rl.requests <= 1_000_000_000:
            c.add((*la, "requests"), "must be between 1 and 1000000000")
        c.positive((*la, "interval"), rl.interval)
        if rl.burst is not None and not 1 <= rl.burst <= 1_000_000_000:
            c.add((*la, "burst"), "must be between 1 and 1000000000")
        if not 1 <= rl.max_keys <= 1_000_000:
            c.add((*la, "maxKeys"), "must be between 1 and 1000000")
        if rl.key == "header":
            if rl.header is None:
                c.add(la, "key: header needs 'header'")
            else:
                c.token((*la, "header"), rl.header, "header name")
        elif rl.header is not None:
            c.add((*la, "header"), "only for key: header")
        if rl.key == "caller" and rl.at != "inbound":
            c.add((*la, "key"), "the caller's identity is known at the inbound sidecar only "
                  "(at: inbound)")  # fmt: skip
    mi = rule.mirror
    if mi is not None:
        ma: FieldPath = (*at, "mirror")
        _check_percentage(c, (*ma, "percentage"), mi.percentage)
        if mi.service is not None and not valid_name(mi.service):
            c.add((*ma, "service"), f"invalid service name {mi.service!r}")
        if mi.subset is not None and not valid_name(mi.subset):
            c.add((*ma, "subset"), f"invalid subset name {mi.subset!r}")
        if not 0 <= mi.max_body_bytes <= 16 * 1024 * 1024:
            c.add((*ma, "maxBodyBytes"), "must be between 0 and 16777216")


_AUTHORITY = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9.]*[A-Za-z0-9])?(:[0-9]{1,5})?$")


def _valid_authority(host: str) -> bool:
    return len(host) <= 253 and _AUTHORITY.match(host) is not None


def _check_header_change(c: _Checker, at: FieldPath, change: HeaderChangeSpec) -> None:
    edits: list[tuple[FieldPath, str, str | None]] = [
        *(((*at, "add", k), k, v) for k, v in change.add.items()),
        *(((*at, "set", k), k, v) for k, v in change.set.items()),
        *(((*at, "remove", i), k, None) for i, k in enumerate(change.remove)),
    ]
    for where, name, value in edits:
        c.token(where, name, "header name")
        if name.lower() in FORBIDDEN_HEADERS:
            c.add(where, f"header {name!r} is managed by the proxy")
        if value is not None and any(ch in value for ch in "\r\n\0"):
            c.add(where, "header values must not contain CR, LF or NUL")


def _check_split(c: _Checker, spec: TrafficSplitSpec) -> None:
    if not spec.subsets:
        c.add(("spec", "subsets"), "at least one subset is required")
        return
    names: dict[str, int] = {}
    total = 0
    for i, s in enumerate(spec.subsets):
        at: FieldPath = ("spec", "subsets", i)
        if not valid_name(s.name):
            c.add((*at, "name"), f"invalid subset name {s.name!r}")
        elif s.name in names:
            c.add(
                (*at, "name"), f"subset {s.name!r} is already defined at subsets[{names[s.name]}]"
            )
        names.setdefault(s.name, i)
        if not 0 <= s.weight <= 100:
            c.add((*at, "weight"), f"weight {s.weight} out of range 0-100")
        total += s.weight
        if not s.selector:
            c.add((*at, "selector"), "a selector needs at least one Meta key")
        for k in s.selector:
            if not k:
                c.add((*at, "selector"), "Meta keys must not be empty")
    if total != 100:
        c.add(("spec", "subsets"), f"weights sum to {total}, not 100")
    if spec.analysis is not None:
        _check_analysis(c, spec, names)
    st = spec.sticky
    if st is not None:
        if st.header is not None:
            c.token(("spec", "sticky", "header"), st.header, "header name")
        if st.cookie is not None:
            c.token(("spec", "sticky", "cookie"), st.cookie, "cookie name")
        if st.ttl is not None and st.cookie is None:
            c.add(("spec", "sticky", "ttl"), "ttl only applies to cookie stickiness")
        c.positive(("spec", "sticky", "ttl"), st.ttl)


def _check_analysis(c: _Checker, spec: TrafficSplitSpec, names: Mapping[str, int]) -> None:
    an = spec.analysis
    assert an is not None
    at: FieldPath = ("spec", "analysis")
    for key, name in (("canary", an.canary), ("stable", an.stable)):
        if name not in names:
            c.add((*at, key), f"{name!r} is not a subset of this TrafficSplit")
    if an.canary == an.stable:
        c.add((*at, "stable"), "the stable subset must differ from the canary")
    if not an.steps:
        c.add((*at, "steps"), "at least one step is required")
    others = sum(s.weight for s in spec.subsets if s.name not in (an.canary, an.stable))
    prev = 0
    for i, w in enumerate(an.steps):
        if not prev < w <= 100 - others:
            c.add((*at, "steps", i), f"steps must rise, each within 1-{100 - others} "
                  f"(the other subsets hold {others}), got {w}")  # fmt: skip
        prev = max(prev, w)
    if not 1.0 <= an.interval <= 86400.0:
        c.add((*at, "interval"), "must be between 1s and 24h")
    if not 1 <= an.min_requests <= 1_000_000:
        c.add((*at, "minRequests"), "must be between 1 and 1000000")
    if an.min_success_rate is not None and not 0 <= an.min_success_rate <= 100:
        c.add((*at, "minSuccessRate"), "must be within 0-100")
    c.positive((*at, "maxP99"), an.max_p99)
    if an.min_success_rate is None and an.max_p99 is None:
        c.add(at, "an analysis needs a threshold: minSuccessRate, maxP99 or both")


def _check_mesh(c: _Checker, spec: MeshConfigSpec) -> None:
    for i, host in enumerate(spec.egress.hosts):
        if not _HOST_PATTERN.match(host.lower()) or len(host) > 253:
            c.add(("spec", "egress", "hosts", i),
                  f"invalid host {host!r}: a DNS name, optionally starting with '*.'")  # fmt: skip
    c.positive(("spec", "connectTimeout"), spec.connect_timeout)
    c.positive(("spec", "requestTimeout"), spec.request_timeout)
    _check_resilience(c, ("spec",), spec)
    for ns in spec.mtls.namespaces:
        if not valid_name(ns):
            c.add(("spec", "mtls", "namespaces", ns), f"invalid namespace {ns!r}")
    if spec.tracing is not None and not 0.0 <= spec.tracing.sampling_ratio <= 1.0:
        c.add(("spec", "tracing", "samplingRatio"), "must be within 0-1")


# Methods an intention may name (RFC 9110's, and PATCH); others are refused as typos.
INTENTION_METHODS = frozenset(
    {"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"}
)


def _check_intention(c: _Checker, spec: IntentionSpec, namespace: str) -> None:
    if not spec.sources:
        c.add(("spec", "sources"), "at least one source is required")
    seen: dict[tuple[str, str], int] = {}
    for i, src in enumerate(spec.sources):
        at: FieldPath = ("spec", "sources", i)
        if src.name != WILDCARD and not valid_name(src.name):
            c.add((*at, "name"), f"invalid service name {src.name!r} (a service, or '*')")
        ns = src.namespace if src.namespace is not None else namespace
        if src.namespace is not None and ns != WILDCARD and not valid_name(ns):
            c.add((*at, "namespace"), f"invalid namespace {ns!r} (a namespace, or '*')")
        if ns == WILDCARD and src.name != WILDCARD:
            c.add((*at, "name"), "a source of every namespace ('*') must be every service ('*')")
        if (ns, src.name) in seen:
            c.add(
                at, f"source {ns}/{src.name} is already listed at sources[{seen[(ns, src.name)]}]"
            )
        seen.setdefault((ns, src.name), i)
        if src.action is None and not src.permissions:
            c.add(at, "exactly one of action, permissions is required (got none)")
        elif src.action is not None and src.permissions:
            c.add(at, "exactly one of action, permissions is required (got action, permissions)")
        if len(src.description) > 512:
            c.add((*at, "description"), "longer than 512 characters")
        for j, perm in enumerate(src.permissions):
            _check_permission(c, (*at, "permissions", j, "http"), perm.http)


def _check_permission(c: _Checker, at: FieldPath, http: IntentionHTTPMatchSpec) -> None:
    if http.path is None and not http.methods and not http.headers:
        c.add(at, "an HTTP match needs at least one of path, methods, headers")
    if http.path is not None:
        p = http.path
        for key, text in (("exact", p.exact), ("prefix", p.prefix)):
            if text is not None and not text.startswith("/"):
                c.add((*at, "path", key), "a path starts with '/'")
        if p.regex is not None:
            c.regex((*at, "path", "regex"), p.regex)
    seen: set[str] = set()
    for k, m in enumerate(http.methods):
        if m not in INTENTION_METHODS:
            hint = (
                f" (methods are upper-case: {m.upper()!r})"
                if m.upper() in INTENTION_METHODS
                else ""
            )
            c.add((*at, "methods", k), f"unknown method {m!r}{hint}")
        elif m in seen:
            c.add((*at, "methods", k), f"method {m} listed twice")
        seen.add(m)
    for k, h in enumerate(http.headers):
        c.token((*at, "headers", k, "name"), h.name, "header name")
        if h.regex is not None:
            c.regex((*at, "headers", k, "regex"), h.regex)
        if h.present is False:
            c.add((*at, "headers", k, "present"), "present: false is not allowed: "
                  "use present: true with invert: true")  # fmt: skip


# -- resilience: retries, circuit breakers, outlier detection ------------------------------

MAX_ATTEMPTS = 10
MAX_BUFFER_LIMIT = 16 * 1024 * 1024


def _check_resilience(c: _Checker, at: FieldPath, spec: Any) -> None:
    """The retries, circuitBreaker and outlierDetection of a ServiceDefaults, a Route
    rule or the MeshConfig (`at` is where they are)."""
    retries: RetryPolicy | None = getattr(spec, "retries", None)
    if retries is not None:
        _check_retries(c, (*at, "retries"), retries)
    breaker: CircuitBreakerPolicy | None = getattr(spec, "circuit_breaker", None)
    if breaker is not None:
        cb: FieldPath = (*at, "circuitBreaker")
        for name in ("max_connections", "max_pending_requests", "max_active_requests"):
            if getattr(breaker, name) < 1:
                c.add((*cb, camel(name)), "must be at least 1")
        if breaker.max_active_retries < 0:
            c.add((*cb, "maxActiveRetries"), "must not be negative")
    od: OutlierDetectionPolicy | None = getattr(spec, "outlier_detection", None)
    if od is not None:
        _check_outlier(c, (*at, "outlierDetection"), od)
    hedging: HedgingPolicy | None = getattr(spec, "hedging", None)
    if hedging is not None:
        hp: FieldPath = (*at, "hedging")
        c.positive((*hp, "delay"), hedging.delay)
        if hedging.max_hedges != 1:
            c.add((*hp, "maxHedges"), "must be 1 (one hedge per request)")
        _check_hedge_percentile(c, hp, hedging)
    hc: HealthCheckPolicy | None = getattr(spec, "health_check", None)
    if hc is not None:
        _check_health_check(c, (*at, "healthCheck"), hc)


# Latencies a percentile hedging keeps (proxy/hedging.py's window): minSamples' bound.
HEDGE_PERCENTILE_WINDOW = 128


def _check_hedge_percentile(c: _Checker, hp: FieldPath, h: HedgingPolicy) -> None:
    if h.delay_percentile is None:
        return
    if not 0 < h.delay_percentile < 100:
        c.add((*hp, "delayPercentile"), "must be between 0 and 100 (both excluded)")
    c.positive((*hp, "minDelay"), h.min_delay)
    c.positive((*hp, "maxDelay"), h.max_delay)
    if h.min_delay > h.max_delay:
        c.add((*hp, "minDelay"), "must not be above maxDelay")
    if not 1 <= h.min_samples <= HEDGE_PERCENTILE_WINDOW:
        c.add((*hp, "minSamples"), f"must be between 1 and {HEDGE_PERCENTILE_WINDOW}")


def _check_retries(c: _Checker, at: FieldPath, r: RetryPolicy) -> None:
    if not 1 <= r.attempts <= MAX_ATTEMPTS:
        c.add((*at, "attempts"), f"must be between 1 and {MAX_ATTEMPTS}")
    c.positive((*at, "perTryTimeout"), r.per_try_timeout)
    seen: set[str] = set()
    for i, on in enumerate(r.retry_on):
        if on in seen:
            c.add((*at, "retryOn", i), f"{on!r} listed twice")
        seen.add(on)
    if "retriable-status-codes" in seen and not r.retriable_status_codes:
        c.add((*at, "retriableStatusCodes"), "retriable-status-codes needs at least one status")
    if r.retriable_status_codes and "retriable-status-codes" not in seen:
        c.add((*at, "retriableStatusCodes"), "only read with retryOn retriable-status-codes")
    for i, code in enumerate(r.retriable_status_codes):
        if not 200 <= code <= 599:
            c.add((*at, "retriableStatusCodes", i), f"status {code} out of range 200-599")
    if "retriable-headers" in seen and not r.retriable_headers:
        c.add((*at, "retriableHeaders"), "retriable-headers needs at least one header name")
    for i, name in enumerate(r.retriable_headers):
        c.token((*at, "retriableHeaders", i), name, "header name")
    b = r.backoff
    c.positive((*at, "backoff", "base"), b.base)
    if b.max < b.base:
        c.add((*at, "backoff", "max"), "must be at least backoff.base")
    bud = r.budget
    if not 0 <= bud.ratio <= 1:
        c.add((*at, "budget", "ratio"), "must be within 0-1")
    c.positive((*at, "budget", "window"), bud.window)
    if bud.min_per_second < 0:
        c.add((*at, "budget", "minPerSecond"), "must not be negative")
    if not 0 <= r.buffer_limit <= MAX_BUFFER_LIMIT:
        c.add((*at, "bufferLimit"), f"must be within 0-{MAX_BUFFER_LIMIT}")


def _check_outlier(c: _Checker, at: FieldPath, od: OutlierDetectionPolicy) -> None:
    for name in ("consecutive_5xx", "consecutive_gateway_errors", "consecutive_connect_failures"):
        if getattr(od, name) < 0:
            c.add((*at, camel(name)), "must not be negative")
    c.positive((*at, "interval"), od.interval)
    c.positive((*at, "baseEjectionTime"), od.base_ejection_time)
    if od.max_ejection_time < od.base_ejection_time:
        c.add((*at, "maxEjectionTime"), "must be at least baseEjectionTime")
    if not 0 <= od.max_ejection_percent <= 100:
        c.add((*at, "maxEjectionPercent"), "must be within 0-100")
    sr = od.success_rate
    if sr is not None:
        if sr.minimum_hosts < 1:
            c.add((*at, "successRate", "minimumHosts"), "must be at least 1")
        if sr.request_volume < 1:
            c.add((*at, "successRate", "requestVolume"), "must be at least 1")
        if not sr.stdev_factor > 0:
            c.add((*at, "successRate", "stdevFactor"), "must be greater than zero")
    fp = od.failure_percentage
    if fp is not None:
        if not 0 <= fp.threshold <= 100:
            c.add((*at, "failurePercentage", "threshold"), "must be within 0-100")
        if fp.minimum_hosts < 1:
            c.add((*at, "failurePercentage", "minimumHosts"), "must be at least 1")
        if fp.request_volume < 1:
            c.add((*at, "failurePercentage", "requestVolume"), "must be at least 1")


MAX_HEALTH_THRESHOLD = 100
_HEALTH_PATH = re.compile(r"^/[!-~]*$")


def _check_health_check(c: _Checker, at: FieldPath, hc: HealthCheckPolicy) -> None:
    if not _HEALTH_PATH.match(hc.path) or len(hc.path) > 1024:
        c.add((*at, "path"), "must be an origin-form path: '/' then up to 1023 visible "
              "ASCII characters, no spaces")  # fmt: skip
    c.positive((*at, "interval"), hc.interval)
    c.positive((*at, "timeout"), hc.timeout)
    if hc.interval > 0 and hc.timeout > hc.interval:
        c.add((*at, "timeout"), "must not exceed interval")
    for name in ("unhealthy_threshold", "healthy_threshold"):
        if not 1 <= getattr(hc, name) <= MAX_HEALTH_THRESHOLD:
            c.add((*at, camel(name)), f"must be between 1 and {MAX_HEALTH_THRESHOLD}")
