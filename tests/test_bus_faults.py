"""The bus end to end when processes die, freeze or restart."""

from __future__ import annotations

import asyncio
import os
import signal

import pytest
import zmq
import zmq.asyncio

from broker import protocol
from frontends.client import (
    BrokerUnreachable,
    BusClient,
    BusError,
    NoWorker,
    UnknownModel,
    WorkerLost,
)
from tests.helpers import (
    HELLO,
    TINY_MODEL,
    in_flight,
    num_workers,
    raw_dealer,
    reachable,
    wait_for_models,
    wait_until,
    worker_behind_raw_broker,
)
from tests.processes import free_address
from tests.raw_worker import RawWorker


async def test_with_no_broker_every_call_fails_and_none_waits_to_be_replayed():
    """Nothing queues up for an absent broker: each call ends with BrokerUnreachable, however many."""
    async with BusClient(free_address()) as client:
        results = await asyncio.wait_for(asyncio.gather(
            *(client.models() for _ in range(1100)),  # more than a socket's default queue of 1000
            *(client.chat(TINY_MODEL, HELLO) for _ in range(10)), return_exceptions=True), 60)
        assert {type(r) for r in results} == {BrokerUnreachable}
        with pytest.raises(BrokerUnreachable):
            await asyncio.wait_for(client.models(), 30)

async def test_a_stream_cut_by_a_killed_worker_goes_on_on_another_as_if_uncut(stack):
    stack.broker()
    # float32: a row's arithmetic does not depend on its neighbours, so the texts compare exactly
    victims = {stack.worker("--max-batch", "2", "--dtype", "float32").pid,
               stack.worker("--max-batch", "2", "--dtype", "float32").pid}
    await wait_for_models(stack.address, {TINY_MODEL})
    ask = {"max_tokens": 200, "temperature": 0.9, "seed": 5, "stop": ["zzz"]}
    async with BusClient(stack.address) as client:
        await wait_until(lambda: num_workers(client, 2))
        stream = await client.chat(TINY_MODEL, HELLO, **ask)
        head = [await anext(stream) for _ in range(5)]
        busy = [w for w in await client.workers() if w.in_flight]
        victim = next(pid for pid in victims if busy[0].worker_id.endswith(f"-{pid}"))
        os.kill(victim, signal.SIGKILL)
        rest = await asyncio.wait_for(stream.collect(), 60)
        assert stream.num_resumes == 1 and stream.done.worker_id != busy[0].worker_id
        uncut = await (await client.chat(TINY_MODEL, HELLO, **ask)).collect()
        assert "".join(d.text for d in head) + rest.text == uncut.text
        assert (rest.completion_tokens, rest.prompt_tokens) == (uncut.completion_tokens, uncut.prompt_tokens)
        assert len(await client.workers()) == 1


async def test_broker_restart_heals_without_touching_workers_or_clients(stack):
    broker = stack.broker()
    stack.worker("--dtype", "float32")
    await wait_for_models(stack.address, {TINY_MODEL})
    async with BusClient(stack.address, heartbeat_interval=0.5) as client:
        stream = await client.chat(TINY_MODEL, HELLO, max_tokens=480, temperature=0)
        head = await anext(stream)
        broker.send_signal(signal.SIGKILL)
        broker.wait()
        stack.broker()
        rest = await asyncio.wait_for(stream.collect(), 60)  # resumed on the worker, once it re-announced
        # Once; or twice, when the worker too noticed the silence and re-announced after taking the first resume.
        assert 1 <= stream.num_resumes <= 2
        uncut = await (await client.chat(TINY_MODEL, HELLO, max_tokens=480, temperature=0)).collect()
        assert head.text + rest.text == uncut.text and rest.completion_tokens == uncut.completion_tokens


async def test_a_new_broker_holds_requests_while_workers_announce_then_names_the_unknown(stack):
    stack.broker("--heartbeat-interval", "1")  # workers have 3 s to announce themselves
    async with BusClient(stack.address) as client:
        await wait_until(lambda: reachable(client))
        early = await client.chat("raw-late", HELLO)
        unknown = await client.chat("never-served", HELLO)
        worker = RawWorker(stack.address, "raw-late")  # a worker finding the new broker a moment later
        try:
            request = await asyncio.to_thread(worker.next, protocol.Command.REQUEST)
            assert request.request_id == early.request_id
            with pytest.raises(UnknownModel, match="models served: raw-late"):
                await unknown.collect()
        finally:
            worker.close()

async def test_frozen_workers_are_dropped_and_come_back_by_themselves(stack):
    stack.broker()
    workers = [stack.worker("--max-batch", "1"), stack.worker("--max-batch", "1")]
    await wait_for_models(stack.address, {TINY_MODEL})
    async with BusClient(stack.address) as client:
        await wait_until(lambda: num_workers(client, 2))
        streams = [await client.chat(TINY_MODEL, HELLO, max_tokens=480) for _ in range(3)]  # 2 run, 1 waits
        for stream in streams[:2]:
            await anext(stream)
        for worker in workers:
            worker.send_signal(signal.SIGSTOP)
        try:
            for stream in streams:
                with pytest.raises((WorkerLost, NoWorker)):
                    await asyncio.wait_for(stream.collect(), 30)
            assert await client.models() == []
        finally:
            for worker in workers:
                worker.send_signal(signal.SIGCONT)
        # Thawed, they hear the broker again, learn it forgot them, drop their old work and announce again.
        await wait_until(lambda: num_workers(client, 2))
        results = await asyncio.gather(*[(await client.chat(TINY_MODEL, HELLO, max_tokens=4)).collect()
                                         for _ in range(2)])
        assert [r.completion_tokens for r in results] == [4, 4]
        assert await in_flight(client) == 0

async def test_a_raw_worker_restarting_under_the_same_identity_settles_its_requests(bus):
    """READY from a known identity is a fresh start: what it held is re-queued or failed, never left hanging."""
    context = zmq.asyncio.Context.instance()
    worker = context.socket(zmq.DEALER)
    worker.setsockopt(zmq.LINGER, 0)
    worker.setsockopt(zmq.ROUTING_ID, b"raw-worker-" + os.urandom(4))
    worker.connect(bus.address)
    ready = protocol.Ready("raw", ("raw",), 2).to_fields()
    await worker.send_multipart(protocol.encode(protocol.Command.READY, b"", ready))
    await wait_for_models(bus.address, {"raw"})

    async def next_request() -> bytes:
        while True:
            message = protocol.decode(await asyncio.wait_for(worker.recv_multipart(), 30))
            if message.command is protocol.Command.REQUEST:
                return message.request_id

    async with BusClient(bus.address) as client:
        started = await client.chat("raw", HELLO)
        started_id = await next_request()
        await worker.send_multipart(protocol.encode(protocol.Command.TOKEN, started_id, {"text": "Hi"}))
        assert (await anext(started)).text == "Hi"
        waiting = await client.chat("raw", HELLO)
        waiting_id = await next_request()
        await worker.send_multipart(protocol.encode(protocol.Command.READY, b"", ready))  # "restarted"
        with pytest.raises(WorkerLost):
            await asyncio.wait_for(started.collect(), 30)
        assert await next_request() == waiting_id  # not started yet: sent again
        await worker.send_multipart(protocol.encode(protocol.Command.DONE, waiting_id, protocol.Done(
            protocol.FinishReason.STOP, 3, 0).to_fields()))
        assert (await asyncio.wait_for(waiting.collect(), 30)).text == ""
        await worker.send_multipart(protocol.encode(protocol.Command.DISCONNECT))
        with pytest.raises(BusError):  # gone with its worker
            await (await client.chat("raw", HELLO)).collect()
    worker.close()

async def test_an_unknown_worker_is_asked_to_announce_once_however_much_it_sends(stack):
    stack.broker("--heartbeat-interval", "60")  # one interval outlasts the test
    worker = raw_dealer(stack.address)
    heartbeat = protocol.encode(protocol.Command.HEARTBEAT, b"", {"worker_id": "raw"})
    for _ in range(10):  # a worker that outlived its broker: heartbeats and tokens of forgotten requests
        await worker.send_multipart(heartbeat)
        await worker.send_multipart(protocol.encode(protocol.Command.TOKEN, os.urandom(16), {"text": "x"}))
    replies = await _replies_until_workers(worker)
    assert replies.count(protocol.Command.REANNOUNCE) == 1
    assert replies.count(protocol.Command.CANCEL) == 10
    await worker.send_multipart(protocol.encode(protocol.Command.READY, b"", protocol.Ready("raw", ("raw",), 1).to_fields()))
    await worker.send_multipart(protocol.encode(protocol.Command.TOKEN, os.urandom(16), {"text": "x"}))
    assert await _replies_until_workers(worker) == [protocol.Command.CANCEL]  # known now: no REANNOUNCE
    worker.close()

async def test_a_worker_told_to_announce_drops_its_work_first(tiny_model_dir):
    """After its new READY, a worker sends nothing about the requests it dropped, and a second
    REANNOUNCE close behind the first brings no second READY."""
    interval = 2.0
    async with worker_behind_raw_broker(tiny_model_dir, interval) as (send, receive):
        await asyncio.sleep(interval * 1.1)  # a worker heeds REANNOUNCE only an interval after its READY
        dropped, kept = os.urandom(16), os.urandom(16)
        await send(protocol.Command.REQUEST, dropped, {"model": TINY_MODEL, "prompt": "x", "max_tokens": 400})
        while (await receive()).command is not protocol.Command.TOKEN:
            pass
        await send(protocol.Command.REANNOUNCE)
        await send(protocol.Command.REANNOUNCE)
        while (await receive()).command is not protocol.Command.READY:
            pass
        await send(protocol.Command.REQUEST, kept, {"model": TINY_MODEL, "prompt": "x", "max_tokens": 3})
        after_ready = [await receive()]
        while after_ready[-1].command is not protocol.Command.DONE:
            after_ready.append(await receive())
        assert {m.request_id for m in after_ready if m.command is not protocol.Command.HEARTBEAT} == {kept}
        assert protocol.Command.READY not in [m.command for m in after_ready]

async def _replies_until_workers(socket: zmq.asyncio.Socket) -> list[protocol.Command]:
    """The broker's replies to what was sent so far: LIST_WORKERS goes last, so its answer comes last."""
    await socket.send_multipart(protocol.encode(protocol.Command.LIST_WORKERS, os.urandom(16)))
    replies = []
    while True:
        message = protocol.decode(await asyncio.wait_for(socket.recv_multipart(), 30))
        if message.command is protocol.Command.WORKERS:
            return replies
        replies.append(message.command)


async def test_a_stream_whose_only_worker_is_restarted_goes_on_when_it_returns(stack):
    stack.broker()
    worker = stack.worker("--dtype", "float32")
    await wait_for_models(stack.address, {TINY_MODEL})
    async with BusClient(stack.address, reconnect_timeout=120) as client:
        stream = await client.chat(TINY_MODEL, HELLO, max_tokens=480, temperature=0)
        head = await anext(stream)
        worker.send_signal(signal.SIGKILL)
        worker.wait()
        stack.worker("--dtype", "float32")  # the same model comes back, on a new process
        rest = await asyncio.wait_for(stream.collect(), 120)
        uncut = await (await client.chat(TINY_MODEL, HELLO, max_tokens=480, temperature=0)).collect()
        assert head.text + rest.text == uncut.text and stream.num_resumes == 1
