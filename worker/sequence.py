"""Per-request state inside the worker."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from broker.protocol import FinishReason, GenerationRequest
from worker.text import Detokenizer, StopMatcher

if TYPE_CHECKING:
    import torch

    from worker.grammar import RowGrammar
    from worker.prefix_cache import CachedPrefix
    from worker.tool_formats import AnswerReader


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
    prefix: CachedPrefix | None = None  # cached KV its prompt starts with, found while it waits
    num_cached_tokens: int = 0  # prompt tokens taken from `prefix` instead of prefilled
    grammar: RowGrammar | None = None  # where a constrained output stands; None: free
    answer: AnswerReader | None = None  # with tools: reads the output into reply text and calls
    end_ids: frozenset[int] = frozenset()  # tokens that end it: the model's end of turn (unless ignored), its stop ids
    generator: torch.Generator | None = None  # its own random draws, given when it joins the batch
    num_resumed: int = 0  # tokens generated before a fault, elsewhere: the tail of `prompt_ids`, prefilled with it

    @property
    def num_generated(self) -> int:
        """Tokens of the answer so far, those generated before a resume included."""
        return self.num_resumed + len(self.output_ids)

    @property
    def generated_ids(self) -> list[int]:
        return self.prompt_ids[len(self.prompt_ids) - self.num_resumed:] + self.output_ids

    @property
    def num_prompt_tokens(self) -> int:
        """The caller's prompt: without the resumed tokens, which are answer, not prompt."""
        return len(self.prompt_ids) - self.num_resumed

    @property
    def num_uncached_tokens(self) -> int:
        """Prompt tokens still to prefill."""
        return len(self.prompt_ids) - self.num_cached_tokens

    @property
    def num_reserved_tokens(self) -> int:
        """The most cache this sequence can ever hold."""
        return self.num_prompt_tokens + self.max_tokens

    @property
    def may_end(self) -> bool:
        """Past `min_tokens`: an end-of-turn token, a stop token or a stop string may end it now."""
        return self.num_generated >= self.request.min_tokens

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
