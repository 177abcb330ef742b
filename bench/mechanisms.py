"""python -m bench.mechanisms: ways to batch on this machine, side by side, without the bus.

The same chat prompts, greedy, the same number of new tokens, through
- transformers' continuous batching manager (`generate_batch`, a paged cache),
- tokenbus's engine as the worker runs it (scheduler + runner: one padded dynamic cache),
- one static padded batch through `model.generate` (the ceiling for a batch that never changes).
"""

from __future__ import annotations

import time
import uuid

import torch
from pydantic import Field
from pydantic_settings import BaseSettings
from transformers import AutoModelForCausalLM, GenerationConfig

from bench.load import prompt
from broker.protocol import GenerationRequest
from broker.settings import cli_config, load_settings
from worker.__main__ import build_engine
from worker.config import WorkerSettings
from worker.engine import Engine
from worker.engine_api import DoneEvent
from worker.model_source import resolve


class MechanismSettings(BaseSettings):
    model_config = cli_config("mechanisms", "python -m bench.mechanisms")

    num_prompts: int = Field(16, ge=1, description="prompts run together")
    max_tokens: int = Field(64, ge=2, description="new tokens per prompt")
    device: str = Field("auto", description="as the worker's --device")
    dtype: str = Field("auto", description="as the worker's --dtype")


def engine_tokens_per_second(engine: Engine, prompts: list[str], max_tokens: int) -> float:
    start, tokens = time.perf_counter(), 0
    for text in prompts:
        request = GenerationRequest.from_fields({"model": "m", "messages": [{"role": "user", "content": text}],
                                                 "max_tokens": max_tokens, "temperature": 0})
        assert not engine.add(uuid.uuid4().bytes, request)
    while engine.has_work:
        tokens += sum(e.done.completion_tokens for e in engine.step() if isinstance(e, DoneEvent))
    return tokens / (time.perf_counter() - start)


def generate_batch_tokens_per_second(model, chats: list[list[int]], max_tokens: int) -> float:
    config = GenerationConfig(max_new_tokens=max_tokens, do_sample=False)
    model.generate_batch(chats[:2], generation_config=GenerationConfig(max_new_tokens=2, do_sample=False))  # warm-up
    start = time.perf_counter()
    outputs = model.generate_batch(chats, generation_config=config)
    tokens = sum(len(output.generated_tokens) for output in outputs.values())
    return tokens / (time.perf_counter() - start)


def static_batch_tokens_per_second(model, tokenizer, texts: list[str], max_tokens: int) -> float:
    tokenizer.padding_side = "left"
    inputs = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
    start = time.perf_counter()
    output = model.generate(**inputs, max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False)
    return (output.shape[1] - inputs.input_ids.shape[1]) * len(texts) / (time.perf_counter() - start)


def main() -> None:
    settings = load_settings(MechanismSettings)
    worker = WorkerSettings(device=settings.device, dtype=settings.dtype, max_batch=settings.num_prompts)
    engine, _ = build_engine(worker)
    tokenizer = engine.prompts.tokenizer
    # transformers' own generation runs on transformers' own model: the engine's has its projections joined
    engine_model = engine.runner.model
    source = resolve(worker.model, worker.cache_dir)
    model = AutoModelForCausalLM.from_pretrained(source.location, dtype=engine_model.dtype)
    model = model.to(engine_model.device).eval()
    prompts = [prompt(i) for i in range(settings.num_prompts)]
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
             for p in prompts]
    chats = [tokenizer(t, add_special_tokens=False).input_ids for t in texts]
    print(f"{settings.num_prompts} prompts, {settings.max_tokens} new tokens, greedy, "
          f"{model.device}, {model.dtype}", flush=True)
    with torch.inference_mode():
        engine_tokens_per_second(engine, prompts[:2], 4)  # warm-up
        results = {
            "tokenbus engine (padded dynamic cache, continuous)": engine_tokens_per_second(
                engine, prompts, settings.max_tokens),
            "transformers generate_batch (paged cache, continuous)": generate_batch_tokens_per_second(
                model, chats, settings.max_tokens),
            "model.generate, one static padded batch": static_batch_tokens_per_second(
                model, tokenizer, texts, settings.max_tokens),
        }
    for name, tokens_per_second in results.items():
        print(f"  {tokens_per_second:7.1f} tok/s  {name}")


if __name__ == "__main__":
    main()
