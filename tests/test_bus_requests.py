"""The bus end to end, what one request gets: real broker and worker processes, the tiny model."""

from __future__ import annotations

import asyncio

import pytest

from broker import protocol
from frontends.client import (
    BadRequest,
    BusClient,
    ContextLengthExceeded,
    UnknownModel,
)
from tests.helpers import (
    HELLO,
    TINY_MODEL,
    num_workers,
    wait_for_models,
    wait_until,
)


async def test_two_workers_share_concurrent_streams(stack):
    stack.broker()
    stack.worker("--max-batch", "2")
    stack.worker("--max-batch", "2")
    await wait_for_models(stack.address, {TINY_MODEL})
    async with BusClient(stack.address) as client:
        await wait_until(lambda: num_workers(client, 2))
        streams = [await client.chat(TINY_MODEL, HELLO, max_tokens=12, temperature=0) for _ in range(4)]
        results = await asyncio.gather(*(s.collect() for s in streams))
        assert all(r.finish_reason == "length" and r.completion_tokens == 12 for r in results)
        assert len({r.text for r in results}) == 1  # greedy: the same prompt gives the same text anywhere
        assert [w.served for w in await client.workers()] == [2, 2]
        [model] = await client.models()
        assert (model.name, model.workers, model.capacity) == (TINY_MODEL, 2, 4)

async def test_workers_announce_their_capacity_and_cache_budget(bus):
    async with BusClient(bus.address) as client:
        [worker] = [w for w in await client.workers() if bus.model in w.models]
        [model] = [m for m in await client.models() if m.name == bus.model]
    assert (worker.capacity, model.context_length) == (4, 512)
    assert worker.cache_tokens == 4 * 512  # by default, every row may fill the context

async def test_unknown_model_names_the_models_served(bus):
    async with BusClient(bus.address) as client:
        stream = await client.chat("no-such-model", HELLO)
        with pytest.raises(UnknownModel, match=f"models served: {bus.model}"):
            await stream.collect()

async def test_prompt_over_the_context_is_rejected_before_work(bus):
    async with BusClient(bus.address) as client:
        stream = await client.chat(bus.model, [{"role": "user", "content": "word " * 600}])
        with pytest.raises(ContextLengthExceeded, match="context of 512 tokens"):
            await stream.collect()
        stream = await client.chat(bus.model, HELLO, max_tokens=500)
        with pytest.raises(ContextLengthExceeded):
            await stream.collect()

async def test_seed_fixes_sampled_output(bus):
    async with BusClient(bus.address) as client:
        async def sample(seed):
            stream = await client.complete(bus.model, "Once upon a time", max_tokens=16, temperature=1.0, seed=seed)
            return (await stream.collect()).text

        first, again, other = await asyncio.gather(sample(7), sample(7), sample(8))
        assert first == again
        assert first != other

async def test_stop_string_ends_the_answer_without_leaking(bus):
    async with BusClient(bus.address) as client:
        full = await (await client.complete(bus.model, "The list:", max_tokens=24, temperature=0)).collect()
        stop = full.text[len(full.text) // 2:][:3]
        assert stop.strip(), "the greedy text has a middle to stop at"
        cut = await (await client.complete(bus.model, "The list:", max_tokens=24, temperature=0, stop=[stop])).collect()
        assert cut.finish_reason == "stop"
        assert cut.text == full.text[:full.text.index(stop)]

async def test_logprobs_come_with_each_token(bus):
    async with BusClient(bus.address) as client:
        stream = await client.complete(bus.model, "Hi", max_tokens=5, temperature=0, logprobs=True, top_logprobs=3)
        result = await stream.collect()
        assert len(result.logprobs) == 5
        for entry in result.logprobs:
            assert entry.logprob <= 0 and len(entry.top) == 3
            assert entry.top[0].logprob >= entry.top[1].logprob >= entry.top[2].logprob
            assert entry.logprob == pytest.approx(entry.top[0].logprob)  # greedy takes the most likely token

async def test_a_message_too_large_for_the_bus_is_refused_without_hurting_other_streams(bus):
    async with BusClient(bus.address) as client:
        running = await client.chat(bus.model, HELLO, max_tokens=40)
        await anext(running)
        huge = [{"role": "user", "content": "x" * 3 * protocol.MAX_MESSAGE_SIZE}]  # over the sockets' limit too
        with pytest.raises(BadRequest, match="too large"):
            await client.chat(bus.model, huge)
        assert (await asyncio.wait_for(running.collect(), 30)).finish_reason.value == "length"
