"""Which build of the per-request modules runs: compiled (mypyc) or pure Python.

The per-request modules (`COMPILED`) are plain, type-annotated Python and stay the
source of truth. `python -m proxy.build` (run by `make`, docs/benchmarks.md says why
mypyc) compiles them with mypyc into extension modules beside the sources and writes
`proxy/_compiled.json`: the SHA-256 of every source as it was compiled. An extension
module beside its `.py` shadows it at import, so a compiled build that no longer matches
its sources would silently run old code. This module, imported by `proxy/__init__.py`
before any of them, therefore decides once per process, all or nothing (compiled
modules call each other directly, so a mix cannot run):

- the compiled build, when the record exists, every source's hash matches it and every
  module's extension is there;
- pure Python otherwise (never built, no C compiler, a source edited since the build,
  an extension missing), or when `TETHER_PURE=1` asks for it: a finder put first on
  `sys.meta_path` then loads these modules from their `.py` files, whatever lies beside.

`BUILD` says which and why; the sidecar prints it once in its start-up line and the
admin listener serves it at `/server_info`. Nothing here is compiled.
"""

from __future__ import annotations

import hashlib
import importlib.abc
import importlib.machinery
import importlib.util
import json
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parent.parent
RECORD = Path(__file__).resolve().parent / "_compiled.json"

# The per-request modules, compiled together as one group (docs/benchmarks.md).
COMPILED: tuple[str, ...] = (
    "proxy.attempts",
    "proxy.balance.base",
    "proxy.balance.edf",
    "proxy.balance.hashing",
    "proxy.balance.least_request",
    "proxy.balance.locality",
    "proxy.balance.maglev",
    "proxy.balance.outlier",
    "proxy.balance.p2c",
    "proxy.balance.peak_ewma",
    "proxy.balance.ring_hash",
    "proxy.balance.round_robin",
    "proxy.balance.weighted_random",
    "proxy.circuit_breaker",
    "proxy.cluster",
    "proxy.codec",
    "proxy.dispatch",
    "proxy.downstream",
    "proxy.exchange",
    "proxy.exchange_states",
    "proxy.expose",
    "proxy.fields",
    "proxy.forwarding",
    "proxy.head_cache",
    "proxy.heads",
    "proxy.local_reply",
    "proxy.outcome",
    "proxy.policy_router",
    "proxy.pool",
    "proxy.resilience",
    "proxy.response_codec",
    "proxy.retry",
    "proxy.route_result",
    "proxy.routing",
    "proxy.stats",
    "proxy.trace_context",
    "proxy.upstream",
)


def source_path(module: str, root: Path = ROOT) -> Path:
    return root.joinpath(*module.split(".")).with_suffix(".py")


def source_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def extension_path(module: str, root: Path = ROOT) -> Path | None:
    """The extension module that would shadow `module`'s source, if there is one."""
    base = source_path(module, root).with_suffix("")
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        candidate = base.with_name(base.name + suffix)
        if candidate.exists():
            return candidate
    return None


@dataclass(frozen=True)
class Build:
    """The build this process runs: `compiled` or not, and why (one line)."""

    compiled: bool
    detail: str

    @property
    def name(self) -> str:
        return "compiled" if self.compiled else "pure"

    def line(self) -> str:
        return f"{self.name} ({self.detail})"

    def as_dict(self) -> dict[str, object]:
        return {"build": self.name, "detail": self.detail, "modules": list(COMPILED)}


def decide(environ: Mapping[str, str] | None = None, root: Path = ROOT) -> Build:
    """Which build may run, from the record, the sources under `root` and the
    environment."""
    env = os.environ if environ is None else environ
    if env.get("TETHER_PURE", "") not in ("", "0"):
        return Build(False, "TETHER_PURE is set")
    record_path = root / "proxy" / RECORD.name
    try:
        record = json.loads(record_path.read_text())
        hashes: dict[str, str] = record["sources"]
        compiler = str(record.get("compiler", "mypyc"))
    except FileNotFoundError:
        return Build(False, "not compiled: `make` compiles when a C compiler is there")
    except (OSError, ValueError, KeyError, TypeError) as e:
        return Build(False, f"unreadable build record {RECORD.name}: {e}")
    for module in COMPILED:
        path = source_path(module, root)
        if module not in hashes:
            return Build(False, f"{module} is not in the compiled build; run make to rebuild")
        if extension_path(module, root) is None:
            return Build(False, f"no compiled extension for {module}; run make to rebuild")
        try:
            current = source_hash(path)
        except OSError as e:
            return Build(False, f"cannot read {path.name}: {e}")
        if current != hashes[module]:
            rel = path.relative_to(root)
            return Build(False, f"{rel} changed since it was compiled; run make to rebuild")
    return Build(True, f"{compiler}, {len(COMPILED)} modules")


class PureFinder(importlib.abc.MetaPathFinder):
    """Loads the per-request modules from their sources, whatever extension lies beside."""

    def __init__(self, modules: Sequence[str]) -> None:
        self.modules = frozenset(modules)

    def find_spec(
        self,
        fullname: str,
        path: Sequence[str] | None = None,
        target: ModuleType | None = None,
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in self.modules:
            return None
        return importlib.util.spec_from_file_location(fullname, source_path(fullname))


def install(build: Build) -> None:
    """Make imports follow `build` (idempotent; before any compiled module is imported)."""
    if build.compiled:
        return
    if not any(isinstance(f, PureFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, PureFinder(COMPILED))


BUILD = decide()
install(BUILD)
