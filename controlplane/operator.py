"""The operator commands (`tether apply/get/delete/diff`): files in, API calls, text out.

`tether/cli.py` only declares the options; each command here reads its files (a file,
every `*.yaml`/`*.yml`/`*.json` of a directory, or `-` for stdin), validates them
locally first (so a bad file is reported without a round trip, with file, document,
field path and line), then asks the control plane, and prints what it says. Each
returns the process exit code: 0 done, 1 rejected or failed (`diff`: 1 when there are
differences, as `kubectl diff`).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, TextIO

import yaml

from controlplane.client import ApiError, ControlPlaneClient
from controlplane.schema import (
    CLUSTER_KINDS,
    DEFAULT_NAMESPACE,
    FUTURE_KINDS,
    KINDS,
    Problem,
    Resource,
    ResourceKey,
    canonical_kind,
    replaced_kind_message,
)
from controlplane.validation import decode_files

SUFFIXES = (".yaml", ".yml", ".json")


class InputError(Exception):
    """A file or directory that cannot be read."""


def read_inputs(paths: Iterable[str], stdin: TextIO | None = None) -> list[tuple[str, str]]:
    files: list[tuple[str, str]] = []
    for p in paths:
        if p == "-":
            files.append(("<stdin>", (stdin or sys.stdin).read()))
            continue
        path = Path(p)
        try:
            if path.is_dir():
                found = sorted(f for f in path.iterdir() if f.suffix in SUFFIXES and f.is_file())
                if not found:
                    raise InputError(f"{p}: no {', '.join(SUFFIXES)} files")
                files += [(str(f), f.read_text(encoding="utf-8")) for f in found]
            else:
                files.append((str(path), path.read_text(encoding="utf-8")))
        except (OSError, UnicodeDecodeError) as exc:
            raise InputError(f"{p}: {exc}") from exc
    return files


def _print_problems(problems: Sequence[Problem], err: TextIO) -> None:
    for p in sorted(problems, key=lambda p: (p.file or "", p.document or 0, p.line or 0)):
        print(str(p) if p.is_error else f"{p}", file=err)


def _fail(exc: ApiError, err: TextIO) -> int:
    if exc.problems:
        _print_problems(exc.problems, err)
        errors = sum(1 for p in exc.problems if p.is_error)
        print(f"rejected: {errors} error(s); nothing was changed", file=err)
    else:
        print(f"Error: {exc}", file=err)
    return 1


def _report(result: Any, out: TextIO, err: TextIO, *, show_diff: bool) -> None:
    for w in result.get("warnings") or ():
        print(Problem.from_dict(w), file=err)
    dry = " (dry run)" if result.get("dryRun") else ""
    for c in result.get("changes") or ():
        if show_diff and c.get("diff"):
            out.write(c["diff"])
        ns = f"{c['namespace']}/" if c.get("namespace") else ""
        action = "not found" if c["action"] == "absent" else c["action"]
        print(f"{c['kind'].lower()} {ns}{c['name']} {action}{dry}", file=out)


def _local_check(files: Sequence[tuple[str, str]], err: TextIO) -> bool:
    checked = decode_files(files)
    if checked.errors:
        _print_problems(checked.problems, err)
        print(f"rejected: {len(checked.errors)} error(s); nothing was changed", file=err)
        return False
    if not checked.resources:
        names = ", ".join(name for name, _ in files)
        print(f"Error: no documents in {names}; nothing was changed", file=err)
        return False
    return True


def in_namespace(files: Sequence[tuple[str, str]], namespace: str) -> list[tuple[str, str]]:
    """The documents with `namespace` where they name none (as `kubectl apply -n`); a
    document naming another namespace is an InputError. Mesh-wide kinds are left alone."""
    out = []
    for name, text in files:
        docs = []
        for doc in yaml.safe_load_all(text):
            if isinstance(doc, dict) and doc.get("kind") not in CLUSTER_KINDS:
                meta = doc.setdefault("metadata", {})
                if isinstance(meta, dict):
                    given = meta.setdefault("namespace", namespace)
                    if given != namespace:
                        raise InputError(
                            f"{name}: {doc.get('kind')} {meta.get('name')} is in namespace "
                            f"{given!r}, not {namespace!r} (-n)"
                        )
            docs.append(doc)
        out.append((name, yaml.safe_dump_all(docs, sort_keys=False)))
    return out


def apply(
    client: ControlPlaneClient,
    files: Sequence[tuple[str, str]],
    dry_run: bool,
    out: TextIO,
    err: TextIO,
    namespace: str | None = None,
) -> int:
    if not _local_check(files, err):
        return 1
    if namespace is not None:
        files = in_namespace(files, namespace)
    try:
        result = client.apply(files, dry_run=dry_run)
    except ApiError as exc:
        return _fail(exc, err)
    _report(result, out, err, show_diff=True)
    if not result.get("dryRun"):
        print(f"config version {result.get('version')}", file=out)
    return 0


def diff(
    client: ControlPlaneClient, files: Sequence[tuple[str, str]], out: TextIO, err: TextIO
) -> int:
    if not _local_check(files, err):
        return 1
    try:
        result = client.diff(files)
    except ApiError as exc:
        return _fail(exc, err)
    for w in result.get("warnings") or ():
        print(Problem.from_dict(w), file=err)
    changed = False
    for c in result.get("changes") or ():
        if c.get("diff"):
            out.write(c["diff"])
            changed = True
    return 1 if changed else 0


def resolve_kind(text: str) -> str:
    kind = canonical_kind(text)
    if kind is None:
        raise InputError(f"unknown kind {text!r} (known: {', '.join(KINDS)})")
    replaced = replaced_kind_message(kind)
    if replaced is not None:
        raise InputError(replaced)
    if kind in FUTURE_KINDS:
        raise InputError(f"kind {kind} is not supported yet")
    return kind


def key_for(kind: str, name: str, namespace: str | None) -> ResourceKey:
    if kind in CLUSTER_KINDS:
        return ResourceKey(kind, "", name)
    return ResourceKey(kind, namespace or DEFAULT_NAMESPACE, name)


def get(
    client: ControlPlaneClient,
    kind_text: str | None,
    name: str | None,
    namespace: str | None,
    all_namespaces: bool,
    output: str,
    out: TextIO,
    err: TextIO,
    show_defaults: bool = False,
) -> int:
    if kind_text is None or kind_text.lower() == "all":
        return get_all(client, name, namespace, all_namespaces, output, out, err, show_defaults)
    try:
        kind = resolve_kind(kind_text)
        if name is not None:
            items = [client.get(key_for(kind, name, namespace))]
        else:
            ns = None if all_namespaces else (namespace or DEFAULT_NAMESPACE)
            items = client.list(kind, ns)["items"]
    except InputError as exc:
        print(f"Error: {exc}", file=err)
        return 1
    except ApiError as exc:
        return _fail(exc, err)
    if show_defaults:  # what is in force: the defaults the author left out filled in
        # (the metadata as served: decoding keeps only the fields the author may set)
        full = [Resource.from_dict(doc).to_dict(defaults=True) for doc in items]
        items = [_served(f, doc) for f, doc in zip(full, items, strict=True)]
    if output == "json":
        json.dump(items[0] if name is not None else items, out, indent=2)
        out.write("\n")
    elif output == "yaml":
        out.write(yaml.safe_dump_all(items, sort_keys=False) if items else "")
    else:
        if not items:
            print(f"no {kind} resources", file=err)
            return 0
        rows = [("NAMESPACE", "NAME", "GENERATION", "SUMMARY")]
        for doc in items:
            meta = doc["metadata"]
            rows.append(
                (
                    meta.get("namespace", "-"),
                    meta["name"],
                    str(meta.get("generation", "")),
                    summary(doc),
                )
            )
        widths = [max(len(r[i]) for r in rows) for i in range(3)]
        for r in rows:
            print(
                "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)) + "  " + r[3],
                file=out,
            )
    return 0


def get_all(
    client: ControlPlaneClient,
    name: str | None,
    namespace: str | None,
    all_namespaces: bool,
    output: str,
    out: TextIO,
    err: TextIO,
    show_defaults: bool = False,
) -> int:
    """`tether get all` (or `tether get`): every resource of every kind, as `kubectl get
    all` lists a namespace's workloads; mesh-wide ones (MeshConfig) with any namespace."""
    if name is not None:
        print("Error: 'get all' takes no NAME", file=err)
        return 1
    try:
        ns = None if all_namespaces else (namespace or DEFAULT_NAMESPACE)
        items = client.list(None, ns)["items"]
    except ApiError as exc:
        return _fail(exc, err)
    order = {k: i for i, k in enumerate(KINDS)}
    items.sort(key=lambda d: (order.get(d["kind"], len(order)), d["metadata"].get("namespace",
               ""), d["metadata"]["name"]))  # fmt: skip
    if show_defaults:
        full = [Resource.from_dict(doc).to_dict(defaults=True) for doc in items]
        items = [_served(f, doc) for f, doc in zip(full, items, strict=True)]
    if output == "json":
        json.dump(items, out, indent=2)
        out.write("\n")
        return 0
    if output == "yaml":
        out.write(yaml.safe_dump_all(items, sort_keys=False) if items else "")
        return 0
    if not items:
        where = "any namespace" if ns is None else f"namespace {ns}"
        print(f"no resources in {where}", file=err)
        return 0
    rows = [("KIND", "NAMESPACE", "NAME", "GENERATION", "SUMMARY")]
    for doc in items:
        meta = doc["metadata"]
        rows.append(
            (
                doc["kind"],
                meta.get("namespace") or "-",
                meta["name"],
                str(meta.get("generation", "")),
                summary(doc),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)) + "  " + r[4],
              file=out)  # fmt: skip
    return 0


def _served(full: dict[str, Any], doc: dict[str, Any]) -> dict[str, Any]:
    """`full` (defaults filled in) with the metadata and status as served."""
    out = {**full, "metadata": doc["metadata"]}
    if "status" in doc:
        out["status"] = doc["status"]
    return out


def summary(doc: dict[str, Any]) -> str:
    """One line about a resource for `tether get`'s table."""
    spec = doc.get("spec") or {}
    kind = doc.get("kind")
    if kind == "TrafficSplit":
        line = " ".join(f"{s['name']}={s['weight']}" for s in spec.get("subsets", []))
        an = (doc.get("status") or {}).get("analysis")
        if isinstance(an, dict):  # a canary analysis: its phase and the live weights
            live = " ".join(f"{k}={v}" for k, v in (an.get("weights") or {}).items())
            line += f" (analysis {an.get('phase')}: {live})"
        return line
    if kind == "Route":
        return f"{len(spec.get('rules', []))} rule(s)"
    if kind == "ServiceDefaults":
        lb = (spec.get("loadBalancer") or {}).get("policy", "peak_ewma")
        return f"{spec.get('protocol', 'http')} {lb}"
    if kind == "MeshConfig":
        return f"egress={(spec.get('egress') or {}).get('mode', 'allow')}"
    if kind == "Intention":
        ns = (doc.get("metadata") or {}).get("namespace")
        return " ".join(
            f"{'' if s.get('namespace', ns) == ns else s.get('namespace') + '/'}{s.get('name')}"
            f"={s.get('action') or 'L7'}"
            for s in spec.get("sources", [])
        )
    return ""


def delete(
    client: ControlPlaneClient,
    kind_text: str | None,
    name: str | None,
    namespace: str | None,
    files: Sequence[tuple[str, str]],
    dry_run: bool,
    out: TextIO,
    err: TextIO,
) -> int:
    try:
        if files:
            result = client.delete_files(files, dry_run=dry_run)
        else:
            if kind_text is None or name is None:
                raise InputError("give KIND NAME or -f FILE")
            kind = resolve_kind(kind_text)
            result = client.delete(key_for(kind, name, namespace), dry_run=dry_run)
    except InputError as exc:
        print(f"Error: {exc}", file=err)
        return 1
    except ApiError as exc:
        return _fail(exc, err)
    _report(result, out, err, show_diff=False)
    return 0
