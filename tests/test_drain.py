"""A worker told to stop drains: the broker sends it nothing new, it finishes what it holds, and
leaves. A rolling restart of both workers of a model under steady load loses and fails nothing."""

from __future__ import annotations

import asyncio
import random
import signal

from frontends.client import BusClient, BusError
from tests.helpers import HELLO, TINY_MODEL, num_workers, wait_for_models, wait_until

CONCURRENCY = 8
SLOW_HEARTBEATS = ("--heartbeat-interval", "2")


async def _at_least(answered: list, count: int) -> bool:
    return len(answered) >= count


async def _draining(client: BusClient, worker) -> bool:
    """Listed as draining, or already gone: a worker whose few requests end between two looks drains
    and leaves unseen (its exit code is checked next)."""
    if worker.poll() is not None:
        return True
    return any(w.draining for w in await client.workers() if w.worker_id.endswith(f"-{worker.pid}"))


async def test_a_rolling_restart_under_load_loses_nothing(stack):
    # Heartbeats slower than the fixture's: on a busy 2-core host a worker loading beside two busy ones
    # must not be taken for dead (a fault, whose streams would resume); only the drain is on trial here.
    stack.broker(*SLOW_HEARTBEATS)
    workers = [stack.worker("--max-batch", "4", *SLOW_HEARTBEATS), stack.worker("--max-batch", "4", *SLOW_HEARTBEATS)]
    await wait_for_models(stack.address, {TINY_MODEL})
    answered, failed, resumed = [], [], []
    restarting = True

    async with BusClient(stack.address, heartbeat_interval=2.0) as client:
        await wait_until(lambda: num_workers(client, 2))

        async def traffic(seed: int) -> None:
            rng = random.Random(seed)
            while restarting:
                stream = await client.chat(TINY_MODEL, HELLO, max_tokens=rng.randint(16, 64))
                try:
                    num_tokens = sum([delta.num_tokens async for delta in stream])
                    assert num_tokens == stream.done.completion_tokens
                    answered.append(stream.done.worker_id)
                    if stream.num_resumes:
                        resumed.append(stream)
                except BusError as error:
                    failed.append(error)

        loops = [asyncio.create_task(traffic(seed)) for seed in range(CONCURRENCY)]
        for index, worker in enumerate(list(workers)):
            await wait_until(lambda: _at_least(answered, 20 * (index + 1)))
            worker.send_signal(signal.SIGTERM)
            await wait_until(lambda: _draining(client, worker))  # the broker sends it nothing new
            assert await asyncio.to_thread(worker.wait, 60) == 0
            workers[index] = stack.worker("--max-batch", "4", *SLOW_HEARTBEATS)
            await wait_until(lambda: num_workers(client, 2), timeout=120)
        await wait_until(lambda: _at_least(answered, 60))
        restarting = False
        await asyncio.wait_for(asyncio.gather(*loops), 120)
    assert not failed and not resumed, (failed[:3], [(s.fault, s.num_sends) for s in resumed])
    assert len({w for w in answered}) == 4  # every generation of worker served


async def test_a_drain_that_runs_out_of_time_leaves_its_streams_to_resume(stack):
    stack.broker()
    slow = stack.worker("--max-batch", "2", "--drain-timeout", "1", "--dtype", "float32")
    await wait_for_models(stack.address, {TINY_MODEL})
    async with BusClient(stack.address) as client:
        stream = await client.chat(TINY_MODEL, HELLO, max_tokens=480, temperature=0)
        head = await anext(stream)
        stack.worker("--max-batch", "2", "--dtype", "float32")
        await wait_until(lambda: num_workers(client, 2))
        slow.send_signal(signal.SIGTERM)
        rest = await asyncio.wait_for(stream.collect(), 120)
        assert stream.num_resumes >= 1 and slow.wait(30) == 0  # more on a loaded machine: a slow broker looks lost
        uncut = await (await client.chat(TINY_MODEL, HELLO, max_tokens=480, temperature=0)).collect()
        assert head.text + rest.text == uncut.text
