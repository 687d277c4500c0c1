"""JSON decoding with a nesting limit: deep input is refused at once, never a RecursionError.

`json.loads` recurses once per level and raises RecursionError somewhere near the
interpreter's limit (a 500 in a server, and any code that walks the result recurses as
deep). `loads` first counts the nesting of brackets outside strings, stopping at the
first one past `max_depth`, so a 100,000-deep body costs microseconds to refuse; only
then is the text decoded. Any service reading untrusted JSON can use it.
"""

from __future__ import annotations

import json
import re
from typing import Any

# Deep enough for any document Tether reads (policies nest about eight levels).
MAX_DEPTH = 64

# A whole string (escapes included), or one bracket.
_TOKEN = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}]')


class JSONDepthError(ValueError):
    """JSON nested deeper than allowed."""


def check_depth(text: str, max_depth: int = MAX_DEPTH) -> None:
    """Raise JSONDepthError if `text` nests arrays/objects deeper than `max_depth`."""
    depth = 0
    for m in _TOKEN.finditer(text):
        c = text[m.start()]
        if c in "[{":
            depth += 1
            if depth > max_depth:
                raise JSONDepthError(
                    f"JSON nested deeper than {max_depth} levels (at character {m.start()})"
                )
        elif c in "]}":
            depth -= 1


def loads(text: str, max_depth: int = MAX_DEPTH) -> Any:
    """`json.loads` for untrusted text: JSONDepthError past `max_depth`, ValueError if
    it is not JSON."""
    check_depth(text, max_depth)
    return json.loads(text)
