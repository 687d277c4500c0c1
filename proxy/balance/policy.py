"""The load-balancer policy of a cluster, and `build_balancer`, which turns it into one.

`LoadBalancerPolicy` is the validated configuration (the control plane's
`ServiceDefaults` maps onto it); `build_balancer(policy, local_zone)` builds the
balancer, under the locality layer when the caller's zone is known. An invalid
document raises `PolicyError` naming the field.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from proxy.balance.base import Balancer
from proxy.balance.errors import PolicyError
from proxy.balance.hashing import FIELDS, HashPolicy
from proxy.balance.least_request import LeastRequest
from proxy.balance.locality import LocalityBalancer
from proxy.balance.maglev import Maglev
from proxy.balance.peak_ewma import PeakEwma
from proxy.balance.ring_hash import RingHash
from proxy.balance.round_robin import WeightedRoundRobin
from proxy.balance.slow_start import SlowStartPolicy
from proxy.balance.weighted_random import WeightedRandom

POLICIES = ("peak_ewma", "round_robin", "random", "least_request", "ring_hash", "maglev")
HASHING = ("ring_hash", "maglev")


@dataclass(frozen=True)
class LoadBalancerPolicy:
    policy: str = "peak_ewma"
    # ring_hash, maglev: what to hash (first that is present, see hashing.py).
    hash_policies: tuple[HashPolicy, ...] = ()
    # ring_hash: ring points per endpoint of the lowest weight; cap on the whole ring.
    ring_size: int = 1024
    max_ring_size: int = 1 << 18
    # maglev: lookup table size (a prime).
    table_size: int = 16381
    # least_request
    choice_count: int = 2
    active_request_bias: float = 1.0
    # peak_ewma: time constant of the RTT average (s), and a new endpoint's estimate (s).
    ewma_decay: float = 3.0
    ewma_default_rtt: float = 0.030
    # The locality layer: on when the sidecar knows its zone and this is True.
    locality: bool = True
    locality_threshold: float = 0.7
    # round_robin, random, least_request, peak_ewma (the hashing policies never ramp:
    # that would move keys).
    slow_start: SlowStartPolicy = field(default_factory=SlowStartPolicy)

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise PolicyError("policy", f"must be one of {', '.join(POLICIES)}")
        if not 0 < self.locality_threshold <= 1:
            raise PolicyError("locality_threshold", "must be within (0, 1]")
        if self.ring_size < 1:
            raise PolicyError("ring_size", "must be >= 1")
        if self.max_ring_size < self.ring_size:
            raise PolicyError("max_ring_size", "must be >= ring_size")
        if self.choice_count < 2:
            raise PolicyError("choice_count", "must be >= 2")
        if not self.active_request_bias >= 0:
            raise PolicyError("active_request_bias", "must be >= 0")
        if not self.ewma_decay > 0:
            raise PolicyError("ewma_decay", "must be > 0 seconds")
        if not self.ewma_default_rtt > 0:
            raise PolicyError("ewma_default_rtt", "must be > 0 seconds")
        if self.policy == "maglev":
            # Maglev validates primality itself; build one to fail now, not on first use.
            Maglev(table_size=self.table_size)

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> LoadBalancerPolicy:
        """From a JSON/YAML document; keys match the fields in any case, with or without
        underscores (`ringSize`, `RingSize`, `ring_size`). Hash policies take Consul's
        shape too: `{"Field": "header", "FieldValue": "x-user"}` or `{"SourceIP": true}`.
        """
        if not isinstance(doc, Mapping):
            raise PolicyError("loadBalancer", "must be an object")
        known = {_norm(f.name): f.name for f in fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in doc.items():
            name = known.get(_norm(str(key)))
            if name is None:
                raise PolicyError(str(key), "unknown field")
            if name == "hash_policies":
                value = _hash_policies(value)
            elif name == "slow_start":
                value = _slow_start(value)
            else:
                value = _typed(name, value, _TYPES[name])
            kwargs[name] = value
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {f.name: getattr(self, f.name) for f in fields(self)}
        out["hash_policies"] = [
            {"field": p.field, "name": p.name, "terminal": p.terminal} for p in self.hash_policies
        ]
        ss = self.slow_start
        out["slow_start"] = {
            "window": ss.window,
            "aggression": ss.aggression,
            "min_weight_percent": ss.min_weight_percent,
        }
        return out


_TYPES: dict[str, type] = {
    "policy": str,
    "ring_size": int,
    "max_ring_size": int,
    "table_size": int,
    "choice_count": int,
    "active_request_bias": float,
    "ewma_decay": float,
    "ewma_default_rtt": float,
    "locality": bool,
    "locality_threshold": float,
}


def _norm(key: str) -> str:
    return key.replace("_", "").replace("-", "").lower()


def _typed(name: str, value: Any, kind: type) -> Any:
    # bool is an int in Python; a JSON true is not a ring size.
    if kind is bool:
        if isinstance(value, bool):
            return value
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif kind is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    elif isinstance(value, kind):
        return value
    raise PolicyError(name, f"must be a {kind.__name__}")


def _hash_policies(value: Any) -> tuple[HashPolicy, ...]:
    if not isinstance(value, list):
        raise PolicyError("hash_policies", "must be a list")
    out: list[HashPolicy] = []
    for i, item in enumerate(value):
        where = f"hash_policies[{i}]"
        if not isinstance(item, Mapping):
            raise PolicyError(where, "must be an object")
        entry = {_norm(str(k)): v for k, v in item.items()}
        unknown = set(entry) - {"field", "name", "fieldvalue", "sourceip", "terminal"}
        if unknown:
            raise PolicyError(f"{where}.{sorted(unknown)[0]}", "unknown field")
        terminal = _typed(f"{where}.terminal", entry.get("terminal", False), bool)
        if _typed(f"{where}.sourceIP", entry.get("sourceip", False), bool):
            out.append(HashPolicy("source_ip", terminal=terminal))
            continue
        kind = entry.get("field")
        if kind not in FIELDS:
            raise PolicyError(f"{where}.field", f"must be one of {', '.join(FIELDS)}")
        name = entry.get("name", entry.get("fieldvalue", ""))
        name = _typed(f"{where}.name", name, str)
        try:
            out.append(HashPolicy(kind, name, terminal))
        except PolicyError as e:
            raise PolicyError(f"{where}.{e.field.rsplit('.', 1)[-1]}", e.message) from None
    return tuple(out)


def _slow_start(value: Any) -> SlowStartPolicy:
    if not isinstance(value, Mapping):
        raise PolicyError("slow_start", "must be an object")
    names = {
        "window": "window",
        "aggression": "aggression",
        "minweightpercent": "min_weight_percent",
    }
    kwargs: dict[str, float] = {}
    for key, v in value.items():
        name = names.get(_norm(str(key)))
        if name is None:
            raise PolicyError(f"slow_start.{key}", "unknown field")
        kwargs[name] = _typed(f"slow_start.{name}", v, float)
    return SlowStartPolicy(**kwargs)


def balancer_maker(policy: LoadBalancerPolicy) -> Callable[[], Balancer]:
    """A constructor of the bare balancer the policy names (no locality layer)."""
    ss = policy.slow_start if policy.slow_start.enabled else None
    name = policy.policy
    if name == "peak_ewma":
        return lambda: PeakEwma(policy.ewma_decay, policy.ewma_default_rtt, ss)
    if name == "round_robin":
        return lambda: WeightedRoundRobin(ss)
    if name == "random":
        return lambda: WeightedRandom(ss)
    if name == "least_request":
        return lambda: LeastRequest(policy.choice_count, policy.active_request_bias, ss)
    if name == "ring_hash":
        return lambda: RingHash(policy.hash_policies, policy.ring_size, policy.max_ring_size)
    if name == "maglev":
        return lambda: Maglev(policy.hash_policies, policy.table_size)
    raise PolicyError("policy", f"must be one of {', '.join(POLICIES)}")


def build_balancer(policy: LoadBalancerPolicy | None = None, local_zone: str = "") -> Balancer:
    """The balancer for a cluster; `local_zone` is the sidecar's own zone ("" = unknown)."""
    policy = policy or LoadBalancerPolicy()
    make = balancer_maker(policy)
    if policy.locality and local_zone:
        return LocalityBalancer(make, local_zone, policy.locality_threshold)
    return make()
