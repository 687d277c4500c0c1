"""The control plane's side of the resource schema: YAML with line numbers, JSON Schema.

The resources themselves (their dataclasses, decoding with field paths, encoding,
single-resource checks) are `wire.resources`, which the sidecars import too; this module
re-exports them for the control plane's code and adds what only the control plane and
its command line need: reading YAML or JSON text with the line of every field
(`load_documents` + `decode_document`, `parse_resources`; PyYAML's composed nodes keep
their marks), `dump_yaml`, and the JSON Schema in `docs/schema/`
(`python -m controlplane.schema --write docs/schema`), generated from the same field
declarations. It imports nothing else of `controlplane/`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml

from wire.resources import *  # noqa: F403  (re-exported: the control plane's code reads them here)
from wire.resources import (
    API_VERSION,
    CLUSTER_KINDS,
    DEFAULT_NAMESPACE,
    KINDS,
    MESH_CONFIG_NAME,
    SERVER_SET_METADATA,
    SPEC_TYPES,
    Decoder,
    FieldPath,
    MetadataSpec,
    Problem,
    Resource,
    SchemaError,
    _is_duration,
    _is_schema_class,
    _optional_inner,
    fields_of,
    format_duration,
    format_path,
    locate,
)

# -- text: YAML or JSON with line numbers ------------------------------------------------


@dataclass
class SourceDocument:
    """One document of a file: its plain data and where each value and key is."""

    file: str
    index: int  # from 1
    data: Any
    positions: dict[FieldPath, tuple[int, int]] = field(default_factory=dict)
    key_positions: dict[FieldPath, tuple[int, int]] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)

    def line_of(self, path: Sequence[str | int]) -> int | None:
        pos = locate(self.positions, path, self.key_positions)
        return pos[0] if pos else None

    def problem(self, message: str, path: Sequence[str | int] = (), **kw: Any) -> Problem:
        """A Problem about `path` in this document, with file, document and line filled."""
        pos = locate(self.positions, path, self.key_positions)
        d = self.data if isinstance(self.data, dict) else {}
        meta = d.get("metadata") if isinstance(d.get("metadata"), dict) else {}
        assert isinstance(meta, dict)
        kind, name = d.get("kind"), meta.get("name")
        ns = meta.get("namespace", DEFAULT_NAMESPACE) if kind not in CLUSTER_KINDS else None
        return Problem(
            message,
            format_path(path),
            pos[0] if pos else None,
            pos[1] if pos else None,
            self.file,
            self.index,
            kind if isinstance(kind, str) else None,
            ns if isinstance(ns, str) else None,
            name if isinstance(name, str) else None,
            **kw,
        )


_MAX_DEPTH = 64
_MAX_NODES = 100_000


class _Composer:
    """Turns PyYAML's composed nodes into plain data, remembering every node's mark."""

    def __init__(self, loader: yaml.SafeLoader, doc: SourceDocument) -> None:
        self.loader = loader
        self.doc = doc
        self.budget = _MAX_NODES

    def plain(self, node: yaml.Node, path: FieldPath) -> Any:
        self.doc.positions.setdefault(path, (node.start_mark.line + 1, node.start_mark.column + 1))
        if len(path) > _MAX_DEPTH:
            raise ValueError("document nested too deeply")
        # Aliases are expanded: without a bound, nested anchors ("billion laughs") would.
        self.budget -= 1
        if self.budget < 0:
            raise ValueError(f"document has more than {_MAX_NODES} values (aliases expanded)")
        if isinstance(node, yaml.ScalarNode):
            return self.loader.construct_object(node)
        if isinstance(node, yaml.SequenceNode):
            return [self.plain(n, (*path, i)) for i, n in enumerate(node.value)]
        assert isinstance(node, yaml.MappingNode)
        out: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            mark = (key_node.start_mark.line + 1, key_node.start_mark.column + 1)
            if key_node.tag == "tag:yaml.org,2002:merge":
                self._problem(path, mark, "YAML merge keys (<<) are not supported")
                continue
            if not isinstance(key_node, yaml.ScalarNode):
                self._problem(path, mark, "mapping keys must be plain strings")
                continue
            key = self.loader.construct_object(key_node)
            if not isinstance(key, str):
                key = str(key)
            sub = (*path, key)
            if key in out:
                self._problem(sub, mark, f"duplicate key {key!r}")
                continue
            self.doc.key_positions[sub] = mark
            out[key] = self.plain(value_node, sub)
        return out

    def _problem(self, path: FieldPath, mark: tuple[int, int], message: str) -> None:
        self.doc.problems.append(
            Problem(message, format_path(path), mark[0], mark[1], self.doc.file, self.doc.index)
        )


class _DepthBoundLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing nesting past _MAX_DEPTH while it reads.

    Bounding only the composed tree would be too late: PyYAML recurses once per level,
    and its scanner reads ahead and rechecks every open flow level per token, so 5,000
    nested brackets cost seconds before any RecursionError. Here the 65th level of
    brackets (scanner) or of any nesting (composer) stops it.
    """

    _depth = 0

    def fetch_flow_collection_start(self, TokenClass: Any) -> None:
        if self.flow_level >= _MAX_DEPTH:
            raise yaml.scanner.ScannerError(
                None,
                None,
                f"nested too deeply (more than {_MAX_DEPTH} levels)",
                self.get_mark(),
            )
        super().fetch_flow_collection_start(TokenClass)

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        if self._depth >= _MAX_DEPTH:
            mark = self.peek_event().start_mark  # type: ignore[no-untyped-call]
            raise yaml.composer.ComposerError(
                None, None, f"nested too deeply (more than {_MAX_DEPTH} levels)", mark
            )
        self._depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def load_documents(text: str, file: str = "<input>") -> list[SourceDocument]:
    """Split YAML (or JSON) text into documents with marks; empty documents are skipped.

    A syntax error raises SchemaError with the line PyYAML reports.
    """
    loader = _DepthBoundLoader(text)
    docs: list[SourceDocument] = []
    index = 0
    try:
        while loader.check_node():
            index += 1
            node = loader.get_node()
            if node is None:
                continue
            doc = SourceDocument(file, index, None)
            doc.data = _Composer(loader, doc).plain(node, ())
            if doc.data is None:
                continue
            docs.append(doc)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        message = " ".join(p for p in (exc.context, exc.problem) if p) or "invalid YAML"
        raise SchemaError(
            [
                Problem(
                    f"invalid YAML: {message}",
                    line=mark.line + 1 if mark else None,
                    column=mark.column + 1 if mark else None,
                    file=file,
                    document=index or 1,
                )
            ]
        ) from None
    except (yaml.YAMLError, ValueError, RecursionError) as exc:
        raise SchemaError([Problem(f"invalid YAML: {exc}", file=file, document=index)]) from None
    finally:
        loader.dispose()
    return docs


def decode_document(doc: SourceDocument) -> tuple[Resource | None, list[Problem]]:
    """Decode one SourceDocument; problems carry its file, document number and lines."""
    decoder = Decoder(doc.positions, doc.key_positions)
    res = decoder.resource(doc.data) if not doc.problems else None
    problems = list(doc.problems)
    for p in decoder.problems:
        path = parse_path(p.path)
        located = doc.problem(p.message, path)
        if p.line is not None:
            located.line, located.column = p.line, p.column
        problems.append(located)
    return (res if not problems else None), problems


def parse_resources(text: str, file: str = "<input>") -> list[Resource]:
    """Every resource in `text`; SchemaError with all problems if any document is bad."""
    out: list[Resource] = []
    problems: list[Problem] = []
    for doc in load_documents(text, file):
        res, probs = decode_document(doc)
        problems += probs
        if res is not None:
            out.append(res)
    if problems:
        raise SchemaError(problems)
    return out


_PATH_PART = re.compile(r"\[(\d+)\]|\.?([^.\[]+)")


def parse_path(text: str) -> FieldPath:
    return tuple(int(m.group(1)) if m.group(1) else m.group(2) for m in _PATH_PART.finditer(text))


def dump_yaml(resources: Sequence[Resource]) -> str:
    """Resources as a multi-document YAML stream."""
    return yaml.safe_dump_all(
        [r.to_dict() for r in resources], sort_keys=False, default_flow_style=False
    )


# -- JSON Schema -------------------------------------------------------------------------

_DURATION_PATTERN = r"^(0|(([0-9]+(\.[0-9]*)?|\.[0-9]+)(ns|us|µs|ms|s|m|h))+)$"
_NAME_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"


def _json_schema(tp: Any, defs: dict[str, Any]) -> dict[str, Any]:
    inner = _optional_inner(tp)
    if inner is not None:
        return _json_schema(inner, defs)
    if _is_duration(tp):
        return {"type": "string", "pattern": _DURATION_PATTERN}
    origin = get_origin(tp)
    if origin is Literal:
        return {"enum": list(get_args(tp))}
    simple = {bool: "boolean", int: "integer", float: "number", str: "string"}
    if tp in simple:
        return {"type": simple[tp]}
    if origin is tuple:
        return {"type": "array", "items": _json_schema(get_args(tp)[0], defs)}
    if origin is dict:
        return {"type": "object", "additionalProperties": _json_schema(get_args(tp)[1], defs)}
    if _is_schema_class(tp):
        name = tp.__name__
        if name not in defs:
            defs[name] = {}  # placeholder against recursion
            defs[name] = _object_schema(tp, defs)
        return {"$ref": f"#/$defs/{name}"}
    raise TypeError(f"schema type {tp!r} not handled")


def _object_schema(cls: type[Any], defs: dict[str, Any]) -> dict[str, Any]:
    props: dict[str, Any] = {}
    required = []
    for f in fields_of(cls):
        sub = dict(_json_schema(f.type, defs))
        if f.doc:
            sub["description"] = f.doc
        if (
            not f.required
            and f.default not in (None, (), {})
            and not dataclasses.is_dataclass(f.default)
        ):
            sub["default"] = format_duration(f.default) if _is_duration(f.type) else f.default
        props[f.key] = sub
        if f.required:
            required.append(f.key)
    out: dict[str, Any] = {
        "type": "object",
        "description": (cls.__doc__ or "").strip().splitlines()[0],
        "properties": props,
        "additionalProperties": False,
    }
    if required:
        out["required"] = required
    groups = getattr(cls, "ONE_OF", ())
    if groups:
        out["oneOf"] = [{"required": [k]} for k in groups[0]]
    return out


def json_schema(kind: str) -> dict[str, Any]:
    """The JSON Schema (2020-12) of one kind's documents, for editors."""
    defs: dict[str, Any] = {}
    spec_ref = _json_schema(SPEC_TYPES[kind], defs)
    meta = _object_schema(MetadataSpec, defs)
    meta["properties"]["name"]["pattern"] = _NAME_PATTERN
    meta["properties"]["namespace"]["pattern"] = _NAME_PATTERN
    if kind == "Intention":  # `*`: every service (and with namespace `*`, every namespace)
        wild = {"anyOf": [{"pattern": _NAME_PATTERN}, {"const": "*"}]}
        for key in ("name", "namespace"):
            del meta["properties"][key]["pattern"]
            meta["properties"][key].update(wild)
    for extra in sorted(SERVER_SET_METADATA):
        meta["properties"][extra] = {"description": "Set by the control plane; ignored."}
    if kind in CLUSTER_KINDS:
        del meta["properties"]["namespace"]
        meta["properties"]["name"] = {"const": MESH_CONFIG_NAME}
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": f"https://tether.dev/schema/{API_VERSION}/{kind.lower()}.json",
        "title": kind,
        "description": (SPEC_TYPES[kind].__doc__ or "").strip().splitlines()[0],
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "additionalProperties": False,
        "properties": {
            "apiVersion": {"const": API_VERSION},
            "kind": {"const": kind},
            "metadata": meta,
            "spec": spec_ref,
            "status": {"description": "Set by the control plane; ignored."},
        },
        "$defs": defs,
    }


def schema_files() -> dict[str, str]:
    """File name → JSON text, one file per kind, as committed in docs/schema/."""
    return {
        f"{kind.lower()}.json": json.dumps(json_schema(kind), indent=2, ensure_ascii=False) + "\n"
        for kind in KINDS
    }


def write_schema(directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in schema_files().items():
        path = directory / name
        path.write_text(text, encoding="utf-8")
        written.append(path)
    return written


def stale_schema_files(directory: Path) -> list[str]:
    """Names of files in `directory` that differ from what the schema generates."""
    stale = []
    for name, text in schema_files().items():
        path = directory / name
        if not path.exists() or path.read_text(encoding="utf-8") != text:
            stale.append(name)
    return stale


def iter_dataclass_types(root: type[Any]) -> Iterator[type[Any]]:
    """Every schema dataclass reachable from `root` (for tests and docs)."""
    seen: set[type[Any]] = set()
    todo = [root]
    while todo:
        cls = todo.pop()
        if cls in seen:
            continue
        seen.add(cls)
        yield cls
        for f in fields_of(cls):
            stack = [f.type]
            while stack:
                t = stack.pop()
                if _is_schema_class(t):
                    todo.append(t)
                stack.extend(get_args(t))


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m controlplane.schema", description="Generate or check docs/schema/."
    )
    ap.add_argument("--write", metavar="DIR", type=Path, help="write the JSON Schema files")
    ap.add_argument("--check", metavar="DIR", type=Path, help="fail if the files are stale")
    args = ap.parse_args(argv)
    if args.write:
        for p in write_schema(args.write):
            print(p)
    if args.check:
        stale = stale_schema_files(args.check)
        if stale:
            print(f"stale: {', '.join(stale)} (run --write {args.check})", file=sys.stderr)
            return 1
    if not (args.write or args.check):
        ap.print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())
