"""Strict protobuf-text parsing with FILE:LINE:COL in every error (configs and records).

`parse_text` reports syntax errors, unknown fields, a non-repeated field given twice and
two members of one oneof where the protobuf parser finds them. `Locator` maps the field
paths of an already parsed text to their positions, so that rules checked after parsing
can point at the line of the field at fault too.
"""

from __future__ import annotations

import bisect
import re
from dataclasses import dataclass
from typing import TypeVar

from google.protobuf import descriptor as _descriptor
from google.protobuf import text_format
from google.protobuf.message import Message

__all__ = ["FieldPath", "Locator", "decode_utf8", "parse_text", "read_text"]

FieldPath = tuple[object, ...]
"""A field path in a parsed message, e.g. ("override_layers_configs", 0, "layer_name")."""

M = TypeVar("M", bound=Message)

_PARSER_POSITION = re.compile(r"^\d+:\d+ : ")


def parse_text(text: str, message: M, *, source: str, error: type[Exception], what: str = "") -> M:
    """Parse protobuf text into `message` (in place, and returned).

    Raises:
        error: `FILE:LINE:COL: {what}{parser message}` (`FILE: ...` when the parser gives no position).
    """
    try:
        text_format.Parse(text, message)
    except text_format.ParseError as exc:
        detail = _PARSER_POSITION.sub("", str(exc), count=1)
        line, column = exc.GetLine(), exc.GetColumn()
        where = source if line is None else f"{source}:{line}:{column}"
        raise error(f"{where}: {what}{detail}") from None
    return message


def read_text(source: str, *, error: type[Exception], what: str) -> str:
    """The UTF-8 text of a file; unreadable or not UTF-8 is an `error` naming it (`cannot read {what} FILE`)."""
    try:
        with open(source, encoding="utf-8") as handle:
            return handle.read()
    except UnicodeDecodeError as exc:
        raise error(f"{source}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise error(f"cannot read {what} {source}: {exc.strerror or exc}") from None


def decode_utf8(data: bytes, *, source: str, error: type[Exception], what: str = "") -> str:
    """UTF-8 text (a leading BOM dropped); a bad byte is an `error` naming its line:column."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        col = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        raise error(f"{source}:{line}:{col}: {what}not UTF-8 text (byte 0x{data[exc.start]:02x})") from None


@dataclass(frozen=True)
class _Token:
    text: str
    offset: int


# Comments, strings (either quote, with escapes), words/numbers, punctuation.
_TOKEN = re.compile(
    r"""\s+|\#[^\n]*|(?P<tok>'(?:[^'\\\n]|\\.)*'|"(?:[^"\\\n]|\\.)*"|[\w.+-]+|[{}<>:;,\[\]])""",
    re.DOTALL,
)


class Locator:
    """Where each field of an already successfully parsed protobuf text starts.

    The protobuf text parser keeps no positions, so the text is scanned again with the
    schema to map field paths to 1-based (line, column). Positions are best effort: a
    path not found falls back to its closest enclosing field, then to the file alone.
    """

    def __init__(self, source: str, text: str, descriptor: _descriptor.Descriptor) -> None:
        self.source = source
        self._line_starts = [0] + [m.end() for m in re.finditer(r"\n", text)]
        self._tokens = [_Token(m.group("tok"), m.start()) for m in _TOKEN.finditer(text) if m.group("tok")]
        self._pos = 0
        self.positions: dict[FieldPath, tuple[int, int]] = {}
        try:
            self._message(descriptor, (), None)
        except IndexError:  # pragma: no cover - the text parsed, so the scan should not run out
            pass

    def __call__(self, path: FieldPath) -> str:
        """`FILE:LINE:COL` of `path` (or of its closest located parent), else `FILE`."""
        for end in range(len(path), 0, -1):
            position = self.positions.get(path[:end])
            if position is not None:
                return f"{self.source}:{position[0]}:{position[1]}"
        return self.source

    def line(self, path: FieldPath) -> int | None:
        position = self.positions.get(path)
        return None if position is None else position[0]

    def _where(self, token: _Token) -> tuple[int, int]:
        index = bisect.bisect_right(self._line_starts, token.offset) - 1
        return index + 1, token.offset - self._line_starts[index] + 1

    def _next(self) -> _Token:
        token = self._tokens[self._pos]
        self._pos += 1
        return token

    def _peek(self) -> str | None:
        return self._tokens[self._pos].text if self._pos < len(self._tokens) else None

    def _message(self, desc: _descriptor.Descriptor, prefix: FieldPath, closing: str | None) -> None:
        counters: dict[str, int] = {}
        while self._peek() is not None:
            text = self._peek()
            if text == closing:
                self._pos += 1
                return
            if text in (";", ","):
                self._pos += 1
                continue
            name = self._next()
            field = desc.fields_by_name.get(name.text)
            if field is None:  # pragma: no cover - the parser accepted the text
                return
            if self._peek() == ":":
                self._pos += 1
            if self._peek() == "[":
                self._pos += 1
                while self._peek() not in ("]", None):
                    if self._peek() == ",":
                        self._pos += 1
                        continue
                    self._value(field, prefix, counters, self._tokens[self._pos])
                self._pos += 1
            else:
                self._value(field, prefix, counters, name)

    def _value(
        self, field: _descriptor.FieldDescriptor, prefix: FieldPath, counters: dict[str, int], anchor: _Token
    ) -> None:
        if field.is_repeated:
            index = counters.get(field.name, 0)
            counters[field.name] = index + 1
            path = prefix + (field.name, index)
        else:
            path = prefix + (field.name,)
        self.positions.setdefault(path, self._where(anchor))
        if field.type in (field.TYPE_MESSAGE, field.TYPE_GROUP):
            opening = self._next().text
            self._message(field.message_type, path, "}" if opening == "{" else ">")
            return
        self._next()
        # Adjacent string literals are concatenated by the text format.
        while field.type in (field.TYPE_STRING, field.TYPE_BYTES) and (self._peek() or "")[:1] in ("'", '"'):
            self._pos += 1


