"""`tether inject` on a file: tells a compose file from Kubernetes manifests by its
content and injects it, leaving every document it does not change byte for byte as it
was (comments and formatting kept; only changed workloads are written anew)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import yaml

from controlplane.inject.compose import ComposeSpec, inject_compose, is_compose
from controlplane.inject.errors import InjectError
from controlplane.inject.manifests import InjectSpec, inject_object

MAX_INPUT = 16 << 20  # bytes: a manifest larger than this is refused, not parsed


@dataclass
class InjectedText:
    text: str
    format: str  # "kubernetes" or "compose"
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def _dump(doc: Any) -> str:
    return yaml.safe_dump(doc, sort_keys=False, default_flow_style=False, width=1 << 16)


def _documents(text: str) -> list[tuple[Any, int, int]]:
    """(document, start, end) for each YAML document, `start:end` its source text."""
    try:
        nodes = list(yaml.compose_all(text, Loader=yaml.SafeLoader))
    except yaml.YAMLError as exc:
        raise InjectError(f"not valid YAML: {exc}") from None
    out = []
    for node in nodes:
        if node is None:
            continue
        doc = yaml.SafeLoader(text[node.start_mark.index : node.end_mark.index]).get_single_data()
        out.append((doc, node.start_mark.index, node.end_mark.index))
    return out


def inject_text(
    text: str,
    kubernetes: InjectSpec,
    compose: ComposeSpec,
    name: Callable[[], str] = lambda: "input",
) -> InjectedText:
    """The injected form of a compose file or a stream of Kubernetes documents."""
    if len(text.encode()) > MAX_INPUT:
        raise InjectError(f"{name()}: larger than {MAX_INPUT >> 20} MiB")
    docs = _documents(text)
    if not docs:
        raise InjectError(f"{name()}: no documents")
    if len(docs) == 1 and is_compose(docs[0][0]):
        result = inject_compose(docs[0][0], compose)
        return InjectedText(_dump(result.document), "compose", result.notes, result.warnings)
    pieces: list[str] = []
    notes: list[str] = []
    pos = 0
    for i, (doc, start, end) in enumerate(docs):
        if not isinstance(doc, dict) or "kind" not in doc:
            raise InjectError(
                f"{name()}: document {i + 1} is neither a Kubernetes object nor a compose file"
            )
        try:
            injected, said = inject_object(doc, kubernetes)
        except InjectError as exc:
            raise InjectError(f"{name()}: document {i + 1}: {exc}") from None
        notes += said
        if injected is doc:
            continue  # the source text stays as it is
        pieces.append(text[pos:start])
        pieces.append(_dump(injected))
        pos = end
        # The dump ends its own line; the source's line break after the document
        # would leave an empty line.
        if text.startswith("\n", pos):
            pos += 1
    pieces.append(text[pos:])
    return InjectedText("".join(pieces), "kubernetes", notes)
