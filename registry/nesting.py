"""Bounded nesting for every JSON and HCL document the registry parses, checked before parsing.

Python's parsers recurse once per level of nesting: a body of 100,000 `[` makes
`json.loads` raise RecursionError and the HCL rule parser burn seconds first. Every
document is scanned once, in linear time (the scan skips whole strings and comments in
one regex step), and one nested deeper than `MAX_DEPTH` is refused with a message before
any parser sees it. Consul's own documents (service definitions, transactions, ACL
rules) are nowhere near that deep.
"""

from __future__ import annotations

import json
import re
from typing import Any

MAX_DEPTH = 64

# Strings (JSON and HCL quoting), HCL comments, and the brackets that nest.
_TOKENS = re.compile(r'"(?:[^"\\]|\\.)*"|#[^\n]*|//[^\n]*|/\*.*?\*/|[\[\]{}]', re.S)
_OPENERS = frozenset("[{")


class NestingError(ValueError):
    """A document nests deeper than `MAX_DEPTH`."""


def check_depth(text: str, limit: int = MAX_DEPTH) -> None:
    """Raise `NestingError` if brackets and braces in `text` nest deeper than `limit`."""
    depth = 0
    for m in _TOKENS.finditer(text):
        tok = m.group()
        if tok in _OPENERS:
            depth += 1
            if depth > limit:
                raise NestingError(f"nested deeper than {limit} levels (at offset {m.start()})")
        elif tok in ("]", "}"):
            depth = max(0, depth - 1)


def loads(raw: str | bytes) -> Any:
    """`json.loads` for untrusted input: ValueError (a `NestingError` if too deep) or the value."""
    text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
    check_depth(text)
    return json.loads(text)
