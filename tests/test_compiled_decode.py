"""Decode steps compiled with torch.compile: the eager steps' numbers, every graph compiled before the
worker serves (none again as the batch grows, shrinks and gets longer), and eager steps where the
compiler fails."""

from __future__ import annotations

import asyncio

import pytest
import torch

from broker import protocol
from broker.protocol import GenerationRequest
from broker.settings import load_settings
from frontends.client import BusClient
from tests.helpers import HELLO, TINY_MODEL, wait_for_models
from tests.processes import free_address, output_of, spawn, start_broker, stop
from worker.__main__ import build_engine
from worker.config import WorkerSettings
from worker.engine_api import TokenEvent
from worker.runner import new_cache

# Rows leave at different steps (the batch shrinks and its padding is cut), one joins late, and one
# answer goes on alone long enough to fill the cache's buffer (64 columns of room) and outgrow it.
WORKLOAD = [("Hi", 3), ("Tell me about the sea and its shores.", 100), ("Name three colours.", 20),
            ("Count to ten, slowly, one number at a time.", 9)]


def engines(tiny_model_dir, *args: str):
    """The tiny model twice: decode steps eager, then compiled."""
    common = ["--model", str(tiny_model_dir), "--device", "cpu", "--max-batch", "4", *args]
    eager, _ = build_engine(load_settings(WorkerSettings, [*common, "--no-compile-decode"]))
    compiled, _ = build_engine(load_settings(WorkerSettings, [*common, "--compile-decode"]))
    assert eager.runner._compiled is None and compiled.runner._compiled is not None
    return eager, compiled


def serve(engine) -> dict[bytes, tuple[str, list[float]]]:
    """Each request's text and its tokens' logprobs (seeded draws, so that the rows differ)."""
    ids = [bytes([65 + index]) * 16 for index in range(len(WORKLOAD))]

    def add(index: int) -> None:
        text, max_tokens = WORKLOAD[index]
        request = GenerationRequest(model="m", messages=(protocol.ChatMessage("user", text),), max_tokens=max_tokens,
                                    seed=index, temperature=1.0, logprobs=True)
        assert engine.add(ids[index], request) == []

    for index in range(len(WORKLOAD) - 1):
        add(index)
    texts, logprobs, done, steps = dict.fromkeys(ids, ""), {rid: [] for rid in ids}, {}, 0
    while engine.has_work:
        if steps == 4:
            add(len(WORKLOAD) - 1)  # joins a running batch
        for event in engine.step():
            if isinstance(event, TokenEvent):
                texts[event.request_id] += event.delta.text
                logprobs[event.request_id] += [entry.logprob for entry in event.delta.logprobs or ()]
            else:
                done[event.request_id] = event.done.completion_tokens
        steps += 1
    assert done == {rid: max_tokens for rid, (_, max_tokens) in zip(ids, WORKLOAD)}  # all, in full
    return {rid: (texts[rid], logprobs[rid]) for rid in ids}


def test_compiled_steps_give_the_eager_steps_numbers_in_float32(tiny_model_dir):
    eager, compiled = engines(tiny_model_dir, "--dtype", "float32")
    expected, got = serve(eager), serve(compiled)
    for rid, (text, logprobs) in expected.items():
        assert got[rid][0] == text
        # the fused loops add up in another order than the eager operations
        assert got[rid][1] == pytest.approx(logprobs, abs=1e-4)


@pytest.fixture(scope="module")
def bfloat16_engine(tiny_model_dir):
    """Compiled, in bfloat16 with 4-bit copies for steps of up to 2 rows: three graphs (1 row, 2, more).
    (torch compiles at most 8 graphs of one function in a process: the tests share these.)"""
    return engines(tiny_model_dir, "--dtype", "bfloat16", "--int4-rows", "2")[1]


def test_every_graph_is_compiled_before_serving_and_none_after(bfloat16_engine):
    """Steps of 1 to 4 rows, rows leaving and joining and a cache outgrowing its buffer compile nothing."""
    with torch.compiler.set_stance("fail_on_recompile"):
        serve(bfloat16_engine)


@torch.inference_mode()
def test_a_compiled_step_in_bfloat16_stays_close_to_the_eager_one(bfloat16_engine):
    """One decode step over the same cache both ways, at 1, 2 and 3 rows (4-bit and float products)."""
    forward, compiled = bfloat16_engine.runner._llama, bfloat16_engine.runner._compiled
    torch.manual_seed(0)
    for rows in (1, 2, 3):
        prompt = torch.randint(10, 1000, (rows, 9))
        mask = torch.ones(rows, 9, dtype=torch.long)
        mask[0, :4] = 0  # a left-padded row
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        caches = [new_cache(), new_cache()]
        for cache in caches:
            forward.last_hidden(prompt, mask, positions, cache)
        step_mask = torch.cat([mask, mask.new_ones(rows, 1)], dim=1)
        step_ids = torch.tensor(prompt[:, -1].tolist())[:, None]  # a tensor of its own, as the runner's
        step_positions = positions[:, -1:] + 1
        want = forward.last_hidden(step_ids, step_mask, step_positions, caches[0])
        with torch.compiler.set_stance("fail_on_recompile"):
            got = compiled(step_ids, step_mask, step_positions, caches[1])
        scale = want.abs().max()
        assert (got - want).abs().max() <= 0.02 * scale, rows  # bfloat16 rounds between eager operations
        assert all(layer.keys.shape == (rows, forward.num_kv_heads, 10, forward.head_dim) for layer in caches[1].layers)


def test_a_worker_whose_compiler_fails_serves_with_eager_steps(tiny_model_dir, tmp_path):
    address = free_address()
    broker = start_broker(address)
    # No compiler, and no compiled code from earlier runs to fall back on.
    worker = spawn("worker", "--broker", address, "--model", str(tiny_model_dir), "--model-names", TINY_MODEL,
                   "--compile-decode", env={"CXX": "/bin/false", "TORCHINDUCTOR_CACHE_DIR": str(tmp_path)})
    try:
        asyncio.run(wait_for_models(address, {TINY_MODEL}))
        assert "decode steps stay eager: compiling them failed" in output_of(worker)

        async def ask():
            async with BusClient(address) as client:
                return await (await client.chat(TINY_MODEL, HELLO, max_tokens=5, temperature=0)).collect()

        result = asyncio.run(ask())
        assert (result.finish_reason, result.completion_tokens) == ("length", 5)
    finally:
        stop(worker)
        stop(broker)
