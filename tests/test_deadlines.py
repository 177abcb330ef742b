"""Deadlines and priorities over the real bus: a request's `timeout` ends it in the queue with an
error and on its worker with the answer so far; priorities order a full model's queue.

A frozen worker (SIGSTOP) holds its requests still for as long as a test needs, however fast the
model; heartbeats are slow enough that the broker does not take it for dead meanwhile.
"""

from __future__ import annotations

import asyncio
import signal
from contextlib import contextmanager

import pytest

from broker.protocol import FinishReason
from frontends.client import BusClient, DeadlineExceeded
from tests.helpers import HELLO, TINY_MODEL, num_queued_is, wait_for_models, wait_until
from tests.test_openai_api import Api, post

LONG = {"max_tokens": 480, "temperature": 0}
SLOW_HEARTBEATS = ("--heartbeat-interval", "5")  # 15 s of silence before a frozen worker is dropped


@contextmanager
def frozen(process):
    process.send_signal(signal.SIGSTOP)
    try:
        yield
    finally:
        process.send_signal(signal.SIGCONT)


async def test_a_timeout_ends_a_running_request_with_its_answer_so_far_and_a_queued_one_with_an_error(stack):
    stack.broker(*SLOW_HEARTBEATS)
    worker = stack.worker("--max-batch", "1", *SLOW_HEARTBEATS)
    await wait_for_models(stack.address, {TINY_MODEL})
    async with BusClient(stack.address) as client:
        running = await client.chat(TINY_MODEL, HELLO, **LONG, timeout=0.5)
        first = await anext(running)
        with frozen(worker):
            waiting = await client.chat(TINY_MODEL, HELLO, **LONG, timeout=0.2)
            with pytest.raises(DeadlineExceeded, match="timeout ran out"):
                await asyncio.wait_for(waiting.collect(), 30)
            await asyncio.sleep(0.5)  # the running one's time runs out too, while its worker stands still
        rest = await asyncio.wait_for(running.collect(), 30)
        assert rest.finish_reason is FinishReason.DEADLINE and 0 < rest.completion_tokens < 480
        uncut = await (await client.chat(TINY_MODEL, HELLO, **LONG)).collect()
        assert uncut.text.startswith(first.text + rest.text)  # the answer so far, nothing lost or made up


async def test_a_full_model_serves_its_queue_by_priority(stack):
    stack.broker(*SLOW_HEARTBEATS)
    worker = stack.worker("--max-batch", "1", *SLOW_HEARTBEATS)
    await wait_for_models(stack.address, {TINY_MODEL})
    async with BusClient(stack.address) as client:
        blocker = await client.chat(TINY_MODEL, HELLO, max_tokens=8)
        await anext(blocker)
        finished: list[str] = []

        async def ask(name: str, priority: int) -> None:
            await (await client.chat(TINY_MODEL, HELLO, max_tokens=2, priority=priority)).collect()
            finished.append(name)

        tasks = []
        with frozen(worker):  # the only slot stays taken while the queue fills
            for name, priority in (("late-low", 10), ("urgent", -5), ("normal", 0), ("normal-2", 0)):
                tasks.append(asyncio.create_task(ask(name, priority)))
                await wait_until(lambda: num_queued_is(client, len(tasks)))
        await asyncio.wait_for(asyncio.gather(blocker.collect(), *tasks), 60)
    assert finished == ["urgent", "normal", "normal-2", "late-low"]


def test_the_api_takes_a_timeout_from_the_body_or_a_header(bus):
    api = Api(bus.address).wait()
    client = api.client()
    ask = {"model": TINY_MODEL, "messages": HELLO, **LONG, "stream": True}
    try:
        for extra, headers in (({"timeout": 0.3}, None), ({}, {"X-Request-Timeout": "0.3"})):
            chunks = iter(client.chat.completions.create(**ask, extra_body=extra, extra_headers=headers,
                                                         stream_options={"include_usage": True}))
            next(chunks)
            with frozen(bus.workers[0]):
                asyncio.run(asyncio.sleep(1.0))  # its time runs out while its worker stands still
            rest = list(chunks)
            assert [c.choices[0].finish_reason for c in rest if c.choices][-1] == "length"
            assert rest[-1].usage.completion_tokens < 480
        status, body = post(api.url + "/v1/chat/completions", {"model": TINY_MODEL, "messages": HELLO},
                            headers={"X-Request-Timeout": "soon"})
        assert status == 400 and body["error"]["param"] == "X-Request-Timeout"
        status, body = post(api.url + "/v1/completions", {"model": TINY_MODEL, "prompt": "Hi", "timeout": -1})
        assert status == 400 and body["error"]["param"] == "timeout"
    finally:
        api.stop()
