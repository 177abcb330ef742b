"""python -m bench.conversations: multi-turn chats through the OpenAI endpoint, with and without the prefix cache.

Concurrent conversations share a long system prompt; each turn sends the whole history (the system
prompt, every earlier question and answer, and a new question). Two workers serve them. Per turn
it reports time to first token (p50, p95), prompt tokens computed against taken from the cache, and
which worker served it (the API's `system_fingerprint`); then checks the numbers against the goals:
TTFT at the last turn within 1.5x the first, at most 30% of prompt tokens computed, at least 80% of
later turns on the worker that served the turn before, and no worker with over 65% of requests.
"""

from __future__ import annotations

import asyncio
import json
import logging
import platform
import statistics
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

from openai import AsyncOpenAI
from pydantic import Field
from pydantic_settings import BaseSettings

from bench.stack import LocalStack
from broker.settings import cli_config, load_settings
from worker.model_source import resolve

RULES = ["answer in plain words", "name your sources when you have them", "prefer short sentences",
         "say so when you are unsure", "never invent numbers", "give one example when it helps",
         "keep lists to five items", "use the metric system", "explain any term a child would not know",
         "be kind to the person asking", "stay on the topic of the question", "end with the main point"]
QUESTIONS = ["What is a good first step?", "Why does that matter?", "Can you give an example?",
             "What could go wrong?", "How would you check it?", "What is the cost?", "Who should do it?",
             "What comes next?", "Could it be simpler?", "What do most people miss?"]


class ConversationSettings(BaseSettings):
    model_config = cli_config("bench.conversations", "python -m bench.conversations")

    model: str | None = Field(None, description="worker --model (default: the default model)")
    conversations: int = Field(8, ge=1, description="concurrent conversations")
    turns: int = Field(8, ge=2, description="turns per conversation")
    system_tokens: int = Field(1000, ge=16, description="about how long the shared system prompt is, in tokens")
    max_tokens: int = Field(32, ge=1, description="tokens per answer (greedy)")
    workers: int = Field(2, ge=1, description="workers on this host")
    threads: int = Field(1, ge=0, description="worker --threads (1: each of two workers on its own core)")
    dtype: str = Field("auto", description="worker --dtype")
    prefix_cache_tokens: int = Field(16384, ge=16, description="worker --prefix-cache-tokens in the cached run")
    modes: list[str] = Field(["cached", "uncached"], description="runs: with the prefix cache and/or without")
    worker_args: list[str] = Field([], description="more flags for each worker")
    output: Path = Field(Path("bench/results/conversations.json"), description="where the numbers go")


@dataclass(frozen=True, slots=True)
class Turn:
    conversation: int
    turn: int  # from 1
    ttft: float
    prompt_tokens: int
    cached_tokens: int
    worker: str
    error: str | None = None


def system_prompt(num_tokens: int) -> str:
    """About `num_tokens` tokens of rules (SmolLM2's tokenizer makes about three characters a token of them)."""
    lines, index = ["You are the assistant of a help desk. Follow these rules."], 0
    while sum(len(line) + 1 for line in lines) < num_tokens * 3:
        lines.append(f"Rule {index + 1}: {RULES[index % len(RULES)]}, as rule {index + 1} of the desk asks.")
        index += 1
    return "\n".join(lines)


async def ask(client: AsyncOpenAI, model: str, messages: list[dict], max_tokens: int) -> tuple[str, float, object, str]:
    """One streamed turn: the answer, time to first token, usage and the worker."""
    start = time.perf_counter()
    ttft, texts, usage, worker = None, [], None, ""
    stream = await client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens, temperature=0,
                                                  stream=True, stream_options={"include_usage": True})
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            ttft = ttft if ttft is not None else time.perf_counter() - start
            texts.append(chunk.choices[0].delta.content)
        if chunk.usage is not None:
            usage, worker = chunk.usage, chunk.system_fingerprint or ""
    return "".join(texts), ttft if ttft is not None else time.perf_counter() - start, usage, worker


async def conversation(client: AsyncOpenAI, model: str, number: int, system: str,
                       settings: ConversationSettings) -> list[Turn]:
    messages = [{"role": "system", "content": system}]
    turns = []
    for turn in range(1, settings.turns + 1):
        question = f"Customer {number}, question {turn}: {QUESTIONS[(number + turn) % len(QUESTIONS)]}"
        messages.append({"role": "user", "content": question})
        try:
            answer, ttft, usage, worker = await ask(client, model, messages, settings.max_tokens)
        except Exception as exc:  # a failure is a number in the table, not the end of the run
            turns.append(Turn(number, turn, 0.0, 0, 0, "", f"{type(exc).__name__}: {exc}"))
            answer = ""
        else:
            details = usage.prompt_tokens_details
            turns.append(Turn(number, turn, ttft, usage.prompt_tokens, details.cached_tokens if details else 0, worker))
        messages.append({"role": "assistant", "content": answer})
    return turns


async def run_workload(api_url: str, model: str, settings: ConversationSettings) -> list[Turn]:
    client = AsyncOpenAI(base_url=api_url, api_key="bench", max_retries=0, timeout=1200)
    # Warm every worker up (first passes are slow) on prompts that share nothing with the workload.
    await asyncio.gather(*(ask(client, model, [{"role": "user", "content": f"Warm-up {i}: say hi."}], 4)
                           for i in range(settings.workers)))
    system = system_prompt(settings.system_tokens)
    results = await asyncio.gather(*(conversation(client, model, number, system, settings)
                                     for number in range(settings.conversations)))
    await client.close()
    return [turn for turns in results for turn in turns]


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values) or [0.0]
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def summarize(turns: list[Turn], num_turns: int) -> dict:
    """Per turn and overall numbers, and the goals."""
    good = [t for t in turns if t.error is None]
    by_key = {(t.conversation, t.turn): t for t in good}
    rows = []
    for number in range(1, num_turns + 1):
        these = [t for t in good if t.turn == number]
        ttfts = [t.ttft for t in these]
        stayed = [t for t in these if (t.conversation, number - 1) in by_key]
        rows.append({
            "turn": number, "ttft_p50": statistics.median(ttfts) if ttfts else 0.0,
            "ttft_p95": percentile(ttfts, 0.95), "prompt_tokens": sum(t.prompt_tokens for t in these),
            "cached_tokens": sum(t.cached_tokens for t in these),
            "same_worker": sum(by_key[(t.conversation, number - 1)].worker == t.worker for t in stayed),
            "num_later": len(stayed), "workers": dict(Counter(t.worker for t in these)),
        })
    sent = sum(t.prompt_tokens for t in good)
    cached = sum(t.cached_tokens for t in good)
    later = sum(r["num_later"] for r in rows)
    shares = Counter(t.worker for t in good)
    return {
        "turns": rows, "failures": len(turns) - len(good), "prompt_tokens": sent, "cached_tokens": cached,
        "computed_share": (sent - cached) / sent if sent else 0.0,
        "ttft_growth": rows[-1]["ttft_p50"] / rows[0]["ttft_p50"] if rows[0]["ttft_p50"] else 0.0,
        "same_worker_share": sum(r["same_worker"] for r in rows) / later if later else 0.0,
        "busiest_worker_share": max(shares.values()) / len(good) if good else 0.0,
    }


def print_run(name: str, summary: dict) -> None:
    workers = sorted({w for row in summary["turns"] for w in row["workers"]})
    labels = {worker: chr(ord("A") + i) for i, worker in enumerate(workers)}
    print(f"\n{name}: {summary['failures']} failed")
    print("turn  TTFT p50  TTFT p95  prompt tokens  computed  cached  same worker  served by")
    for row in summary["turns"]:
        computed = row["prompt_tokens"] - row["cached_tokens"]
        served = " ".join(f"{labels[w]}:{n}" for w, n in sorted(row["workers"].items()))
        same = f"{row['same_worker']}/{row['num_later']}" if row["turn"] > 1 else "-"
        print(f"{row['turn']:>4}  {row['ttft_p50']:7.2f}s  {row['ttft_p95']:7.2f}s  {row['prompt_tokens']:>13}  "
              f"{computed:>8}  {row['cached_tokens']:>6}  {same:>11}  {served}")
    print(f"workers: {', '.join(f'{label} = {worker}' for worker, label in labels.items())}")


def print_goals(summary: dict) -> None:
    goals = [
        ("TTFT p50 at the last turn <= 1.5x the first", summary["ttft_growth"], summary["ttft_growth"] <= 1.5, "x"),
        ("prompt tokens computed <= 30% of those sent", summary["computed_share"],
         summary["computed_share"] <= 0.3, "%"),
        ("later turns on the worker of the turn before >= 80%", summary["same_worker_share"],
         summary["same_worker_share"] >= 0.8, "%"),
        ("no worker with over 65% of requests", summary["busiest_worker_share"],
         summary["busiest_worker_share"] <= 0.65, "%"),
    ]
    print("\ngoals (with the prefix cache):")
    for text, value, met, unit in goals:
        shown = f"{value:.2f}x" if unit == "x" else f"{100 * value:.0f}%"
        print(f"  {'met ' if met else 'MISS'}  {text}: {shown}")


def main() -> None:
    settings = load_settings(ConversationSettings)
    logging.basicConfig(level="WARNING")
    model = resolve(settings.model).default_name
    runs = {}
    for mode in settings.modes:
        cache = settings.prefix_cache_tokens if mode == "cached" else 0
        worker_args = ["--threads", str(settings.threads), "--dtype", settings.dtype,
                       "--prefix-cache-tokens", str(cache), *settings.worker_args]
        if settings.model:
            worker_args += ["--model", settings.model]
        with LocalStack(worker_args, num_workers=settings.workers) as stack:
            print(f"{mode}: {settings.conversations} conversations x {settings.turns} turns, {settings.workers} "
                  f"workers, system prompt of about {settings.system_tokens} tokens ...", flush=True)
            start = time.perf_counter()
            turns = asyncio.run(run_workload(stack.api_url, model, settings))
            runs[mode] = {"seconds": time.perf_counter() - start, **summarize(turns, settings.turns),
                          "raw": [asdict(t) for t in turns]}
        print_run(mode, runs[mode])
    if "cached" in runs:
        print_goals(runs["cached"])
    if {"cached", "uncached"} <= runs.keys():
        for name in ("cached", "uncached"):
            run = runs[name]
            print(f"{name:>9}: TTFT p50 turn 1 {run['turns'][0]['ttft_p50']:.2f}s, turn {settings.turns} "
                  f"{run['turns'][-1]['ttft_p50']:.2f}s; {100 * run['computed_share']:.0f}% of prompt tokens "
                  f"computed; {run['seconds']:.0f}s in all")
    settings.output.parent.mkdir(parents=True, exist_ok=True)
    recorded = settings.model_dump(mode="json") | {"machine": platform.processor() or platform.machine()}
    settings.output.write_text(json.dumps({"settings": recorded, "runs": runs}, indent=1))
    print(f"\nwrote {settings.output}")


if __name__ == "__main__":
    main()
