"""JSON read as a model writes it: strings decoded and values delimited while they are still
growing, each reader resuming where it stopped, so a long answer costs its length once, not once
per token."""

from __future__ import annotations

import json

NAME_START = '{"name": "'  # how every call's JSON starts, as the grammars write it


class StringReader:
    """A JSON string from just after its opening quote: its decoded text so far, and where it ends."""

    def __init__(self, start: int) -> None:
        self.decoded = ""
        self.end: int | None = None  # the index of its closing quote, once written
        self._position = start  # everything before is decoded

    def read(self, text: str) -> str:
        if self.end is not None:
            return self.decoded
        position = safe = self._position  # safe: where the text so far ends on a whole character
        while position < len(text):
            char = text[position]
            if char == '"':
                self.end = safe = position
                break
            if char == "\\":
                position += 6 if text.startswith("u", position + 1) else 2
                if position > len(text):
                    break  # an escape not yet whole
            else:
                position += 1
            safe = position
        piece = json.loads(f'"{text[self._position:safe]}"')
        if self.end is None and piece and "\ud800" <= piece[-1] <= "\udbff":
            piece, safe = piece[:-1], safe - 6  # half a surrogate pair (a \\uXXXX escape): wait for the other half
        self.decoded += piece
        self._position = safe
        return self.decoded


class ValueScanner:
    """Finds where a JSON value that starts at `start` ends."""

    def __init__(self, start: int) -> None:
        self.start = start
        self.end: int | None = None  # just past the value, once whole
        self._position = start
        self._depth, self._in_string, self._escaped = 0, False, False

    def scan(self, text: str) -> int | None:
        position = self._position
        while self.end is None and position < len(text):
            char = text[position]
            if self._in_string:
                if self._escaped:
                    self._escaped = False
                elif char == "\\":
                    self._escaped = True
                elif char == '"':
                    self._in_string = False
                    if self._depth == 0:
                        self.end = position + 1
            elif char == '"':
                self._in_string = True
            elif char in "{[":
                self._depth += 1
            elif char in "}],":
                if self._depth == 0:
                    self.end = position  # a bare number or literal, ended by what follows it
                elif char != ",":
                    self._depth -= 1
                    if self._depth == 0:
                        self.end = position + 1
            position += 1
        self._position = position
        return self.end


class CallsReader:
    """Calls written from `start` on, each `{"name": "...", "<arguments_key>": ...}` and the next
    after `between`; `read` gives each call opened so far as (name, arguments so far). A call is
    listed once its name is whole."""

    def __init__(self, start: int, arguments_key: str, between: str) -> None:
        self._arguments_start = f', "{arguments_key}": '
        self._between = between
        self._calls: list[tuple[str, ValueScanner]] = []
        self._next = start  # where the next call starts
        self._name: StringReader | None = None  # the name being read
        self._closed = True  # the last call's arguments and the separator after them are read

    def read(self, text: str) -> list[tuple[str, str]]:
        while self._advance(text):
            pass
        return [(name, text[value.start:value.end if value.end is not None else len(text)])
                for name, value in self._calls]

    def _advance(self, text: str) -> bool:
        """One more part read (a name, or a call's end); False when the text so far holds no more."""
        if not self._closed:
            end = self._calls[-1][1].scan(text)
            if end is None or not text.startswith(self._between, end):
                return False
            self._next, self._closed = end + len(self._between), True
            return True
        if self._name is None:
            if not text.startswith(NAME_START, self._next):
                return False
            self._name = StringReader(self._next + len(NAME_START))
        self._name.read(text)
        name_end = self._name.end
        if name_end is None or not text.startswith(self._arguments_start, name_end + 1):
            return False
        self._calls.append((self._name.decoded, ValueScanner(name_end + 1 + len(self._arguments_start))))
        self._name, self._closed = None, False
        return True
