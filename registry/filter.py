"""Consul's `?filter=` expression language (go-bexpr): parse once, then match objects.

`compile_filter(text)` tokenizes and parses an expression into a small AST and returns a
`Filter`; `Filter.matches(obj)` evaluates it against one JSON-shaped object (the dicts
the registry answers with). No I/O anywhere: the HTTP handlers call this.

The language, as go-bexpr and Consul's "Filtering" API docs define it:

    expression := or ;  or := and ("or" and)* ;  and := not ("and" not)*
    not        := "not" not | "(" or ")" | match
    match      := selector ("==" | "!=") value
                | selector ["not"] ("contains" | "matches") value
                | selector "is" ["not"] "empty"
                | value ["not"] "in" selector
    selector   := Ident ("." Ident | "." Digits | "[" string "]")*    (no spaces inside)
                | '"/json/pointer"'
    value      := string ("..." with Go escapes, or `raw`) | number | selector (its text)

Precedence is not > and > or; keywords are only keywords where the grammar expects
them, so a field may be called `in` or `not`. go-bexpr needs whitespace around `and`,
`or`, `not`, `in`, ...; we accept them next to a parenthesis or a quote too (`not(...)`),
a strict superset, since the tokens are unambiguous.

Evaluation follows go-bexpr:
- A selector walks maps by key; at a list, a decimal segment indexes it (`Checks.0`),
  any other segment applies the whole match to every element and is true if ANY element
  is (so `Checks.Status != passing` means "some check is not passing"; an empty list
  matches nothing, whatever the operator).
- `==` / `!=` coerce the value to the field's type: a bool field takes Go's ParseBool
  spellings (true, True, TRUE, t, 1, ...), a number field an integer (Go base-0 syntax:
  0x1F90, 0o17, 0b1) or a float; a string field compares the text. `contains` / `in`
  test a substring of a string, a key of a map, or an element of a list (each element
  compared in its own type; elements the value cannot be read as are skipped).
  `is empty` is a zero length; `matches` is an unanchored RE2 search (Go's regexp
  syntax, linear time: a user's pattern cannot stall the event loop).
- Missing data. go-bexpr rejects unknown fields of typed structs and treats a missing
  map key as "not present". Our objects are dicts, so every absent field, a JSON null,
  and a path that runs into a scalar are "not present", and the operator decides:
  `==`, `in`/`contains`, `is not empty` and `matches` are false; `!=`, `not in`/
  `not contains`, `is empty` and `not matches` are true.
- A value that the field's type cannot take (`Port == "abc"`, `Tags == "x"` on a list,
  `Port matches "8"`) is an error, as in Consul: `matches()` raises BadRequestError then.

Errors in the text raise BadRequestError naming line:column (offset) as go-bexpr does,
with what was expected there, e.g.
`Failed to create boolean expression evaluator: 1:9 (8): no match found, expected: "!=",
"==", ...`.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn

import re2

from registry.errors import BadRequestError

__all__ = ["Filter", "compile_filter"]

PREFIX = "Failed to create boolean expression evaluator: "
EVAL_PREFIX = "Failed to evaluate filter: "
# Python's recursion limit is 1000 frames and one level of nesting costs about four:
# deeper input is an error, not a crash.
MAX_DEPTH = 100

_WHITESPACE = " \t\r\n"
_IDENT_START = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
_IDENT_CHARS = _IDENT_START | frozenset("0123456789_/")
_DIGITS = frozenset("0123456789")
_NUMBER_ENDS = frozenset(_WHITESPACE + ")],")
_BOOLS = {
    "1": True, "t": True, "T": True, "TRUE": True, "true": True, "True": True,
    "0": False, "f": False, "F": False, "FALSE": False, "false": False, "False": False,
}  # fmt: skip
_SIMPLE_ESCAPES = {
    "a": "\a", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v",
    "\\": "\\", '"': '"',
}  # fmt: skip


# -- tokens ----------------------------------------------------------------------------


class Kind(enum.Enum):
    IDENT = "identifier"
    DIGITS = "digits"  # a selector segment right after "." (`Checks.0`)
    NUMBER = "number"
    STRING = "string"
    EQ = '"=="'
    NE = '"!="'
    LPAREN = '"("'
    RPAREN = '")"'
    LBRACKET = '"["'
    RBRACKET = '"]"'
    DOT = '"."'
    EOF = "end of input"


@dataclass(frozen=True, slots=True)
class Token:
    kind: Kind
    text: str  # the source text (for STRING: the decoded value)
    start: int  # offsets into the expression, in characters
    end: int
    raw: bool = False  # a backtick string (never a JSON pointer)


def _error(text: str, pos: int, detail: str) -> BadRequestError:
    """An error at `pos`, located the way go-bexpr (pigeon) does: line:column (byte offset)."""
    before = text[:pos]
    line = before.count("\n") + 1
    column = pos - (before.rfind("\n") + 1) + 1
    offset = len(before.encode("utf-8", "surrogatepass"))
    return BadRequestError(f"{PREFIX}{line}:{column} ({offset}): {detail}")


def tokenize(text: str) -> list[Token]:
    """Split an expression into tokens; the last one is EOF."""
    tokens: list[Token] = []
    i, n = 0, len(text)
    while True:
        while i < n and text[i] in _WHITESPACE:
            i += 1
        if i >= n:
            tokens.append(Token(Kind.EOF, "", n, n))
            return tokens
        c = text[i]
        start = i
        if c in _IDENT_START:
            i += 1
            while i < n and text[i] in _IDENT_CHARS:
                i += 1
            tokens.append(Token(Kind.IDENT, text[start:i], start, i))
        elif c in _DIGITS and tokens and tokens[-1].kind is Kind.DOT and tokens[-1].end == i:
            while i < n and text[i] in _DIGITS:
                i += 1
            tokens.append(Token(Kind.DIGITS, text[start:i], start, i))
        elif c in _DIGITS or c == "-":
            i = _scan_number(text, i)
            tokens.append(Token(Kind.NUMBER, text[start:i], start, i))
        elif c == '"' or c == "`":
            value, i = _scan_string(text, i)
            tokens.append(Token(Kind.STRING, value, start, i, raw=c == "`"))
        elif text.startswith("==", i):
            i += 2
            tokens.append(Token(Kind.EQ, "==", start, i))
        elif text.startswith("!=", i):
            i += 2
            tokens.append(Token(Kind.NE, "!=", start, i))
        elif c in "()[].":
            i += 1
            kind = {
                "(": Kind.LPAREN,
                ")": Kind.RPAREN,
                "[": Kind.LBRACKET,
                "]": Kind.RBRACKET,
                ".": Kind.DOT,
            }[c]
            tokens.append(Token(kind, c, start, i))
        else:
            hint = (
                ' (did you mean "=="?)' if c == "=" else ' (did you mean "!="?)' if c == "!" else ""
            )
            raise _error(text, i, f"unexpected character {c!r}{hint}")


def _scan_number(text: str, i: int) -> int:
    """`-?(0|[1-9][0-9]*)(.[0-9]+)?`, ending at whitespace, ")" or the end (go-bexpr).

    "]" and "," end it too, so `a[0]` is reported as a bad index rather than a bad number.
    """
    start, n = i, len(text)
    if text[i] == "-":
        i += 1
    if i < n and text[i] == "0":
        i += 1
    elif i < n and text[i] in _DIGITS:
        while i < n and text[i] in _DIGITS:
            i += 1
    else:
        raise _error(text, i, 'invalid number literal: expected a digit after "-"')
    if i + 1 < n and text[i] == "." and text[i + 1] in _DIGITS:
        i += 1
        while i < n and text[i] in _DIGITS:
            i += 1
    if i < n and text[i] not in _NUMBER_ENDS:
        end = i
        while end < n and text[end] not in _NUMBER_ENDS:
            end += 1
        raise _error(text, start, f"invalid number literal {text[start:end]!r}")
    return i


def _scan_string(text: str, i: int) -> tuple[str, int]:
    """A "..." string with Go escapes, or a `...` raw string; returns (value, end)."""
    quote, start, n = text[i], i, len(text)
    i += 1
    if quote == "`":
        end = text.find("`", i)
        if end < 0:
            raise _error(text, start, "unterminated string literal")
        # Go's strconv.Unquote drops carriage returns from raw strings.
        return text[i:end].replace("\r", ""), end + 1
    out = bytearray()
    while True:
        if i >= n:
            raise _error(text, start, "unterminated string literal")
        c = text[i]
        if c == '"':
            return out.decode("utf-8", "replace"), i + 1
        if c == "\n":
            raise _error(text, i, "newline in string literal (use \\n)")
        if c != "\\":
            out += c.encode("utf-8", "surrogatepass")
            i += 1
            continue
        if i + 1 >= n:
            raise _error(text, start, "unterminated string literal")
        e = text[i + 1]
        if e in _SIMPLE_ESCAPES:
            out += _SIMPLE_ESCAPES[e].encode()
            i += 2
        elif e in "xuU":
            width = {"x": 2, "u": 4, "U": 8}[e]
            digits = text[i + 2 : i + 2 + width]
            if len(digits) != width or any(d not in "0123456789abcdefABCDEF" for d in digits):
                raise _error(text, i, f"invalid escape sequence \\{e} in string literal")
            code = int(digits, 16)
            if e == "x":
                out.append(code)
            elif code > 0x10FFFF or 0xD800 <= code <= 0xDFFF:
                raise _error(text, i, f"invalid Unicode escape \\{e}{digits} in string literal")
            else:
                out += chr(code).encode()
            i += 2 + width
        elif e in "01234567":
            digits = text[i + 1 : i + 4]
            if len(digits) != 3 or any(d not in "01234567" for d in digits) or int(digits, 8) > 255:
                raise _error(text, i, "invalid octal escape in string literal")
            out.append(int(digits, 8))
            i += 4
        else:
            raise _error(text, i, f"invalid escape sequence \\{e} in string literal")


# -- syntax tree -----------------------------------------------------------------------


class Op(enum.Enum):
    EQUAL = "=="
    NOT_EQUAL = "!="
    IN = "in"
    NOT_IN = "not in"
    IS_EMPTY = "is empty"
    IS_NOT_EMPTY = "is not empty"
    MATCHES = "matches"
    NOT_MATCHES = "not matches"


# The positive form of each operator, and whether the operator negates it.
_POSITIVE = {
    Op.EQUAL: (Op.EQUAL, False),
    Op.NOT_EQUAL: (Op.EQUAL, True),
    Op.IN: (Op.IN, False),
    Op.NOT_IN: (Op.IN, True),
    Op.IS_EMPTY: (Op.IS_EMPTY, False),
    Op.IS_NOT_EMPTY: (Op.IS_EMPTY, True),
    Op.MATCHES: (Op.MATCHES, False),
    Op.NOT_MATCHES: (Op.MATCHES, True),
}


@dataclass(frozen=True)
class Match:
    """One comparison: the data at `path`, an operator, and the value's text."""

    path: tuple[str, ...]
    op: Op
    value: str | None  # None for is [not] empty
    regex: Any = field(default=None, compare=False, repr=False)  # compiled, for matches

    def __str__(self) -> str:
        sel = _selector_text(self.path)
        if self.value is None:
            return f"{sel} {self.op.value}"
        value = _quote(self.value)
        if self.op in (Op.IN, Op.NOT_IN):
            return f"{value} {self.op.value} {sel}"
        return f"{sel} {self.op.value} {value}"


@dataclass(frozen=True)
class Not:
    operand: Node

    def __str__(self) -> str:
        return f"not {_wrap(self.operand)}"


@dataclass(frozen=True)
class And:
    operands: tuple[Node, ...]

    def __str__(self) -> str:
        return " and ".join(_wrap(o) for o in self.operands)


@dataclass(frozen=True)
class Or:
    operands: tuple[Node, ...]

    def __str__(self) -> str:
        return " or ".join(_wrap(o) for o in self.operands)


Node = Match | Not | And | Or


def _wrap(node: Node) -> str:
    return str(node) if isinstance(node, Match | Not) else f"({node})"


def _quote(value: str) -> str:
    if "`" not in value:
        return f"`{value}`"
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{escaped}"'


def _selector_text(path: Sequence[str]) -> str:
    out = ""
    for i, part in enumerate(path):
        if part and part[0] in _IDENT_START and all(c in _IDENT_CHARS for c in part):
            out += f".{part}" if i else part
        elif i and part.isdigit() and part.isascii():
            out += f".{part}"
        else:
            out += f"[{_quote(part)}]"
    return out


# -- parser ----------------------------------------------------------------------------


class _Backtrack(Exception):
    """This alternative does not apply; the parser remembers what it expected where."""


class _Parser:
    """Recursive descent over the tokens, reporting the farthest failure like a PEG."""

    def __init__(self, text: str, tokens: list[Token]) -> None:
        self.text = text
        self.tokens = tokens
        self.i = 0
        self.depth = 0
        self.far = -1
        self.expected: set[str] = set()

    # helpers

    @property
    def tok(self) -> Token:
        return self.tokens[self.i]

    def at(self, kind: Kind) -> bool:
        return self.tokens[self.i].kind is kind

    def peek(self, ahead: int = 1) -> Token:
        return self.tokens[min(self.i + ahead, len(self.tokens) - 1)]

    def is_word(self, word: str, ahead: int = 0) -> bool:
        t = self.peek(ahead) if ahead else self.tok
        return t.kind is Kind.IDENT and t.text == word

    def fail(self, *expected: str, pos: int | None = None) -> NoReturn:
        pos = self.tok.start if pos is None else pos
        if pos > self.far:
            self.far, self.expected = pos, set(expected)
        elif pos == self.far:
            self.expected.update(expected)
        raise _Backtrack

    def syntax_error(self) -> BadRequestError:
        pos = max(self.far, 0)
        found = next(t for t in self.tokens if t.start >= pos)
        if found.start > pos:
            seen = "whitespace"
        elif found.kind is Kind.EOF:
            seen = "end of input"
        else:
            seen = repr(self.text[found.start : found.end])
        expected = sorted(self.expected)
        listed = ", ".join(expected[:-1]) + f" or {expected[-1]}" if len(expected) > 1 else ""
        listed = listed or (expected[0] if expected else "end of input")
        return _error(self.text, pos, f"no match found, expected: {listed}; found {seen}")

    def nest(self) -> None:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise _error(self.text, self.tok.start, f"expression nested deeper than {MAX_DEPTH}")

    # grammar

    def parse(self) -> Node:
        try:
            node = self.parse_or()
            if not self.at(Kind.EOF):
                self.fail('"and"', '"or"', Kind.EOF.value)
            return node
        except _Backtrack:
            raise self.syntax_error() from None

    def parse_or(self) -> Node:
        operands = [self.parse_and()]
        while self.is_word("or"):
            self.i += 1
            operands.append(self.parse_and())
        return operands[0] if len(operands) == 1 else Or(tuple(operands))

    def parse_and(self) -> Node:
        operands = [self.parse_not()]
        while self.is_word("and"):
            self.i += 1
            operands.append(self.parse_not())
        return operands[0] if len(operands) == 1 else And(tuple(operands))

    def parse_not(self) -> Node:
        if self.is_word("not"):
            # "not" is a keyword only if a negated expression follows; otherwise it may be
            # a field named `not` (`not == 1`), as in go-bexpr's PEG.
            saved, depth = self.i, self.depth
            self.i += 1
            self.nest()
            try:
                operand = self.parse_not()
            except _Backtrack:
                self.i = saved
            else:
                # `not not x` is x, as go-bexpr simplifies it.
                return operand.operand if isinstance(operand, Not) else Not(operand)
            finally:
                self.depth = depth
        if self.at(Kind.LPAREN):
            opening = self.tok
            self.i += 1
            self.nest()
            node = self.parse_or()
            self.depth -= 1
            if not self.at(Kind.RPAREN):
                if self.at(Kind.EOF):
                    raise _error(self.text, opening.start, "unmatched parentheses: missing ')'")
                self.fail('")"', '"and"', '"or"')
            self.i += 1
            return node
        return self.parse_match()

    def parse_match(self) -> Node:
        first = self.tok
        term_path = self.parse_term()
        if self.is_word("in") or (self.is_word("not") and self.is_word("in", 1)):
            op = Op.IN if self.is_word("in") else Op.NOT_IN
            self.i += 1 if op is Op.IN else 2
            value = self.term_value(first, term_path)
            return Match(self.parse_selector(), op, value)
        if term_path is None:
            # A quoted or numeric value comes first only in `value in selector`.
            self.fail('"in"', '"not in"')
        path = term_path
        if self.at(Kind.EQ) or self.at(Kind.NE):
            op = Op.EQUAL if self.at(Kind.EQ) else Op.NOT_EQUAL
            self.i += 1
            return Match(path, op, self.parse_value())
        negated = self.is_word("not") and self.peek().kind is Kind.IDENT
        word = self.peek().text if negated else self.tok.text
        if self.at(Kind.IDENT) and word in ("contains", "matches"):
            self.i += 2 if negated else 1
            value_tok = self.tok
            value = self.parse_value()
            if word == "contains":
                return Match(path, Op.NOT_IN if negated else Op.IN, value)
            return Match(
                path,
                Op.NOT_MATCHES if negated else Op.MATCHES,
                value,
                self.compile_regex(value, value_tok),
            )
        if self.is_word("is"):
            self.i += 1
            negated = self.is_word("not")
            if negated:
                self.i += 1
            if not self.is_word("empty"):
                self.fail('"empty"', *([] if negated else ['"not"']))
            self.i += 1
            return Match(path, Op.IS_NOT_EMPTY if negated else Op.IS_EMPTY, None)
        if self.is_word("not"):
            self.i += 1
            self.fail('"contains"', '"in"', '"matches"')
        expected = ['"=="', '"!="', '"contains"', '"matches"', '"is"', '"not"', '"in"']
        if self.tok.start == self.tokens[self.i - 1].end and first.kind is Kind.IDENT:
            expected += ['"."', '"["']
        self.fail(*expected)

    def parse_term(self) -> tuple[str, ...] | None:
        """What starts a match: a selector (path), or a quoted/numeric value (None)."""
        t = self.tok
        if t.kind is Kind.IDENT:
            return self.parse_selector()
        if t.kind is Kind.STRING:
            self.i += 1
            pointer = None if t.raw else _json_pointer(self.text[t.start + 1 : t.end - 1])
            value_first = self.is_word("in") or (self.is_word("not") and self.is_word("in", 1))
            if pointer is not None and not value_first:
                return pointer
            return None
        if t.kind is Kind.NUMBER:
            self.i += 1
            return None
        self.fail('"("', '"not"', "selector", "value")

    def term_value(self, first: Token, path: tuple[str, ...] | None) -> str:
        if path is None:
            return first.text
        return ".".join(path)

    def parse_selector(self) -> tuple[str, ...]:
        t = self.tok
        if t.kind is Kind.STRING and not t.raw:
            pointer = _json_pointer(self.text[t.start + 1 : t.end - 1])
            if pointer is not None:
                self.i += 1
                return pointer
            raise _error(self.text, t.start, f"invalid selector {self.text[t.start : t.end]}")
        if t.kind is not Kind.IDENT:
            self.fail("selector")
        parts = [t.text]
        self.i += 1
        while True:
            prev, t = self.tokens[self.i - 1], self.tok
            if t.start != prev.end:  # no whitespace inside a selector
                return tuple(parts)
            if t.kind is Kind.DOT:
                self.i += 1
                seg = self.tok
                if seg.start != t.end or seg.kind not in (Kind.IDENT, Kind.DIGITS):
                    self.fail("identifier", "digits", pos=t.end)
                parts.append(seg.text)
                self.i += 1
            elif t.kind is Kind.LBRACKET:
                self.i += 1
                key = self.tok
                if key.kind is not Kind.STRING:
                    self.fail("string")
                self.i += 1
                if not self.at(Kind.RBRACKET):
                    self.fail('"]"')
                self.i += 1
                parts.append(key.text)
            else:
                return tuple(parts)

    def parse_value(self) -> str:
        t = self.tok
        if t.kind is Kind.IDENT:
            return ".".join(self.parse_selector())
        if t.kind is Kind.STRING or t.kind is Kind.NUMBER:
            self.i += 1
            return t.text
        self.fail("string", "number", "selector")

    def compile_regex(self, pattern: str, at: Token) -> Any:
        options = re2.Options()
        options.log_errors = False  # the error goes to the client, not to stderr
        try:
            return re2.compile(pattern, options=options)
        except re2.error as e:
            reason = e.args[0].decode() if e.args and isinstance(e.args[0], bytes) else str(e)
            raise _error(
                self.text, at.start, f"invalid regular expression {pattern!r}: {reason}"
            ) from None


def _json_pointer(body: str) -> tuple[str, ...] | None:
    """go-bexpr's quoted selector: `/seg/seg`, segments of letters, digits and -_.~:|."""
    if body == "":
        return ()
    if not body.startswith("/"):
        return None
    parts = body[1:].split("/")
    for part in parts:
        if not part or not all(c.isalpha() or c.isnumeric() or c in "-_.~:|" for c in part):
            return None
    return tuple(p.replace("~1", "/").replace("~0", "~") for p in parts)


# -- evaluation ------------------------------------------------------------------------


# What holds for data that is not there: nothing equals, contains or matches it, and it
# is empty (go-bexpr's NotPresentDisposition).
_NOT_PRESENT = frozenset({Op.NOT_EQUAL, Op.NOT_IN, Op.IS_EMPTY, Op.NOT_MATCHES})


def _not_present(op: Op) -> bool:
    return op in _NOT_PRESENT


def _evaluate(node: Node, obj: Any) -> bool:
    if isinstance(node, Match):
        return _walk(node, obj, 0)
    if isinstance(node, And):
        return all(_evaluate(o, obj) for o in node.operands)
    if isinstance(node, Or):
        return any(_evaluate(o, obj) for o in node.operands)
    return not _evaluate(node.operand, obj)


def _walk(m: Match, value: Any, depth: int) -> bool:
    while depth < len(m.path):
        part = m.path[depth]
        if isinstance(value, Mapping):
            if part not in value:
                return _not_present(m.op)
            value = value[part]
        elif isinstance(value, list | tuple):
            if part.isdigit() and part.isascii():
                index = int(part)
                if index >= len(value):
                    return _not_present(m.op)
                value = value[index]
            else:
                # Through a list, a match holds if it holds for ANY element (go-bexpr).
                return any(_walk(m, item, depth) for item in value)
        else:
            return _not_present(m.op)
        depth += 1
    if value is None:
        return _not_present(m.op)
    op, negate = _POSITIVE[m.op]
    return _leaf(m, op, value) != negate


def _leaf(m: Match, op: Op, value: Any) -> bool:
    raw = m.value if m.value is not None else ""
    if op is Op.EQUAL:
        if isinstance(value, str | bool | int | float):
            return _equal(m, raw, value)
        _type_error(m, value, "compared with ==/!=")
    if op is Op.IN:
        if isinstance(value, str):
            return raw in value
        if isinstance(value, Mapping):
            return raw in value
        if isinstance(value, list | tuple):
            for item in value:
                if item is None:
                    continue
                if not isinstance(item, str | bool | int | float):
                    _type_error(m, value, "searched with in/contains (its elements are not values)")
                try:
                    if _equal(m, raw, item):
                        return True
                except BadRequestError:
                    continue  # an element the value cannot be read as (go-bexpr skips it)
            return False
        _type_error(m, value, "searched with in/contains")
    if op is Op.IS_EMPTY:
        if isinstance(value, str | Mapping | list | tuple):
            return len(value) == 0
        _type_error(m, value, "tested with is empty")
    if isinstance(value, str):
        try:
            return m.regex.search(value) is not None
        except UnicodeEncodeError:
            # A lone surrogate (JSON allows "\ud800") has no UTF-8 for RE2: match U+FFFD.
            return m.regex.search(value.encode("utf-8", "replace").decode()) is not None
    _type_error(m, value, "matched with a regular expression")


def _equal(m: Match, raw: str, value: str | bool | int | float) -> bool:
    if isinstance(value, str):
        return raw == value
    if isinstance(value, bool):
        if raw not in _BOOLS:
            raise _value_error(m, raw, "a boolean")
        return _BOOLS[raw] is value
    number = _parse_number(raw)
    if number is None:
        raise _value_error(m, raw, "a number")
    return number == value


def _parse_number(raw: str) -> int | float | None:
    """Go's ParseInt(s, 0, 64), else ParseFloat(s, 64); None if neither reads it."""
    if not raw.isascii() or any(c in _WHITESPACE for c in raw) or not raw:
        return None
    body = raw.lstrip("+-")
    if len(raw) - len(body) > 1:
        return None
    sign = -1 if raw.startswith("-") else 1
    try:
        if len(body) > 1 and body[0] == "0" and body[1] in "01234567_":
            value: int | float = sign * int(body, 8)  # Go's legacy octal: 017
        else:
            value = sign * int(body, 0)
        if -(2**63) <= value < 2**63:
            return value
        return None
    except ValueError:
        pass
    try:
        if body[:2] in ("0x", "0X"):
            return sign * float.fromhex(body)
        value = float(raw)
    except ValueError:
        return None
    return value if not math.isinf(value) or body.lower() in ("inf", "infinity") else None


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, Mapping):
        return "a map"
    if isinstance(value, list | tuple):
        return "a list"
    return f"a {type(value).__name__}"


def _type_error(m: Match, value: Any, action: str) -> NoReturn:
    raise BadRequestError(
        f"{EVAL_PREFIX}selector {_selector_text(m.path)!r} holds {_kind(value)}, "
        f"which cannot be {action} (in: {m})"
    )


def _value_error(m: Match, raw: str, kind: str) -> BadRequestError:
    return BadRequestError(
        f"{EVAL_PREFIX}selector {_selector_text(m.path)!r} holds {kind}, "
        f"and {raw!r} is not one (in: {m})"
    )


# -- the public face -------------------------------------------------------------------


class Filter:
    """A compiled filter expression; immutable and safe to share between requests."""

    __slots__ = ("ast", "expression")

    def __init__(self, expression: str, ast: Node | None) -> None:
        self.expression = expression
        self.ast = ast  # None: the empty expression, which matches everything

    def matches(self, obj: Mapping[str, Any]) -> bool:
        """Whether `obj` passes; raises BadRequestError if a value cannot be compared."""
        if self.ast is None:
            return True
        return _evaluate(self.ast, obj)

    def select(self, objs: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
        """The objects that pass, in order."""
        return [o for o in objs if self.matches(o)]

    def __repr__(self) -> str:
        return f"Filter({self.expression!r}, ast={self.ast})"


def compile_filter(expression: str) -> Filter:
    """Parse a `?filter=` expression; the empty string filters nothing out.

    Raises BadRequestError, saying where and what was expected, for malformed text.
    """
    if expression == "":
        return Filter(expression, None)
    tokens = tokenize(expression)
    return Filter(expression, _Parser(expression, tokens).parse())
