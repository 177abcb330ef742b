"""Which worker likely holds a request's prefix in its KV cache: the broker's side of prefix caching.

The broker sees every request, so it needs no report from workers beyond their prefix cache budget
(`Ready.prefix_cache_tokens`): it remembers, per worker, digests of the leading parts of the
requests it sent there. A request's parts are its chat messages, after the functions it offers when
it has some (for a raw prompt: pieces of `PROMPT_PIECE` characters); each digest covers all parts up to and including its own, so a
conversation's next turn, which resends the earlier messages, matches the worker that served the
last turn on every part the two share, and another conversation with the same system prompt matches
only on that. A memory of a worker goes with its registry record: a worker that announces again (it
restarted, with an empty cache) starts with none. Being wrong costs only speed, never an answer.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from dataclasses import dataclass

from broker.protocol import ChatMessage, GenerationRequest

PROMPT_PIECE = 256  # characters per part of a raw prompt
CHARS_PER_TOKEN = 4  # to size a worker's memory in characters from its budget in tokens


@dataclass(frozen=True, slots=True)
class Part:
    """A request's leading parts up to one of them: their digest, and their length in characters."""

    digest: bytes
    num_chars: int  # of this part alone


def request_parts(request: GenerationRequest) -> tuple[Part, ...]:
    """The chained digests of a request's leading parts, first part first."""
    if request.messages is not None:
        pieces = [_message_piece(m) for m in request.messages]
        if request.tools is not None:  # shown to the model whatever the choice; most templates show them first
            pieces.insert(0, json.dumps([f.to_fields() for f in request.tools.functions], sort_keys=True))
    else:
        prompt = request.prompt or ""
        pieces = [prompt[i:i + PROMPT_PIECE] for i in range(0, len(prompt), PROMPT_PIECE)]
    parts = []
    digest = b""
    for piece in pieces:
        digest = hashlib.blake2b(digest + piece.encode("utf-8", "surrogatepass"), digest_size=12).digest()
        parts.append(Part(digest, len(piece)))
    return tuple(parts)


def _message_piece(message: ChatMessage) -> str:
    """Everything of a message a template may show, joined (this runs in the broker's loop: no JSON)."""
    calls = (f"{call.id}\x01{call.name}\x01{call.arguments}" for call in message.tool_calls)
    return "\x00".join((message.role, message.name or "", message.tool_call_id or "", message.content, *calls))


class PrefixMemory:
    """The parts recently sent to one worker, at most about its prefix cache budget; the least
    recently sent forgotten first (as the worker evicts its least recently used blocks)."""

    def __init__(self, budget_tokens: int) -> None:
        self.max_chars = budget_tokens * CHARS_PER_TOKEN
        self._parts: OrderedDict[bytes, int] = OrderedDict()  # digest -> characters of that part
        self._num_chars = 0

    def remember(self, parts: tuple[Part, ...]) -> None:
        if self.max_chars <= 0:
            return
        for part in reversed(parts):  # the first part ends up the most recent, as in the worker's store
            if part.digest in self._parts:
                self._parts.move_to_end(part.digest)
            else:
                self._parts[part.digest] = part.num_chars
                self._num_chars += part.num_chars
        while self._num_chars > self.max_chars and self._parts:
            self._num_chars -= self._parts.popitem(last=False)[1]

    def matched_chars(self, parts: tuple[Part, ...]) -> int:
        """Characters of the longest run of leading parts remembered."""
        total = 0
        for part in parts:
            if part.digest not in self._parts:
                break
            total += part.num_chars
        return total
