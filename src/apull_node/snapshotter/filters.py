"""containerd's filter expressions, as List receives them, matched against snapshot Info.

Syntax (containerd's "filters" package): a filter is selectors joined by "," (all must match);
several filters in one request are OR-ed. A selector is a field path with an optional operator
and value::

    name==foo
    labels."containerd.io/snapshot.ref"==sha256:abc,parent==""
    kind!=view
    labels.foo            (presence)
    name~=/^sha256:/      (regular expression)

Field path elements are [A-Za-z0-9_]+ or a "quoted" string; values are a run of non-space,
non-comma characters or a quoted string ("..."; also /.../ and |...| after ~=). containerd
asks us with such a filter when unpack finds a layer that already exists (see Prepare).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from apull_node.snapshotter.errors import InvalidArgumentError

#: Looks a field path up on an object: (value, present).
Adaptor = Callable[[Sequence[str]], tuple[str, bool]]

_QUOTES = '"/|'
_OPERATOR_CHARS = "=!~"
_SIMPLE_ESCAPES = {
    "a": "\a",
    "b": "\b",
    "f": "\f",
    "n": "\n",
    "r": "\r",
    "t": "\t",
    "v": "\v",
    "\\": "\\",
}


@dataclass(frozen=True)
class Selector:
    fieldpath: tuple[str, ...]
    operator: str  # "" (presence), "==", "!=" or "~="
    value: str = ""
    pattern: re.Pattern[str] | None = None

    def matches(self, adaptor: Adaptor) -> bool:
        value, present = adaptor(self.fieldpath)
        if self.operator == "":
            return present
        if self.operator == "==":
            return present and value == self.value
        if self.operator == "!=":
            return value != self.value
        assert self.pattern is not None
        return self.pattern.search(value) is not None


@dataclass(frozen=True)
class Filter:
    """Any of `alternatives` matches when all of its selectors do; no alternatives: all match."""

    alternatives: tuple[tuple[Selector, ...], ...] = ()

    def matches(self, adaptor: Adaptor) -> bool:
        if not self.alternatives:
            return True
        return any(all(s.matches(adaptor) for s in sel) for sel in self.alternatives)


def parse_filters(filters: Sequence[str]) -> Filter:
    """Parse a List request's filters; an empty string or list matches everything."""
    alternatives = []
    for text in filters:
        if not text:
            return Filter()  # an empty filter matches everything, so the OR does too
        alternatives.append(_Parser(text).selectors())
    return Filter(tuple(alternatives))


class _Parser:
    """Recursive descent over a small hand-written scanner, one filter string at a time."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def error(self, message: str) -> InvalidArgumentError:
        return InvalidArgumentError(f"filter {self.text!r} at offset {self.pos}: {message}")

    def skip_space(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos].isspace():
            self.pos += 1

    def peek(self) -> str:
        self.skip_space()
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def selectors(self) -> tuple[Selector, ...]:
        result = [self.selector()]
        while True:
            ch = self.peek()
            if ch == "":
                return tuple(result)
            if ch != ",":
                raise self.error(f"unexpected {ch!r}")
            self.pos += 1
            result.append(self.selector())

    def selector(self) -> Selector:
        fieldpath = self.fieldpath()
        if self.peek() in ("", ","):
            return Selector(fieldpath, "")
        operator = self.operator()
        value = self.value(alt_quotes=operator == "~=")
        if operator != "~=":
            return Selector(fieldpath, operator, value)
        try:
            pattern = re.compile(value)
        except re.error as err:
            raise self.error(f"bad regular expression {value!r}: {err}") from err
        return Selector(fieldpath, operator, value, pattern)

    def fieldpath(self) -> tuple[str, ...]:
        parts = [self.field()]
        while self.peek() == ".":
            self.pos += 1
            parts.append(self.field())
        return tuple(parts)

    def field(self) -> str:
        ch = self.peek()
        if ch == '"':
            return self.quoted()
        start = self.pos
        while self.pos < len(self.text) and (
            self.text[self.pos].isalnum() or self.text[self.pos] == "_"
        ):
            self.pos += 1
        if self.pos == start:
            raise self.error("expected a field name or a quoted string")
        return self.text[start : self.pos]

    def operator(self) -> str:
        self.skip_space()
        start = self.pos
        while self.pos < len(self.text) and self.text[self.pos] in _OPERATOR_CHARS:
            self.pos += 1
        operator = self.text[start : self.pos]
        if operator not in ("==", "!=", "~="):
            raise self.error('expected an operator ("==", "!=" or "~=")')
        return operator

    def value(self, alt_quotes: bool) -> str:
        ch = self.peek()
        if ch in _QUOTES and ch:
            if ch != '"' and not alt_quotes:
                raise self.error(f"{ch}...{ch} quoting is only allowed after ~=")
            return self.quoted()
        start = self.pos
        while self.pos < len(self.text) and not (
            self.text[self.pos] == "," or self.text[self.pos].isspace()
        ):
            self.pos += 1
        if self.pos == start:
            raise self.error("expected a value")
        return self.text[start : self.pos]

    def quoted(self) -> str:
        quote = self.text[self.pos]
        self.pos += 1
        out: list[str] = []
        while True:
            if self.pos >= len(self.text) or self.text[self.pos] == "\n":
                raise self.error("unterminated quoted string")
            ch = self.text[self.pos]
            self.pos += 1
            if ch == quote:
                return "".join(out)
            if ch != "\\":
                out.append(ch)
                continue
            out.append(self.escape(quote))

    def escape(self, quote: str) -> str:
        if self.pos >= len(self.text):
            raise self.error("unterminated escape")
        ch = self.text[self.pos]
        self.pos += 1
        if ch in _SIMPLE_ESCAPES:
            return _SIMPLE_ESCAPES[ch]
        if ch == quote:
            return ch
        digits = {"x": 2, "u": 4, "U": 8}.get(ch)
        base = 16
        if digits is None and ch in "01234567":
            digits, base, self.pos = 3, 8, self.pos - 1
        if digits is not None:
            code = self.text[self.pos : self.pos + digits]
            self.pos += digits
            try:
                return chr(int(code, base))
            except ValueError as err:
                raise self.error(f"bad escape \\{ch}{code}") from err
        if quote != '"':
            return "\\" + ch  # keep regular-expression escapes such as \. as they are
        raise self.error(f"unknown escape \\{ch}")
