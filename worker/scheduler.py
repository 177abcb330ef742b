"""The batching policy: which sequences run in the next step. Pure Python, no torch.

The scheduler alone owns the running sequences: `running` is the batch, in the order of the
runner's cache rows. Each step's `Plan` tells the engine which waiting prompts to prefill (or which
chunk of a long one); the engine `join`s them once their prompts ran, and then decodes the batch.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from worker.sequence import Sequence


@dataclass(frozen=True, slots=True)
class SchedulerLimits:
    max_batch: int  # sequences decoded together
    max_batch_tokens: int  # cache tokens: rows x the longest reservation (prompt + max_tokens)
    max_prefill_tokens: int  # prompt tokens prefilled in one step (longer prompts go in chunks), so decoding never stalls long

    def __post_init__(self) -> None:
        if min(self.max_batch, self.max_batch_tokens, self.max_prefill_tokens) < 1:
            raise ValueError("scheduler limits must be positive")


@dataclass(frozen=True, slots=True)
class Chunk:
    """Part of a prompt too long to prefill in one step: tokens [start, end)."""

    sequence: Sequence
    start: int
    end: int

    @property
    def last(self) -> bool:
        return self.end == len(self.sequence.prompt_ids)


@dataclass(frozen=True, slots=True)
class Plan:
    """The prompts of one step, before the batch decodes: new prompts to prefill (they join the
    batch) or one chunk of a long prompt (it joins with its last chunk)."""

    prefill: list[Sequence] = field(default_factory=list)
    chunk: Chunk | None = None

    @property
    def joining(self) -> list[Sequence]:
        """The sequences whose prompts run this step: admitted, no longer waiting, not yet running."""
        return [self.chunk.sequence] if self.chunk is not None else self.prefill

    @property
    def ready(self) -> list[Sequence]:
        """Those that join the batch once their prompts ran (a long prompt: with its last chunk)."""
        return self.prefill if self.chunk is None else [self.chunk.sequence] if self.chunk.last else []


class Scheduler:
    """First come, first served admission under batch and cache limits; no preemption needed,
    since a sequence is admitted only when its whole reservation fits."""

    def __init__(self, limits: SchedulerLimits) -> None:
        self.limits = limits
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # the batch, in cache row order
        self.chunking: Sequence | None = None  # admitted, its long prompt being prefilled chunk by chunk
        self._num_chunked = 0  # prompt tokens of `chunking` already prefilled

    def add(self, sequence: Sequence) -> None:
        self.waiting.append(sequence)

    def join(self, sequences: list[Sequence]) -> None:
        """Sequences whose prompts ran join the batch, below the rows already there."""
        self.running.extend(sequences)

    def remove(self, sequence: Sequence) -> None:
        """Take a sequence out, waiting or running (finished or cancelled)."""
        if sequence in self.running:
            self.running.remove(sequence)
        elif sequence is self.chunking:
            self.chunking = None
        elif sequence in self.waiting:
            self.waiting.remove(sequence)

    def find(self, request_id: bytes) -> Sequence | None:
        for sequence in self.sequences:
            if sequence.request_id == request_id:
                return sequence
        return None

    @property
    def sequences(self) -> list[Sequence]:
        """Every sequence held: running, being chunked, waiting."""
        return [*self.running, *([self.chunking] if self.chunking else []), *self.waiting]

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.chunking)

    def schedule(self) -> Plan:
        # Phase 1: prefill. A long prompt goes on chunk by chunk, and nothing else joins meanwhile.
        if self.chunking is not None:
            return Plan(chunk=self._next_chunk())
        # Otherwise admit waiting sequences while they fit. The cache is one padded block, so what
        # a batch can come to hold is its number of rows times its longest reservation.
        longest = max((s.num_reserved_tokens for s in self.running), default=0)
        prefill: list[Sequence] = []
        chunk = None
        while self.waiting and len(self.running) + len(prefill) < self.limits.max_batch:
            candidate = self.waiting[0]
            # Only what a cached prefix leaves is prefilled (see `Sequence.num_uncached_tokens`).
            padded = (len(prefill) + 1) * max(s.num_uncached_tokens for s in (*prefill, candidate))
            if prefill and padded > self.limits.max_prefill_tokens:
                break
            rows = len(self.running) + len(prefill) + 1
            longest_then = max(longest, candidate.num_reserved_tokens)
            if rows * longest_then > self.limits.max_batch_tokens and (self.running or prefill):
                break
            longest = longest_then
            if candidate.num_uncached_tokens > self.limits.max_prefill_tokens:  # alone, and in chunks
                self.chunking = self.waiting.popleft()
                self._num_chunked = candidate.num_cached_tokens
                chunk = self._next_chunk()
                break
            prefill.append(self.waiting.popleft())
        return Plan(prefill, chunk)

    def _next_chunk(self) -> Chunk:
        sequence = self.chunking
        assert sequence is not None
        start = self._num_chunked
        end = min(start + self.limits.max_prefill_tokens, len(sequence.prompt_ids))
        self._num_chunked = end
        chunk = Chunk(sequence, start, end)
        if chunk.last:  # its first token comes from this chunk: it joins the batch with it
            self.chunking = None
        return chunk
