"""python -m bench: throughput and latency of the whole stack against plain `model.generate`.

Starts broker, worker and OpenAI API on free local ports (or uses a running API with --api-url),
sweeps the number of concurrent streams, then does the same with two workers of the model on this
host (as when two models share a machine), prints a table and writes JSON and a PNG chart. Then
embeddings: texts per second through `/v1/embeddings` against `SentenceTransformer.encode`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import platform
from pathlib import Path

from openai import AsyncOpenAI
from pydantic import Field
from pydantic_settings import BaseSettings

from bench import embeddings
from bench.baseline import generate_tokens_per_second
from bench import load
from bench.load import LevelResult
from bench.report import draw_chart, table, write_json
from bench.stack import LocalStack
from bench.structured import StructuredResult, grammar_ms_per_step, run_structured
from broker.settings import cli_config, load_settings
from worker.loader import pick_device, pick_dtype
from worker.model_source import resolve


class BenchSettings(BaseSettings):
    model_config = cli_config("bench", "python -m bench")

    api_url: str | None = Field(None, description="a running OpenAI endpoint (default: start a local stack)")
    model: str | None = Field(None, description="worker --model for the local stack (default: the default model)")
    served_name: str | None = Field(None, description="model name to request (default: from --model)")
    concurrency: list[int] = Field([1, 4, 16, 32], description="concurrent streams to sweep")
    two_worker_concurrency: list[int] = Field(
        [16, 32], description="concurrent streams for two workers on this host, local stack only; [] skips them")
    requests_per_level: int = Field(2, ge=1, description="requests per level, as a multiple of its concurrency")
    min_requests: int = Field(4, ge=1, description="at least this many requests per level")
    max_tokens: int = Field(64, ge=2, description="new tokens per request (greedy)")
    device: str = Field("auto", description="worker --device, and the device of the plain generate baseline")
    dtype: str = Field("auto", description="worker --dtype, and the dtype of the plain generate baseline")
    worker_args: list[str] = Field([], description="flags for the local worker (e.g. --load-8bit); without any, it "
                                                   "runs with its defaults, as `make serve` starts it")
    skip_generate: bool = Field(False, description="skip the plain generate baseline")
    structured_concurrency: int = Field(
        16, ge=0, description="streams for the run with half the requests bound to a JSON schema; 0 skips it")
    output_dir: Path = Field(Path("bench/results"), description="where bench.json and bench.png go")
    embed_concurrency: list[int] = Field([1, 8, 32], description="concurrent /v1/embeddings requests to sweep; [] skips")
    embed_model: str | None = Field(None, description="embedding worker --model (default: all-MiniLM-L6-v2)")
    embed_texts: int = Field(512, ge=1, description="texts embedded at each concurrency")
    embed_texts_per_request: int = Field(8, ge=1, le=2048, description="texts in one /v1/embeddings request")
    skip_chat: bool = Field(False, description="only the embeddings bench")


async def sweep(settings: BenchSettings, base_url: str, model: str, concurrency_levels: list[int]) -> list[LevelResult]:
    async with AsyncOpenAI(base_url=base_url, api_key="bench", max_retries=0, timeout=600) as client:
        return await load.sweep(client, model, concurrency_levels, settings.max_tokens, settings.min_requests,
                                settings.requests_per_level)


def structured_run(settings: BenchSettings, base_url: str, model: str, model_dir: Path) -> StructuredResult | None:
    concurrency = settings.structured_concurrency
    if not concurrency:
        return None

    async def run() -> StructuredResult:
        async with AsyncOpenAI(base_url=base_url, api_key="bench", max_retries=0, timeout=600) as client:
            count = max(settings.min_requests, settings.requests_per_level * concurrency)
            return await run_structured(client, model, concurrency, count, settings.max_tokens, 100_000)

    print(f"  {concurrency} streams, half of them bound to a JSON schema, against all free ...", flush=True)
    result = dataclasses.replace(asyncio.run(run()), grammar_ms_per_step=grammar_ms_per_step(model_dir, concurrency // 2))
    for line in result.lines():
        print("  " + line, flush=True)
    return result


def main() -> None:
    settings = load_settings(BenchSettings)
    logging.basicConfig(level="WARNING")
    if not settings.skip_chat:
        bench_chat(settings)
    if settings.embed_concurrency:
        print("\nembeddings", flush=True)
        embeddings.run(settings.api_url, settings.embed_model, settings.embed_concurrency, settings.embed_texts,
                       settings.embed_texts_per_request, ["--max-batch", "64", "--device", settings.device],
                       settings.output_dir / "embeddings.json")


def bench_chat(settings: BenchSettings) -> None:
    source = resolve(settings.model)
    model = settings.served_name or source.default_name
    generate_tps = 0.0
    if not settings.skip_generate:
        device = pick_device(settings.device)  # as the worker picks it
        dtype = pick_dtype(settings.dtype, device)
        print(f"plain generate on {source.location}, {device}, {dtype} ...", flush=True)
        generate_tps = generate_tokens_per_second(source.location, settings.max_tokens, device, dtype)
    two_workers: list[LevelResult] = []
    structured: StructuredResult | None = None
    worker_rss_mib = None
    if settings.api_url:
        levels = asyncio.run(sweep(settings, settings.api_url, model, settings.concurrency))
        structured = structured_run(settings, settings.api_url, model, source.location)
    else:
        worker_args = [*settings.worker_args]
        for flag, value in (("--device", settings.device), ("--dtype", settings.dtype), ("--model", settings.model)):
            if value not in (None, "auto"):
                worker_args += [flag, value]
        with LocalStack(worker_args) as stack:
            print(f"stack up at {stack.api_url}; sweeping {settings.concurrency} streams", flush=True)
            levels = asyncio.run(sweep(settings, stack.api_url, model, settings.concurrency))
            worker_rss_mib = stack.worker_memory_mib()[0]
            print(f"  worker resident memory: {worker_rss_mib:.0f} MiB", flush=True)
            structured = structured_run(settings, stack.api_url, model, source.location)
        if settings.two_worker_concurrency:
            with LocalStack(worker_args, num_workers=2) as stack:
                print(f"two workers up at {stack.api_url}; sweeping {settings.two_worker_concurrency} streams",
                      flush=True)
                two_workers = asyncio.run(sweep(settings, stack.api_url, model, settings.two_worker_concurrency))
    print()
    print(table(levels, generate_tps, two_workers))
    if worker_rss_mib is not None:
        print(f"\nworker resident memory after the sweep: {worker_rss_mib:.0f} MiB")
    settings.output_dir.mkdir(parents=True, exist_ok=True)
    if structured is not None:
        print("\n" + "\n".join(structured.lines()))
        structured.write_json(settings.output_dir / "structured.json")
    recorded = settings.model_dump(mode="json") | {"machine": platform.processor() or platform.machine()}
    write_json(settings.output_dir / "bench.json", levels, generate_tps, recorded, two_workers, worker_rss_mib)
    draw_chart(settings.output_dir / "bench.png", levels, generate_tps,
               f"{model}, {settings.max_tokens} new tokens, greedy", two_workers)
    print(f"\nwrote {settings.output_dir / 'bench.json'} and {settings.output_dir / 'bench.png'}")


if __name__ == "__main__":
    main()
