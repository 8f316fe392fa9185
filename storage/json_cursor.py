"""Walking a JSON text member by member, so that large parts can be stepped over.

``json.loads`` turns a whole document into Python objects at once; for a train request whose
workload dump is hundreds of megabytes that is several times the body's size in memory. A cursor
decodes only what its caller asks for: it yields an object's keys one at a time, decodes small
values whole and steps over large ones, decoding (and dropping) one piece of them at a time.
Syntax errors are ``json.JSONDecodeError`` with the position, as ``json.loads`` reports them.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any, NoReturn

_WHITESPACE = re.compile(r"[ \t\n\r]*")
_DECODER = json.JSONDecoder()


class JsonCursor:
    """A position in a JSON text; each method reads one piece and moves past it."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def peek(self) -> str:
        """The next character that is not white space ('' at the end), without taking it."""
        found = _WHITESPACE.match(self.text, self.pos)
        assert found is not None  # the pattern matches the empty string
        self.pos = found.end()
        return self.text[self.pos : self.pos + 1]

    def fail(self, message: str) -> NoReturn:
        raise json.JSONDecodeError(message, self.text, self.pos)

    def expect(self, char: str) -> None:
        if self.peek() != char:
            self.fail(f"Expecting {char!r}")
        self.pos += 1

    def value(self) -> Any:
        """Decode the next value whole."""
        self.peek()
        found, self.pos = _DECODER.raw_decode(self.text, self.pos)
        return found

    def skip(self, depth: int) -> None:
        """Step over the next value, decoding its parts ``depth`` levels down one at a time."""
        char = self.peek()
        if depth > 0 and char == "{":
            for _ in self.members():
                self.skip(depth - 1)
        elif depth > 0 and char == "[":
            for _ in self.items():
                self.skip(depth - 1)
        else:
            self.value()

    def members(self) -> Iterator[str]:
        """The keys of the object at the cursor; the caller reads or skips each key's value."""
        self.expect("{")
        if self.peek() == "}":
            self.pos += 1
            return
        while True:
            yield self._key()
            if self.peek() != ",":
                self.expect("}")
                return
            self.pos += 1

    def items(self) -> Iterator[None]:
        """One step per element of the array at the cursor; the caller reads or skips each."""
        self.expect("[")
        if self.peek() == "]":
            self.pos += 1
            return
        while True:
            yield None
            if self.peek() != ",":
                self.expect("]")
                return
            self.pos += 1

    def end(self) -> None:
        """Refuse anything but white space after the document."""
        if self.peek():
            self.fail("Extra data")

    def _key(self) -> str:
        if self.peek() != '"':
            self.fail("Expecting property name enclosed in double quotes")
        key: str = self.value()
        self.expect(":")
        return key
