"""Constrained decoding under load: streams where half the requests must follow a JSON schema,
against the same streams all free; and the time to first token of a schema the worker has not seen.

The schema's story must be longer than max_tokens can write, so a constrained answer runs to
max_tokens as a free one does: the two runs make the same number of tokens, and the ratio shows
what the masks cost.
"""

from __future__ import annotations

import json
import statistics
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from openai import AsyncOpenAI

from bench.load import LevelResult, one_request, run_level

STORY = {"type": "object", "properties": {"title": {"type": "string", "maxLength": 60},
                                          "story": {"type": "string", "minLength": 2000}},
         "required": ["title", "story"], "additionalProperties": False}
ROUNDS = 4  # free and mixed runs alternate, so a busy moment on the host does not fall on one kind only
IDLE_SAMPLES = 3


def with_schema(schema: dict[str, Any]) -> dict[str, Any]:
    return {"response_format": {"type": "json_schema", "json_schema": {"name": "story", "schema": schema}}}


def new_schema() -> dict[str, Any]:
    """A schema no worker has compiled yet: a property name never used before."""
    key = f"k{uuid.uuid4().hex[:12]}"
    return {**STORY, "properties": {**STORY["properties"], key: {"type": "integer", "minimum": 0, "maximum": 99}},
            "required": [*STORY["required"], key]}


@dataclass(frozen=True, slots=True)
class StructuredResult:
    concurrency: int
    free: list[LevelResult]
    mixed: list[LevelResult]
    ttft_free: float  # seconds, one request on an idle worker (median)
    ttft_cached_schema: float
    ttft_new_schema: float
    grammar_ms_per_step: float = 0.0  # the constrained rows' masks and grammar advances, per decode step

    @property
    def step_ms(self) -> float:
        """A decode step of all the streams, from the free runs' rate (a step makes one token a stream)."""
        rate = statistics.mean(level.tokens_per_second for level in self.free)
        return 1000 * self.concurrency / rate if rate else 0.0

    @property
    def ratio(self) -> float:
        """Aggregate tokens/s with half the requests constrained, as a share of all free: the median
        over rounds of each mixed run against the free run just before it (a pair shares the host's
        mood; a shared host's runs of one kind differ by a fifth)."""
        ratios = [mixed.tokens_per_second / free.tokens_per_second
                  for free, mixed in zip(self.free, self.mixed) if free.tokens_per_second]
        return statistics.median(ratios) if ratios else 0.0

    def lines(self) -> list[str]:
        def rates(levels: list[LevelResult]) -> str:
            return ", ".join(f"{level.tokens_per_second:.1f}" for level in levels)
        return [
            f"constrained decoding, {self.concurrency} streams: all free {rates(self.free)} tok/s; half with a JSON "
            f"schema {rates(self.mixed)} tok/s: {100 * self.ratio:.0f}% of free (median of the rounds)",
            f"TTFT on an idle worker: free {self.ttft_free:.3f}s, cached schema {self.ttft_cached_schema:.3f}s, "
            f"new schema {self.ttft_new_schema:.3f}s",
            f"grammar work of {self.concurrency // 2} constrained rows: {self.grammar_ms_per_step:.2f} ms a step, "
            f"against a {self.step_ms:.0f} ms step of {self.concurrency} streams "
            f"({100 * self.grammar_ms_per_step / self.step_ms if self.step_ms else 0:.1f}%)",
        ]

    def write_json(self, path: Path) -> None:
        path.write_text(json.dumps({**asdict(self), "ratio": self.ratio}, indent=2) + "\n")


async def run_structured(client: AsyncOpenAI, model: str, concurrency: int, num_requests: int, max_tokens: int,
                         first_index: int) -> StructuredResult:
    free, mixed = [], []
    cached = with_schema(STORY)
    for _ in range(ROUNDS):
        free.append(await run_level(client, model, concurrency, num_requests, max_tokens, first_index))
        first_index += num_requests
        mixed.append(await run_level(client, model, concurrency, num_requests, max_tokens, first_index,
                                     lambda index: cached if index % 2 else None))
        first_index += num_requests

    async def idle_ttft(extra: Any) -> float:
        times = []
        for _ in range(IDLE_SAMPLES):
            result = await one_request(client, model, first_index, 4, extra() if callable(extra) else extra)
            times.append(result.ttft)
        return statistics.median(times)

    return StructuredResult(concurrency, free, mixed, await idle_ttft(None), await idle_ttft(cached),
                            await idle_ttft(lambda: with_schema(new_schema())))


def grammar_ms_per_step(model_dir: Path, rows: int, steps: int = 64) -> float:
    """What constrained rows add to a decode step, measured alone (no model, so a busy host's
    noise in the model's steps does not hide it): masks for `rows` rows bound to the story schema,
    then each row's grammar advanced by a token its mask allows."""
    import time

    import torch
    from transformers import AutoTokenizer

    from broker.protocol import Constraint
    from worker.grammar import GrammarCompiler, mask_logits

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    compiler = GrammarCompiler(tokenizer, frozenset({tokenizer.eos_token_id}))
    grammars = [compiler.start(Constraint("json_schema", STORY)) for _ in range(rows)]
    generator = torch.Generator().manual_seed(0)
    spent = 0.0
    for _ in range(steps):
        scores = torch.randn(2 * rows, compiler.vocab_size, generator=generator)  # as many free rows beside them
        start = time.perf_counter()
        mask_logits(scores, list(range(rows)), grammars)
        for row, grammar in enumerate(grammars):
            grammar.advance(int(scores[row].argmax()))
        spent += time.perf_counter() - start
    return 1000 * spent / steps
