"""Embeddings through `/v1/embeddings` at several concurrencies, against `SentenceTransformer.encode`.

The same texts go both ways: in one process to `encode` (its default batches of 32), and as
requests of `texts_per_request` texts each through API, broker and embedding worker. The baseline
is measured while no stack runs, before the sweep and after it, and the better of the two counts:
on a shared machine the load changes between them, and the server should not win by that.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from openai import AsyncOpenAI

from bench.stack import LocalStack
from worker.threads import prepare_openmp_environment

_WORDS = ("the quick brown fox jumps over a lazy dog while rain falls on old city streets and people "
          "hurry home to warm kitchens where soup simmers slowly beside open windows facing green hills").split()


def corpus(count: int, seed: int = 0) -> list[str]:
    """Distinct sentences of 6 to 40 words, the same every run."""
    rng = random.Random(seed)
    return [f"{n}: " + " ".join(rng.choice(_WORDS) for _ in range(rng.randint(6, 40))) + "." for n in range(count)]


@dataclass(frozen=True, slots=True)
class EmbeddingLevel:
    concurrency: int
    texts: int
    failures: int
    seconds: float

    @property
    def texts_per_second(self) -> float:
        return self.texts / self.seconds if self.seconds else 0.0


def encode_texts_per_second(model_dir: str, num_texts: int) -> float:
    """`SentenceTransformer.encode` on the corpus, in a process of its own that starts as a worker does
    (the same OpenMP settings: on a busy host libgomp's default spinning alone halves its speed)."""
    env = dict(os.environ)
    prepare_openmp_environment(env)
    output = subprocess.run([sys.executable, "-m", "bench.embeddings", model_dir, str(num_texts)], env=env,
                            capture_output=True, text=True, check=True)
    return float(output.stdout.strip().splitlines()[-1])


def _encode(model_dir: str, texts: list[str], repeats: int = 3) -> float:
    """The best texts/s of `repeats` runs of `encode` on all `texts` at once."""
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(model_dir, device="cpu")
    model.encode(texts[:64])  # warm-up
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        model.encode(texts)
        best = max(best, len(texts) / (time.perf_counter() - start))
    return best


async def run_level(client: AsyncOpenAI, model: str, texts: list[str], concurrency: int,
                    texts_per_request: int) -> EmbeddingLevel:
    """Every text once, in requests of `texts_per_request`, `concurrency` of them in flight at a time."""
    batches = [texts[i:i + texts_per_request] for i in range(0, len(texts), texts_per_request)]
    queue: asyncio.Queue[list[str]] = asyncio.Queue()
    for batch in batches:
        queue.put_nowait(batch)
    failures = 0

    async def user() -> None:
        nonlocal failures
        while not queue.empty():
            batch = queue.get_nowait()
            try:
                answer = await client.embeddings.create(model=model, input=batch)
                assert len(answer.data) == len(batch)
            except Exception:
                failures += 1

    start = time.perf_counter()
    await asyncio.gather(*(user() for _ in range(concurrency)))
    return EmbeddingLevel(concurrency, len(texts), failures, time.perf_counter() - start)


async def sweep(base_url: str, model: str, texts: list[str], levels: list[int],
                texts_per_request: int) -> list[EmbeddingLevel]:
    client = AsyncOpenAI(base_url=base_url, api_key="bench", max_retries=0, timeout=600)
    await run_level(client, model, texts[:64], 4, texts_per_request)  # warm-up
    results = []
    for concurrency in levels:
        level = await run_level(client, model, texts, concurrency, texts_per_request)
        print(f"  {concurrency:>3} requests: {level.texts_per_second:7.1f} texts/s, {level.failures} failed", flush=True)
        results.append(level)
    await client.close()
    return results


def table(levels: list[EmbeddingLevel], encode_tps: float, texts_per_request: int) -> str:
    rows = [f"embeddings, {texts_per_request} texts per request",
            "| concurrent requests | texts/s | share of encode |", "|---|---|---|"]
    for level in levels:
        share = level.texts_per_second / encode_tps if encode_tps else 0.0
        rows.append(f"| {level.concurrency} | {level.texts_per_second:.1f} | {share:.0%} |")
    rows.append(f"\nSentenceTransformer.encode, one process: {encode_tps:.1f} texts/s")
    return "\n".join(rows)


def run(api_url: str | None, model: str | None, levels: list[int], num_texts: int, texts_per_request: int,
        worker_args: list[str], output: Path) -> None:
    """The whole embedding bench: baseline, a stack (or the API at `api_url`), the sweep, the report."""
    from worker.embedding_source import resolve_embedding_model

    source = resolve_embedding_model(model)
    texts = corpus(num_texts)
    print(f"SentenceTransformer.encode on {source.location} ...", flush=True)
    encode_before = encode_texts_per_second(source.location, num_texts)
    if api_url:
        results = asyncio.run(sweep(api_url, source.default_name, texts, levels, texts_per_request))
    else:
        args = ["--task", "embed", *(["--model", model] if model else []), *worker_args]
        with LocalStack(args) as stack:
            print(f"embedding stack up at {stack.api_url}; sweeping {levels} requests", flush=True)
            results = asyncio.run(sweep(stack.api_url, source.default_name, texts, levels, texts_per_request))
    encode_after = encode_texts_per_second(source.location, num_texts)
    print(f"encode: {encode_before:.1f} texts/s before the sweep, {encode_after:.1f} after", flush=True)
    encode_tps = max(encode_before, encode_after)
    print()
    print(table(results, encode_tps, texts_per_request))
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps({
        "model": source.default_name, "texts": num_texts, "texts_per_request": texts_per_request,
        "encode_texts_per_second": encode_tps,
        "levels": [dict(asdict(level), texts_per_second=level.texts_per_second) for level in results],
    }, indent=2))
    print(f"wrote {output}")


if __name__ == "__main__":  # the baseline's own process: python -m bench.embeddings MODEL_DIR NUM_TEXTS
    print(_encode(sys.argv[1], corpus(int(sys.argv[2]))))
