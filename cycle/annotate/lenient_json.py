"""A forgiving JSON reader for model output: reads what a careless writer meant, noting each liberty.

Handles unterminated output (an unfinished string or pair is dropped, open lists and objects are
closed), trailing and missing commas, single-quoted and unquoted strings, stray quotes inside a string
(a quote not followed by a delimiter is text: "the cat's toy"). Used by `parse.parse_output` when
strict JSON fails.
"""

from __future__ import annotations

import json
from typing import Any


class Eof(Exception):
    """The text ended inside a value."""


class LenientReader:
    """A forgiving JSON reader: reads what a careless writer meant, noting each liberty it takes."""

    _DELIMS = ",:]}"

    def __init__(self, text: str, start: int):
        self.s, self.i, self.n = text, start, len(text)
        self.repairs: list[str] = []

    def note(self, what: str) -> None:
        if what not in self.repairs:
            self.repairs.append(what)

    def _ws(self) -> None:
        while self.i < self.n and self.s[self.i].isspace():
            self.i += 1

    def _peek(self) -> str:
        self._ws()
        if self.i >= self.n:
            raise Eof
        return self.s[self.i]

    def value(self) -> Any:
        c = self._peek()
        if c == "{":
            return self.obj()
        if c == "[":
            return self.arr()
        if c in "\"'":
            return self.string()
        return self.bare()

    def obj(self) -> dict:
        self.i += 1
        out: dict = {}
        while True:
            try:
                c = self._peek()
            except Eof:
                self.note("unterminated output closed")
                return out
            if c == "}":
                self.i += 1
                return out
            if c == ",":
                self.i += 1
                try:
                    if self._peek() == "}":
                        self.note("trailing comma")
                except Eof:
                    pass
                continue
            try:
                key = self.string() if c in "\"'" else self.bare(stop=":,}")
                if self._peek() != ":":
                    self.note("missing colon")
                else:
                    self.i += 1
                val = self.value()
            except Eof:
                self.note("unterminated output closed")
                return out  # the unfinished pair is dropped
            out[str(key)] = val

    def arr(self) -> list:
        self.i += 1
        out: list = []
        expect_comma = False
        while True:
            try:
                c = self._peek()
            except Eof:
                self.note("unterminated output closed")
                return out
            if c == "]":
                self.i += 1
                return out
            if c == "}":  # a list closed with the wrong bracket: let the object take it
                self.note("mismatched bracket")
                return out
            if c == ",":
                self.i += 1
                expect_comma = False
                try:
                    if self._peek() == "]":
                        self.note("trailing comma")
                except Eof:
                    pass
                continue
            if expect_comma:
                self.note("missing comma")
            try:
                out.append(self.value())
            except Eof:
                self.note("unterminated output closed")
                return out  # the unfinished item is dropped
            expect_comma = True

    def string(self) -> str:
        quote = self.s[self.i]
        if quote == "'":
            self.note("single quotes")
        self.i += 1
        buf = []
        while self.i < self.n:
            c = self.s[self.i]
            if c == "\\" and self.i + 1 < self.n:
                nxt = self.s[self.i + 1]
                if nxt == "u" and self.i + 6 <= self.n:
                    try:
                        buf.append(chr(int(self.s[self.i + 2 : self.i + 6], 16)))
                        self.i += 6
                        continue
                    except ValueError:
                        pass
                buf.append({"n": "\n", "t": "\t", "r": "\r", "b": "\b", "f": "\f"}.get(nxt, nxt))
                self.i += 2
                continue
            if c == quote:
                # A quote that is not followed by a delimiter is part of the text ("the cat's toy").
                j = self.i + 1
                while j < self.n and self.s[j] in " \t\r\n":
                    j += 1
                # A quote after a space that opens the next string means a missing comma.
                if j >= self.n or self.s[j] in self._DELIMS or (self.s[j] == quote and j > self.i + 1):
                    self.i += 1
                    return "".join(buf)
                self.note("stray quote in string")
            buf.append(c)
            self.i += 1
        raise Eof

    def bare(self, stop: str = ",]}") -> Any:
        start = self.i
        while self.i < self.n and self.s[self.i] not in stop and self.s[self.i] not in "\n":
            self.i += 1
        word = self.s[start : self.i].strip()
        if self.i >= self.n:
            raise Eof
        if not word:
            self.note("empty value")
            return None
        literal = {"true": True, "false": False, "null": None}
        if word in literal:
            return literal[word]
        try:
            return json.loads(word)
        except ValueError:
            self.note("unquoted text")
            return word
