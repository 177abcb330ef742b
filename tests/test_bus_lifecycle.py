"""The bus end to end, a request's life: cancel, queueing, misbehaving peers."""

from __future__ import annotations

import asyncio
import os
import queue
import signal

import msgpack
import pytest
import zmq
import zmq.asyncio

from broker import protocol
from frontends.client import (
    BusClient,
    BusError,
    Overloaded,
    QueueTimeout,
)
from tests.helpers import (
    HELLO,
    TINY_MODEL,
    idle,
    in_flight,
    num_queued_is,
    raw_dealer,
    wait_for_models,
    wait_until,
    worker_behind_raw_broker,
)
from tests.raw_worker import RawWorker


async def test_cancel_reaches_the_worker_and_frees_the_slot(bus):
    worker = RawWorker(bus.address, "raw-cancel")  # it never ends a reply by itself
    try:
        await wait_for_models(bus.address, {"raw-cancel"})
        async with BusClient(bus.address) as client:
            stream = await client.chat("raw-cancel", HELLO)
            request = await asyncio.to_thread(worker.next, protocol.Command.REQUEST)
            worker.send(protocol.Command.TOKEN, request.request_id, {"text": "Hi"})
            assert (await anext(stream)).text == "Hi"
            await stream.cancel()
            assert (await asyncio.to_thread(worker.next, protocol.Command.CANCEL)).request_id == request.request_id
            assert await in_flight(client) == 1  # the slot is the worker's until it confirms
            worker.send(protocol.Command.DONE, request.request_id,
                        protocol.Done(protocol.FinishReason.CANCELLED, 3, 1).to_fields())
            await wait_until(lambda: idle(client))
    finally:
        worker.close()

async def test_a_malformed_reply_from_a_worker_fails_its_request_and_frees_the_slot(bus):
    worker = RawWorker(bus.address, "raw-garbled")
    try:
        await wait_for_models(bus.address, {"raw-garbled"})
        async with BusClient(bus.address) as client:
            stream = await client.chat("raw-garbled", HELLO)
            request = await asyncio.to_thread(worker.next, protocol.Command.REQUEST)
            # A DONE over the size limit: the broker cannot forward it, so the ending would be lost.
            oversized = msgpack.packb({"finish_reason": "stop", "pad": "x" * protocol.MAX_MESSAGE_SIZE})
            worker.send_frames([protocol.PROTOCOL_SIGNATURE, b"DONE", request.request_id, oversized])
            with pytest.raises(BusError, match="malformed reply"):
                await stream.collect()
            assert (await asyncio.to_thread(worker.next, protocol.Command.CANCEL)).request_id == request.request_id
            await wait_until(lambda: idle(client))
    finally:
        worker.close()

async def test_a_freed_slot_serves_the_longest_waiting_request_whichever_alias_it_named(bus):
    worker = RawWorker(bus.address, ("alias-a", "alias-b"), capacity=1)
    try:
        await wait_for_models(bus.address, {"alias-a", "alias-b"})
        async with BusClient(bus.address) as client:
            first = await client.chat("alias-a", HELLO)
            running = await asyncio.to_thread(worker.next, protocol.Command.REQUEST)
            waiting_longest = await client.chat("alias-b", HELLO)
            await client.chat("alias-a", HELLO)
            await wait_until(lambda: num_queued_is(client, 2))
            worker.send(protocol.Command.DONE, running.request_id, protocol.Done(protocol.FinishReason.STOP, 3, 1).to_fields())
            await first.collect()
            assert (await asyncio.to_thread(worker.next, protocol.Command.REQUEST)).request_id == waiting_longest.request_id
    finally:
        worker.close()

async def test_a_worker_stops_a_cancelled_request_at_its_next_step(tiny_model_dir):
    async with worker_behind_raw_broker(tiny_model_dir) as (send, receive):
        request_id = os.urandom(16)
        await send(protocol.Command.REQUEST, request_id, {"model": TINY_MODEL, "prompt": "x", "max_tokens": 480})
        while (await receive()).command is not protocol.Command.TOKEN:
            pass
        await send(protocol.Command.CANCEL, request_id)
        while (message := await receive()).command is not protocol.Command.DONE:
            pass
        done = protocol.Done.from_fields(message.fields())
        assert message.request_id == request_id and done.finish_reason is protocol.FinishReason.CANCELLED
        assert done.completion_tokens < 480

async def test_full_queue_answers_overloaded_and_waiting_times_out(stack):
    # Heartbeats slow enough that a worker frozen for the test is not taken for dead.
    stack.broker("--max-queue", "1", "--queue-timeout", "0.3", "--heartbeat-interval", "2")
    worker = stack.worker("--max-batch", "1", "--heartbeat-interval", "2")
    await wait_for_models(stack.address, {TINY_MODEL})
    async with BusClient(stack.address) as client:
        running = await client.chat(TINY_MODEL, HELLO, max_tokens=480)
        await anext(running)
        worker.send_signal(signal.SIGSTOP)  # its only slot stays taken, however fast the model
        try:
            queued = await client.chat(TINY_MODEL, HELLO, max_tokens=5)
            rejected = await client.chat(TINY_MODEL, HELLO, max_tokens=5)
            with pytest.raises(Overloaded, match="busy"):
                await rejected.collect()
            with pytest.raises(QueueTimeout):
                await asyncio.wait_for(queued.collect(), 30)
        finally:
            worker.send_signal(signal.SIGCONT)
        await running.cancel()

async def test_garbage_frames_do_not_hurt_the_broker(bus):
    context = zmq.asyncio.Context.instance()
    raw = context.socket(zmq.DEALER)
    raw.setsockopt(zmq.LINGER, 0)
    raw.connect(bus.address)
    rid = os.urandom(16)
    junk = [
        [b"garbage"], [b"TBUS1", b"TOKEN"], [b"TBUS0", b"REQUEST", rid, b"\x80"], [b"TBUS1", b"NOPE", rid, b"\x80"],
        [b"TBUS1", b"REQUEST", rid, b"\xc1\xc1"], [b"TBUS1", b"REQUEST", b"123", b"\x80"],
        [b"TBUS1", b"READY", b"", msgpack.packb({"models": "x"})], [b"TBUS1", b"DONE", rid, b"\x80"],
        [b"TBUS1", b"REQUEST", rid, msgpack.packb({"model": bus.model, "prompt": 3})],
    ]
    for index in range(3000):
        await raw.send_multipart(junk[index % len(junk)] if index % 7 else [os.urandom(index % 50 + 1)] * (index % 5 + 1))
    # A malformed request with a reply address is answered with an explicit error.
    await raw.send_multipart(protocol.encode(protocol.Command.REQUEST, rid, {"model": bus.model, "prompt": 3}))
    while True:
        message = protocol.decode(await asyncio.wait_for(raw.recv_multipart(), 30))
        if message.command is protocol.Command.ERROR and message.request_id == rid:
            error = protocol.Error.from_fields(message.fields())
            if "prompt" in error.message:
                break
    assert error.code is protocol.ErrorCode.BAD_REQUEST
    # Bodies that quote a caller's huge value back would outgrow the bus: the answer quotes a little.
    for body in ({"model": bus.model, "messages": [{"role": "\x00" * 300_000, "content": "x"}]},
                 {"k" * (protocol.MAX_MESSAGE_SIZE - 20): 1}):
        huge_id = os.urandom(16)
        await raw.send_multipart(protocol.encode(protocol.Command.REQUEST, huge_id, body))
        message = protocol.decode(await asyncio.wait_for(raw.recv_multipart(), 30))
        while message.request_id != huge_id:  # answers to the junk above may still be on their way
            message = protocol.decode(await asyncio.wait_for(raw.recv_multipart(), 30))
        assert protocol.Error.from_fields(message.fields()).code is protocol.ErrorCode.BAD_REQUEST
        assert len(message.body) < 1000
    raw.close()
    async with BusClient(bus.address) as client:
        result = await (await client.chat(bus.model, HELLO, max_tokens=4)).collect()
        assert result.completion_tokens == 4

async def test_client_that_vanishes_has_its_requests_cancelled(bus):
    worker = RawWorker(bus.address, "raw-vanish")
    try:
        await wait_for_models(bus.address, {"raw-vanish"})
        raw = raw_dealer(bus.address)
        await raw.send_multipart(protocol.encode(protocol.Command.REQUEST, os.urandom(16),
                                                 {"model": "raw-vanish", "prompt": "x"}))
        request = await asyncio.to_thread(worker.next, protocol.Command.REQUEST)
        raw.close()
        # The broker learns the client is gone when a token for it cannot be delivered.
        for _ in range(300):
            worker.send(protocol.Command.TOKEN, request.request_id, {"text": "x"})
            try:
                cancel = await asyncio.to_thread(worker.next, protocol.Command.CANCEL, 0.1)
                break
            except queue.Empty:
                continue
        else:
            pytest.fail("the broker never cancelled the vanished client's request")
        assert cancel.request_id == request.request_id
    finally:
        worker.close()
