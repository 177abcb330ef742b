"""Text assembly for a stream of tokens: UTF-8 safe deltas and stop strings that never leak."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

_CONTEXT_TOKENS = 4  # prompt tokens decoded along, so a first token's leading space survives


class Decoder(Protocol):
    def decode(self, ids: Sequence[int], skip_special_tokens: bool = ...) -> str: ...


class Detokenizer:
    """Turns a growing list of token ids into text deltas that never end inside a character.

    Byte-level tokenizers can emit half of a multi-byte character; decoding then ends in U+FFFD
    and the delta is held back until the next token completes it.
    """

    def __init__(self, decoder: Decoder, prompt_ids: Sequence[int], skip_special_tokens: bool = True,
                 spaces_between_special_tokens: bool = True) -> None:
        self._decoder = decoder
        self._options = {"skip_special_tokens": skip_special_tokens}
        if not skip_special_tokens:  # only then does it matter; tokenizers that do not know it ignore it
            self._options["spaces_between_special_tokens"] = spaces_between_special_tokens
        self._ids = list(prompt_ids[-_CONTEXT_TOKENS:])
        self._prefix_offset = 0
        self._read_offset = len(self._ids)

    def push(self, token_id: int) -> str:
        self._ids.append(token_id)
        prefix = self._decode(self._ids[self._prefix_offset:self._read_offset])
        text = self._decode(self._ids[self._prefix_offset:])
        if len(text) <= len(prefix) or text.endswith("\ufffd"):
            return ""
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        return text[len(prefix):]

    def flush(self) -> str:
        """At the end of a stream: whatever is held back (an unfinished character becomes U+FFFD)."""
        prefix = self._decode(self._ids[self._prefix_offset:self._read_offset])
        text = self._decode(self._ids[self._prefix_offset:])
        self._prefix_offset = self._read_offset = len(self._ids)
        return text[len(prefix):]

    def _decode(self, ids: list[int]) -> str:
        return self._decoder.decode(ids, **self._options)


class StopMatcher:
    """Finds caller stop strings in streamed text, holding back any tail that may begin one."""

    def __init__(self, stops: Sequence[str], include_stop: bool = False) -> None:
        self._stops = tuple(stops)
        self._include_stop = include_stop  # the stop string ends the text instead of being dropped
        self._pending = ""
        self.matched: str | None = None  # the stop string that was reached, once one is

    def push(self, text: str, active: bool = True) -> tuple[str, bool]:
        """Text safe to emit now, and whether a stop string was reached (the rest is dropped).
        Not `active` (before a request's `min_tokens`): no stop string counts, nothing is held."""
        if not self._stops:
            return text, False
        pending = self._pending + text
        if not active:
            self._pending = ""
            return pending, False
        hits = [(i, i + len(stop), stop) for stop in self._stops if (i := pending.find(stop)) >= 0]
        if hits:
            self._pending = ""
            start, end, self.matched = min(hits)  # the earliest; at a tie, the shortest
            return pending[:end if self._include_stop else start], True
        hold = self._longest_stop_prefix_suffix(pending)
        self._pending = pending[len(pending) - hold:]
        return pending[:len(pending) - hold], False

    def flush(self) -> str:
        """At the end of a stream that stopped for another reason, the held-back tail is plain text."""
        text, self._pending = self._pending, ""
        return text

    def _longest_stop_prefix_suffix(self, text: str) -> int:
        longest = 0
        for stop in self._stops:
            for size in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:size]):
                    longest = size
                    break
        return longest
