"""Per-request state inside the worker."""

from __future__ import annotations

from dataclasses import dataclass, field

from broker.protocol import FinishReason, GenerationRequest
from worker.grammar import RowGrammar
from worker.text import Detokenizer, StopMatcher


@dataclass(slots=True, eq=False)
class Sequence:
    """One request: its prompt, its sampling parameters and what it has generated so far."""

    request_id: bytes
    request: GenerationRequest
    prompt_ids: list[int]
    max_tokens: int
    detokenizer: Detokenizer
    stop_matcher: StopMatcher
    output_ids: list[int] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    unsent_tokens: int = 0  # generated since the last TOKEN frame (held back: part of a character or a stop string)
    grammar: RowGrammar | None = None  # where a constrained output stands; None: free

    @property
    def num_reserved_tokens(self) -> int:
        """The most cache this sequence can ever hold."""
        return len(self.prompt_ids) + self.max_tokens

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
