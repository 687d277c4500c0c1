"""Trace context in plain code: W3C `traceparent`/`tracestate` and B3, and the sampling decision.

Everything a sidecar does for a request that is not sampled happens here, without the
OpenTelemetry SDK (no span or context objects; the SDK is not even imported): find the
incoming context among the request's fields, decide by the parent's sampled flag or a
ratio draw, and make the `traceparent` line that carries the decision on. Only sampled
requests reach proxy/tracing.py, which records spans through the SDK.

Formats (W3C Trace Context Level 1; B3 as openzipkin/b3-propagation documents it):

- `traceparent: 00-<32 hex trace id>-<16 hex parent id>-<2 hex flags>`: lower-case hex,
  neither id all zeros, version `ff` invalid; a later version may append `-...` fields.
- B3 single: `b3: <trace id>-<span id>[-<sampled>[-<parent span id>]]` or `b3: <sampled>`
  (`1`, `0`, or `d` for debug, which samples); a 16-hex trace id is left-padded to 32.
- B3 multi: `X-B3-TraceId`, `X-B3-SpanId`, `X-B3-Sampled` (`1`/`0`, also `true`/`false`),
  `X-B3-Flags: 1` (debug).

`traceparent` wins over B3 when both are present. B3 is accepted and converted: a sampled
request goes on with a W3C `traceparent`, and, when the caller sent any B3 field, a `b3`
single header with the same ids (so an app that reads only B3 keeps its context); the
incoming B3 fields are not forwarded as they were.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, NamedTuple

if TYPE_CHECKING:
    from collections.abc import Mapping

    from proxy.exchange import Exchange
    from proxy.heads import RequestHead

_HEX_DIGITS: Final = b"0123456789abcdef"
_ZERO_TRACE: Final = b"0" * 32
_ZERO_SPAN: Final = b"0" * 16

# Lower-case names of the fields that carry trace context, and the field's kind.
TRACEPARENT: Final = 1
TRACESTATE: Final = 2
B3: Final = 3
B3_TRACE: Final = 4
B3_SPAN: Final = 5
B3_SAMPLED: Final = 6
B3_FLAGS: Final = 7
B3_PARENT: Final = 8
TRACE_FIELDS: Final[dict[bytes, int]] = {
    b"traceparent": TRACEPARENT,
    b"tracestate": TRACESTATE,
    b"b3": B3,
    b"x-b3-traceid": B3_TRACE,
    b"x-b3-spanid": B3_SPAN,
    b"x-b3-sampled": B3_SAMPLED,
    b"x-b3-flags": B3_FLAGS,
    b"x-b3-parentspanid": B3_PARENT,
}
# Only names of these lengths are lowered and looked up (a field scan costs little).
_LENGTHS: Final = frozenset(len(n) for n in TRACE_FIELDS)
_MAX_TRACESTATE = 512  # bytes kept of an incoming tracestate (W3C: 32 members)


class Parent(NamedTuple):
    """The incoming context: ids as lower-case hex bytes; `sampled` None when the caller
    left the decision to us (B3 without a sampling state). A tuple: made per request."""

    trace_id: bytes
    span_id: bytes
    sampled: bool | None
    tracestate: bytes | None = None
    b3: bool = False  # the caller sent B3 fields (answered with B3 too)


@dataclass(frozen=True, slots=True)
class SamplingSpec:
    """How a sidecar decides: `ratio` of new traces (0..1), and whether a parent's
    sampled flag decides for requests that carry one (`parent_based`)."""

    ratio: float = 1.0
    parent_based: bool = True

    def __post_init__(self) -> None:
        if not 0.0 <= self.ratio <= 1.0:
            raise ValueError(f"sampling ratio {self.ratio} is not within 0..1")


_new_tuple: Final = tuple.__new__

# OpenTelemetry's default (the SDK documents `parentbased_always_on`).
DEFAULT_SAMPLING: Final = SamplingSpec()
_SAMPLERS: Final[dict[str, tuple[bool, float | None]]] = {
    # name -> (parent-based, fixed ratio or None: OTEL_TRACES_SAMPLER_ARG)
    "always_on": (False, 1.0),
    "always_off": (False, 0.0),
    "traceidratio": (False, None),
    "parentbased_always_on": (True, 1.0),
    "parentbased_always_off": (True, 0.0),
    "parentbased_traceidratio": (True, None),
}


def sampling_from_env(env: Mapping[str, str], mesh_ratio: float | None) -> SamplingSpec:
    """The sampling spec: `OTEL_TRACES_SAMPLER` (and `_ARG`) when set, which wins over
    MeshConfig's `tracing.samplingRatio` (parent-based), else OpenTelemetry's default.
    An unknown sampler or a bad argument raises ValueError naming the variable."""
    name = env.get("OTEL_TRACES_SAMPLER", "").strip().lower()
    if not name:
        if mesh_ratio is not None:
            return SamplingSpec(mesh_ratio, True)
        return DEFAULT_SAMPLING
    found = _SAMPLERS.get(name)
    if found is None:
        raise ValueError(
            f"OTEL_TRACES_SAMPLER={name!r}: supported are {', '.join(sorted(_SAMPLERS))}"
        )
    parent_based, ratio = found
    if ratio is None:
        arg = env.get("OTEL_TRACES_SAMPLER_ARG", "").strip()
        try:
            ratio = float(arg) if arg else 1.0
        except ValueError:
            raise ValueError(f"OTEL_TRACES_SAMPLER_ARG={arg!r} is not a number") from None
        if not 0.0 <= ratio <= 1.0:
            raise ValueError(f"OTEL_TRACES_SAMPLER_ARG={arg!r} is not within 0..1")
    return SamplingSpec(ratio, parent_based)


def tracing_requested(env: Mapping[str, str]) -> bool:
    """Whether the environment turns tracing on (`OTEL_TRACES_EXPORTER=otlp`); an exporter
    or an OTLP protocol this sidecar does not speak raises ValueError."""
    names = [n.strip().lower() for n in env.get("OTEL_TRACES_EXPORTER", "").split(",")]
    names = [n for n in names if n and n != "none"]
    if not names:
        return False
    if names != ["otlp"]:
        raise ValueError(f"OTEL_TRACES_EXPORTER={','.join(names)!r}: only otlp is supported")
    protocol = (
        env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        or env.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        or "http/protobuf"
    ).strip()
    if protocol != "http/protobuf":
        raise ValueError(
            f"OTEL_EXPORTER_OTLP_PROTOCOL={protocol!r}: only http/protobuf is supported"
        )
    return True


def check_env(env: Mapping[str, str]) -> None:
    """Raise ValueError for tracing variables the sidecar would refuse at start."""
    if tracing_requested(env):
        sampling_from_env(env, None)


def decide(spec: SamplingSpec, parent: Parent | None, draw: float) -> bool:
    """Whether to record this request: the parent's flag (parent-based, when it says),
    else `draw` (uniform in [0, 1)) against the ratio."""
    if parent is not None and spec.parent_based and parent.sampled is not None:
        return parent.sampled
    return draw < spec.ratio


# -- parsing --------------------------------------------------------------------------


def _hex(value: bytes, n: int) -> bool:
    return len(value) == n and not value.translate(None, _HEX_DIGITS)


# version-traceid-parentid-flags, lower-case hex; a version after 00 may append fields.
_TRACEPARENT = re.compile(rb"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?", re.S)


_ODD_HEX: Final = frozenset(b"13579bdf")


def parse_traceparent(value: bytes) -> Parent | None:
    """A W3C traceparent, or None when it is not valid (then it is ignored)."""
    if (
        len(value) == 55
        and value[2] == value[35] == value[52] == 45  # "-"
        and value[:2] == b"00"
        and not value.translate(None, b"-0123456789abcdef")
    ):
        # Version 00 as nearly everyone sends it: checked with a few C calls.
        trace_id, span_id = value[3:35], value[36:52]
        if trace_id == _ZERO_TRACE or span_id == _ZERO_SPAN:
            return None
        # tuple.__new__: NamedTuple's own __new__ is a Python function (3x the cost).
        return _new_tuple(Parent, (trace_id, span_id, value[54] in _ODD_HEX, None, False))
    m = _TRACEPARENT.fullmatch(value.strip(b" \t"))
    if m is None:
        return None
    version, trace_id, span_id, flags, rest = m.groups()
    if version == b"ff" or (version == b"00" and rest is not None):
        return None
    if trace_id == _ZERO_TRACE or span_id == _ZERO_SPAN:
        return None
    return Parent(trace_id, span_id, bool(int(flags, 16) & 1))


def _b3_sampled(value: bytes) -> bool | None:
    v = value.strip().lower()
    if v in (b"1", b"d", b"true"):
        return True
    if v in (b"0", b"false"):
        return False
    return None


def _b3_ids(trace_id: bytes, span_id: bytes) -> tuple[bytes, bytes] | None:
    trace_id, span_id = trace_id.strip().lower(), span_id.strip().lower()
    if len(trace_id) == 16:
        trace_id = b"0" * 16 + trace_id
    if not (_hex(trace_id, 32) and _hex(span_id, 16)):
        return None
    if trace_id == _ZERO_TRACE or span_id == _ZERO_SPAN:
        return None
    return trace_id, span_id


def parse_b3_single(value: bytes) -> Parent | None:
    """`b3: trace-span[-sampled[-parent]]`; a lone sampling state has no ids (None:
    it cannot continue a trace, and a lone `0` is honoured by `parse_fields`)."""
    parts = value.strip().split(b"-")
    if len(parts) < 2 or len(parts) > 4:
        return None
    ids = _b3_ids(parts[0], parts[1])
    if ids is None:
        return None
    sampled = _b3_sampled(parts[2]) if len(parts) > 2 else None
    if len(parts) > 2 and sampled is None:
        return None
    return Parent(ids[0], ids[1], sampled, None, True)


def parse_fields(fields: list[tuple[bytes, bytes]]) -> tuple[Parent | None, bool]:
    """The incoming context among a request's fields, and whether any trace field was
    there at all (those are rewritten when the request is sampled)."""
    traceparent: bytes | None = None
    tracestate: bytes | None = None
    b3: bytes | None = None
    multi: dict[int, bytes] | None = None
    found = False
    lengths = _LENGTHS
    for name, value in fields:
        if len(name) not in lengths:
            continue
        kind = TRACE_FIELDS.get(name.lower())
        if kind is None:
            continue
        found = True
        if kind == TRACEPARENT:
            if traceparent is None:
                traceparent = value
        elif kind == TRACESTATE:
            # Several tracestate fields are one list (W3C 3.3.1.1).
            tracestate = value if tracestate is None else tracestate + b"," + value
        elif kind == B3:
            b3 = value
        else:
            if multi is None:
                multi = {}
            multi[kind] = value
    if not found:
        return None, False
    if traceparent is not None:
        parent = parse_traceparent(traceparent)
        if parent is not None:
            spoke_b3 = b3 is not None or multi is not None
            if tracestate or spoke_b3:
                state = tracestate[:_MAX_TRACESTATE] if tracestate else None
                parent = Parent(parent.trace_id, parent.span_id, parent.sampled, state, spoke_b3)
            return parent, True
    if b3 is not None:
        parent = parse_b3_single(b3)
        if parent is not None:
            return parent, True
        if _b3_sampled(b3) is False:
            # `b3: 0`: the caller decided not to sample, without ids.
            return Parent(b"", b"", False, None, True), True
    if multi is not None:
        sampled = _b3_sampled(multi.get(B3_SAMPLED, b""))
        if multi.get(B3_FLAGS, b"").strip() == b"1":
            sampled = True
        ids = _b3_ids(multi.get(B3_TRACE, b""), multi.get(B3_SPAN, b""))
        if ids is not None:
            return Parent(ids[0], ids[1], sampled, None, True), True
        if sampled is False:
            return Parent(b"", b"", False, None, True), True
    return None, True


def find_parent(head: RequestHead) -> tuple[Parent | None, bool]:
    """`parse_fields` of a head, from what the codec noted (`traceparent`, `b3`): a pass
    over the fields only for B3. A head that kept its field lines as bytes (`raw`, from
    the head cache) is searched as bytes: a lone `traceparent` is read in place, so the
    head keeps its fast serialisation; its field list is made only for B3 fields. The
    parent found in place has no tracestate (read again from the fields when the
    request is sampled: `parse_fields`)."""
    raw = head.raw
    if raw is None:
        # The codec noted the trace fields as it parsed (proxy/fields.py).
        if head.b3:
            return parse_fields(head.headers)
        tp = head.traceparent
        if tp is None:
            return None, False
        return parse_traceparent(tp), True
    low = b"\n" + raw.lower()
    if b"\nb3:" in low or b"\nx-b3-" in low:
        return parse_fields(head.headers)
    i = low.find(b"\ntraceparent:")
    if i < 0:
        return None, b"\ntracestate:" in low
    # low[i + 1:] lines up with raw[i:]: the value starts after "traceparent:".
    start = i + 12
    end = raw.find(b"\r\n", start)
    return parse_traceparent(raw[start:end].strip(b" \t")), True


def strip_fields(fields: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """The fields without trace context (a sampled request gets ours instead); tracestate
    is kept (we add no member of our own)."""
    return [
        f
        for f in fields
        if len(f[0]) not in _LENGTHS or TRACE_FIELDS.get(f[0].lower(), TRACESTATE) == TRACESTATE
    ]


def path_of(target: bytes) -> bytes:
    """The path of a request target, without its query: origin-form as is, absolute-form
    after its authority (`http://b/who?x=1` -> `/who`), authority-form (CONNECT) as is."""
    if target[:1] != b"/":
        scheme = target.find(b"://")
        if scheme < 0:
            return target
        slash = target.find(b"/", scheme + 3)
        target = target[slash:] if slash >= 0 else b"/"
    return target.partition(b"?")[0].partition(b"#")[0]


def propagation(line: bytes) -> Propagation:
    return Propagation(line)


def traceparent_line(trace_id: bytes, span_id: bytes, sampled: bool) -> bytes:
    return b"traceparent: 00-%s-%s-%s\r\n" % (trace_id, span_id, b"01" if sampled else b"00")


def with_line(head_bytes: bytes, line: bytes) -> bytes:
    """A serialised request head with one more field line (before the blank line)."""
    return head_bytes[:-2] + line + b"\r\n"


def new_ids(rng: random.Random) -> tuple[bytes, bytes]:
    """A random (trace id, span id), as lower-case hex, neither all zeros."""
    return b"%032x" % (rng.getrandbits(128) or 1), b"%016x" % (rng.getrandbits(64) or 1)


_HEX2: Final = [b"%02x" % i for i in range(256)]


class UnsampledIds:
    """`traceparent` lines for unsampled roots, made cheaply: the trace id a random
    per-process half and a counter, the parent id random per process (their only use
    is to carry the decision not to sample, and the trace id to name the request in
    access logs; no span is ever recorded under them, here or after)."""

    __slots__ = ("_block", "_head", "_seq", "_tail")

    def __init__(self, rng: random.Random) -> None:
        self._head = b"traceparent: 00-%016x" % (rng.getrandbits(64) | 1 << 63)
        self._tail = b"-%016x-00\r\n" % (rng.getrandbits(64) | 1 << 63)
        self._seq = 0
        # The line up to the counter's last two hex digits, made again every 256 lines
        # (formatting a number is most of what a line costs).
        self._block = self._head + b"%014x" % 0

    def line(self) -> bytes:
        self._seq = seq = self._seq + 1
        low = seq & 255
        if not low:
            self._block = self._head + b"%014x" % (seq >> 8)
        return self._block + _HEX2[low] + self._tail


class Propagation:
    """An unsampled request that started its trace here: its attempts carry a
    `traceparent` with the sampled flag 00 (`line`, the field line), so the sidecars
    after this one do not start traces of their own (the decision is made once, at the
    root). No SDK objects: a compiled object with one field."""

    __slots__ = ("line",)

    def __init__(self, line: bytes) -> None:
        self.line = line

    def trace_id(self) -> bytes:
        return self.line[16:48]  # b"traceparent: 00-" then the trace id

    def attempt_start(self, ex: object, data: bytes) -> bytes:
        return data[:-2] + self.line + b"\r\n"

    def attempt_fields(self, ex: object) -> list[tuple[bytes, bytes]]:
        """The attempt's trace field for an HTTP/2 request (`attempt_start`'s line)."""
        return [(b"traceparent", self.line[13:-2])]

    def attempt_end(self, ex: object, reason: str) -> None:
        return None

    def hedge_start(self, ex: object, data: bytes, route: object) -> tuple[bytes, object]:
        return data[:-2] + self.line + b"\r\n", None

    def hedge_end(self, span: object, reason: str) -> None:
        return None

    def hedge_adopt(self, span: object) -> None:
        return None

    def end(self, ex: object, now: float) -> None:
        return None


_EVEN_HEX: Final = frozenset(b"02468ace")  # the last flags digit of an unsampled traceparent


class ListenerTracing:
    """What one listener's exchanges call (`ProxyServer.tracer`): the per-request
    decision, in plain (compiled) code. `tracing` is the sidecar's `proxy.tracing.Tracing`
    (sampling, random source, the SDK); only a sampled request reaches it (`start`)."""

    __slots__ = ("ids", "listener", "rng", "tracing")

    def __init__(self, tracing: Any, listener: str) -> None:
        self.tracing = tracing
        self.listener = listener
        self.rng: random.Random = tracing.rng
        self.ids: UnsampledIds = tracing.unsampled_ids

    def begin(self, ex: Exchange) -> Any:
        """The decision for a request whose head just arrived: None (pass the incoming
        context on as it is), a `Propagation` (an unsampled root), or what
        `tracing.start` makes of a sampled one (proxy/tracing.py's `SampledTrace`)."""
        return self.decide(ex.head, ex)

    def decide(self, head: RequestHead, ex: object) -> Any:
        """`begin` for any exchange with a `head` (an HTTP/2 stream's `H2Exchange`, which
        is interpreted code, calls this)."""
        tracing = self.tracing
        spec: SamplingSpec = tracing.sampling if tracing.mesh is None else tracing.current()
        if head.raw is None and not head.b3:
            # The common case, without a call: what the codec noted (find_parent's).
            tp = head.traceparent
            if tp is not None and len(tp) == 55 and tp[54] in _EVEN_HEX and spec.parent_based:
                # A caller's unsampled version-00 context: all that matters is its flag,
                # and it goes on unchanged (the ids are not even checked).
                return None
            present = tp is not None
            parent = parse_traceparent(tp) if tp is not None else None
        else:
            parent, present = find_parent(head)
        if parent is None:
            sampled = self.rng.random() < spec.ratio
        elif parent.sampled is not None and spec.parent_based:
            sampled = parent.sampled
        else:
            sampled = decide(spec, parent, self.rng.random())
        if not sampled:
            if parent is not None and parent.trace_id:
                return None  # the caller's context goes on unchanged
            if present:
                head.headers = strip_fields(head.headers)
            return Propagation(self.ids.line())
        if present:
            fields = head.headers
            if parent is not None and parent.tracestate is None:
                parent = parse_fields(fields)[0]  # with its tracestate, if it has one
            head.headers = strip_fields(fields)
        return tracing.start(self, ex, parent if parent is not None and parent.trace_id else None)

    def __repr__(self) -> str:
        return f"<ListenerTracing {self.listener}>"
