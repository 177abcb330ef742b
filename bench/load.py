"""Drive the OpenAI endpoint with streaming chat requests at a fixed concurrency."""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from openai import AsyncOpenAI

TOPICS = ["a lighthouse", "a lost key", "the first snow", "a robot chef", "an old map", "a quiet library",
          "a river race", "a broken clock", "a desert garden", "a night train", "a paper boat", "a mountain fox"]


def prompt(index: int) -> str:
    """Distinct prompts, so no cache or batch could serve two requests as one."""
    return f"Request {index}: write a short story about {TOPICS[index % len(TOPICS)]}."


@dataclass(frozen=True, slots=True)
class RequestResult:
    ttft: float  # seconds from send to the first text
    duration: float  # seconds from send to the end
    completion_tokens: int
    error: str | None = None

    @property
    def decode_rate(self) -> float:
        """Tokens per second after the first one: the speed a reader sees."""
        decode_time = self.duration - self.ttft
        return (self.completion_tokens - 1) / decode_time if decode_time > 0 else 0.0


@dataclass(frozen=True, slots=True)
class LevelResult:
    concurrency: int
    requests: int
    failures: int
    wall_seconds: float
    completion_tokens: int
    tokens_per_second: float
    ttft_p50: float
    ttft_p95: float
    decode_rate_p50: float


async def one_request(client: AsyncOpenAI, model: str, index: int, max_tokens: int,
                      extra: dict[str, Any] | None = None) -> RequestResult:
    """One greedy streamed chat request; `extra` adds request fields (e.g. a response_format)."""
    start = time.perf_counter()
    ttft, tokens = None, 0
    try:
        stream = await client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": prompt(index)}], max_tokens=max_tokens,
            temperature=0, stream=True, stream_options={"include_usage": True}, **(extra or {}))
        async for chunk in stream:
            if ttft is None and chunk.choices and chunk.choices[0].delta.content:
                ttft = time.perf_counter() - start
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
    except Exception as exc:  # a failure is a number in the table, not the end of the run
        return RequestResult(0.0, time.perf_counter() - start, 0, f"{type(exc).__name__}: {exc}")
    duration = time.perf_counter() - start
    return RequestResult(ttft if ttft is not None else duration, duration, tokens)


async def run_level(client: AsyncOpenAI, model: str, concurrency: int, num_requests: int, max_tokens: int,
                    first_index: int, extra_for: Callable[[int], dict[str, Any] | None] | None = None) -> LevelResult:
    """`num_requests` requests, at most `concurrency` in flight at once; `extra_for(index)` adds fields to some."""
    gate = asyncio.Semaphore(concurrency)

    async def gated(index: int) -> RequestResult:
        async with gate:
            return await one_request(client, model, index, max_tokens, extra_for(index) if extra_for else None)

    start = time.perf_counter()
    results = await asyncio.gather(*(gated(first_index + i) for i in range(num_requests)))
    wall = time.perf_counter() - start
    good = [r for r in results if r.error is None]
    tokens = sum(r.completion_tokens for r in good)
    ttfts = sorted(r.ttft for r in good) or [0.0]
    return LevelResult(
        concurrency=concurrency, requests=num_requests, failures=num_requests - len(good), wall_seconds=wall,
        completion_tokens=tokens, tokens_per_second=tokens / wall,
        ttft_p50=statistics.median(ttfts), ttft_p95=ttfts[min(len(ttfts) - 1, round(0.95 * (len(ttfts) - 1)))],
        decode_rate_p50=statistics.median([r.decode_rate for r in good] or [0.0]),
    )


async def sweep(client: AsyncOpenAI, model: str, concurrency_levels: list[int], max_tokens: int,
                min_requests: int, requests_per_level: int) -> list[LevelResult]:
    """A warm-up request, then one level per concurrency, each of `requests_per_level` times its
    concurrency requests (at least `min_requests`), every request with its own prompt."""
    await run_level(client, model, 1, 1, 8, first_index=10_000)
    levels, first_index = [], 0
    for concurrency in concurrency_levels:
        count = max(min_requests, requests_per_level * concurrency)
        level = await run_level(client, model, concurrency, count, max_tokens, first_index)
        first_index += count
        print(f"  {concurrency:>3} streams: {level.tokens_per_second:7.1f} tok/s, TTFT p50 {level.ttft_p50:.2f}s, "
              f"{level.failures} failed", flush=True)
        levels.append(level)
    return levels
