"""RFC 6902 JSON Patch: applying the operations the injector emits (`add`, `replace`,
`remove`, `test`) to a document, so `tether inject` writes exactly what the webhook's
patch makes of a pod."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

from controlplane.inject.errors import InjectError

Operation = dict[str, Any]


class PatchError(InjectError):
    """An operation that does not apply to the document (RFC 6902 section 5)."""


def escape(token: str) -> str:
    """One reference token of a JSON Pointer (RFC 6901): `~` → `~0`, `/` → `~1`."""
    return token.replace("~", "~0").replace("/", "~1")


def _tokens(pointer: str) -> list[str]:
    if pointer == "":
        return []
    if not pointer.startswith("/"):
        raise PatchError(f"{pointer!r} is not a JSON Pointer")
    return [t.replace("~1", "/").replace("~0", "~") for t in pointer[1:].split("/")]


def _index(container: list[Any], token: str, *, adding: bool) -> int:
    if token == "-" and adding:
        return len(container)
    if not token.isdigit() or (token != "0" and token.startswith("0")):
        raise PatchError(f"{token!r} is not an array index")
    i = int(token)
    if i > len(container) or (i == len(container) and not adding):
        raise PatchError(f"index {i} is out of range")
    return i


def _parent(doc: Any, tokens: list[str], pointer: str) -> Any:
    node = doc
    for token in tokens[:-1]:
        if isinstance(node, dict):
            if token not in node:
                raise PatchError(f"{pointer}: {token!r} does not exist")
            node = node[token]
        elif isinstance(node, list):
            node = node[_index(node, token, adding=False)]
        else:
            raise PatchError(f"{pointer}: {token!r} is inside a scalar")
    return node


def apply(doc: Any, patch: Sequence[Operation]) -> Any:
    """A copy of `doc` with `patch` applied; `doc` itself is not changed."""
    doc = copy.deepcopy(doc)
    for op in patch:
        kind, pointer = op.get("op"), op.get("path")
        if not isinstance(pointer, str):
            raise PatchError(f"operation {op!r} has no path")
        tokens = _tokens(pointer)
        if not tokens:
            if kind in ("add", "replace"):
                doc = copy.deepcopy(op["value"])
                continue
            raise PatchError(f"{kind} of the whole document")
        parent, last = _parent(doc, tokens, pointer), tokens[-1]
        if kind == "add":
            value = copy.deepcopy(op["value"])
            if isinstance(parent, list):
                parent.insert(_index(parent, last, adding=True), value)
            elif isinstance(parent, dict):
                parent[last] = value
            else:
                raise PatchError(f"{pointer}: the parent is a scalar")
        elif kind in ("replace", "remove", "test"):
            if isinstance(parent, list):
                key: Any = _index(parent, last, adding=False)
            elif isinstance(parent, dict) and last in parent:
                key = last
            else:
                raise PatchError(f"{pointer}: does not exist")
            if kind == "replace":
                parent[key] = copy.deepcopy(op["value"])
            elif kind == "remove":
                del parent[key]
            elif parent[key] != op.get("value"):
                raise PatchError(f"{pointer}: test failed")
        else:
            raise PatchError(f"operation {kind!r} is not supported")
    return doc
