"""The bus end to end: real broker and worker processes, real sockets, the tiny model."""

from __future__ import annotations

import asyncio
import os
import queue
import signal
from contextlib import asynccontextmanager

import msgpack
import pytest
import zmq
import zmq.asyncio

from broker import protocol
from broker.protocol import Message
from frontends.client import (BadRequest, BrokerUnreachable, BusClient, BusError, ContextLengthExceeded, NoWorker, Overloaded,
                              QueueTimeout, UnknownModel, WorkerLost)
from tests.helpers import TINY_MODEL, wait_for_models
from tests.processes import free_address, start_broker, start_worker, stop
from tests.raw_worker import RawWorker

HELLO = [{"role": "user", "content": "Hello there"}]


@pytest.fixture
def stack(tiny_model_dir):
    """Start brokers and workers on demand; everything is stopped at the end of the test."""
    processes = []

    class Stack:
        address = free_address()

        def broker(self, *args):
            processes.append(start_broker(self.address, "--heartbeat-interval", "0.5", *args))
            return processes[-1]

        def worker(self, *args, name=TINY_MODEL):
            processes.append(start_worker(self.address, tiny_model_dir, "--model-names", name,
                                          "--heartbeat-interval", "0.5", *args))
            return processes[-1]

    yield Stack()
    for process in reversed(processes):
        stop(process)


async def wait_until(predicate, timeout=30.0):
    for _ in range(int(timeout / 0.1)):
        if await predicate():
            return
        await asyncio.sleep(0.1)
    raise TimeoutError("condition not reached")


async def in_flight(client: BusClient) -> int:
    return sum(w.in_flight for w in await client.workers())


async def test_two_workers_share_concurrent_streams(stack):
    stack.broker()
    stack.worker("--max-batch", "2")
    stack.worker("--max-batch", "2")
    await wait_for_models(stack.address, {TINY_MODEL})
    async with BusClient(stack.address) as client:
        await wait_until(lambda: _num_workers(client, 2))
        streams = [await client.chat(TINY_MODEL, HELLO, max_tokens=12, temperature=0) for _ in range(4)]
        results = await asyncio.gather(*(s.collect() for s in streams))
        assert all(r.finish_reason == "length" and r.completion_tokens == 12 for r in results)
        assert len({r.text for r in results}) == 1  # greedy: the same prompt gives the same text anywhere
        assert [w.served for w in await client.workers()] == [2, 2]
        [model] = await client.models()
        assert (model.name, model.workers, model.capacity) == (TINY_MODEL, 2, 4)


async def _num_workers(client: BusClient, count: int) -> bool:
    return len(await client.workers()) == count


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
            await wait_until(lambda: _idle(client))
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
            await wait_until(lambda: _idle(client))
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
            await wait_until(lambda: _queued(client, 2))
            worker.send(protocol.Command.DONE, running.request_id, protocol.Done(protocol.FinishReason.STOP, 3, 1).to_fields())
            await first.collect()
            assert (await asyncio.to_thread(worker.next, protocol.Command.REQUEST)).request_id == waiting_longest.request_id
    finally:
        worker.close()


async def test_a_worker_stops_a_cancelled_request_at_its_next_step(tiny_model_dir):
    async with _worker_behind_raw_broker(tiny_model_dir) as (send, receive):
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


async def _idle(client: BusClient) -> bool:
    return await in_flight(client) == 0


async def _queued(client: BusClient, count: int) -> bool:
    return sum(m.queued for m in await client.models()) == count


async def test_full_queue_answers_overloaded_and_waiting_times_out(stack):
    stack.broker("--max-queue", "1", "--queue-timeout", "0.3")
    stack.worker("--max-batch", "1")
    await wait_for_models(stack.address, {TINY_MODEL})
    async with BusClient(stack.address) as client:
        running = await client.chat(TINY_MODEL, HELLO, max_tokens=480)
        await anext(running)
        queued = await client.chat(TINY_MODEL, HELLO, max_tokens=5)
        rejected = await client.chat(TINY_MODEL, HELLO, max_tokens=5)
        with pytest.raises(Overloaded, match="busy"):
            await rejected.collect()
        with pytest.raises(QueueTimeout):
            await queued.collect()
        await running.cancel()


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
        raw = _raw_dealer(bus.address)
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


async def test_with_no_broker_every_call_fails_and_none_waits_to_be_replayed():
    """Nothing queues up for an absent broker: each call ends with BrokerUnreachable, however many."""
    async with BusClient(free_address()) as client:
        results = await asyncio.wait_for(asyncio.gather(
            *(client.models() for _ in range(1100)),  # more than a socket's default queue of 1000
            *(client.chat(TINY_MODEL, HELLO) for _ in range(10)), return_exceptions=True), 60)
        assert {type(r) for r in results} == {BrokerUnreachable}
        with pytest.raises(BrokerUnreachable):
            await asyncio.wait_for(client.models(), 30)


async def test_worker_killed_mid_stream_fails_its_stream_and_others_keep_serving(stack):
    stack.broker()
    victims = {stack.worker("--max-batch", "1").pid, stack.worker("--max-batch", "1").pid}
    await wait_for_models(stack.address, {TINY_MODEL})
    async with BusClient(stack.address) as client:
        await wait_until(lambda: _num_workers(client, 2))
        stream = await client.chat(TINY_MODEL, HELLO, max_tokens=480)
        await anext(stream)
        busy = [w for w in await client.workers() if w.in_flight]
        victim = next(pid for pid in victims if busy[0].worker_id.endswith(f"-{pid}"))
        os.kill(victim, signal.SIGKILL)
        with pytest.raises(WorkerLost):
            await asyncio.wait_for(stream.collect(), 30)
        result = await (await client.chat(TINY_MODEL, HELLO, max_tokens=4)).collect()
        assert result.completion_tokens == 4
        assert len(await client.workers()) == 1


async def test_broker_restart_heals_without_touching_workers_or_clients(stack):
    broker = stack.broker()
    stack.worker()
    await wait_for_models(stack.address, {TINY_MODEL})
    async with BusClient(stack.address, heartbeat_interval=0.5) as client:
        stream = await client.chat(TINY_MODEL, HELLO, max_tokens=480)
        await anext(stream)
        broker.send_signal(signal.SIGKILL)
        broker.wait()
        with pytest.raises(BrokerUnreachable):
            await asyncio.wait_for(stream.collect(), 30)
        stack.broker()
        await wait_until(lambda: _serves(client, TINY_MODEL))
        result = await (await client.chat(TINY_MODEL, HELLO, max_tokens=4)).collect()
        assert result.completion_tokens == 4


async def test_a_new_broker_holds_requests_while_workers_announce_then_names_the_unknown(stack):
    stack.broker("--heartbeat-interval", "1")  # workers have 3 s to announce themselves
    async with BusClient(stack.address) as client:
        await wait_until(lambda: _reachable(client))
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


async def _reachable(client: BusClient) -> bool:
    return await _served(client) is not None


async def test_frozen_workers_are_dropped_and_come_back_by_themselves(stack):
    stack.broker()
    workers = [stack.worker("--max-batch", "1"), stack.worker("--max-batch", "1")]
    await wait_for_models(stack.address, {TINY_MODEL})
    async with BusClient(stack.address) as client:
        await wait_until(lambda: _num_workers(client, 2))
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
        await wait_until(lambda: _num_workers(client, 2))
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
    worker = _raw_dealer(stack.address)
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
    async with _worker_behind_raw_broker(tiny_model_dir, interval) as (send, receive):
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


@asynccontextmanager
async def _worker_behind_raw_broker(model_dir, interval: float = 60.0):
    """A real worker process whose broker is the test: yields `send(command, id, body)` to the
    worker and `receive()` of its next message, once it has announced itself."""
    address = free_address()
    broker = zmq.asyncio.Context.instance().socket(zmq.ROUTER)
    broker.setsockopt(zmq.LINGER, 0)
    broker.bind(address)
    process = start_worker(address, model_dir, "--model-names", TINY_MODEL, "--heartbeat-interval", str(interval))
    try:
        identity, *frames = await asyncio.wait_for(broker.recv_multipart(), 120)
        assert protocol.decode(frames).command is protocol.Command.READY

        async def send(command, request_id: bytes = b"", body=None) -> None:
            await broker.send_multipart([identity, *protocol.encode(command, request_id, body)])

        async def receive() -> Message:
            _, *frames = await asyncio.wait_for(broker.recv_multipart(), 60)
            return protocol.decode(frames)

        yield send, receive
    finally:
        stop(process)
        broker.close()


def _raw_dealer(address: str) -> zmq.asyncio.Socket:
    socket = zmq.asyncio.Context.instance().socket(zmq.DEALER)
    socket.setsockopt(zmq.LINGER, 0)
    socket.connect(address)
    return socket


async def _replies_until_workers(socket: zmq.asyncio.Socket) -> list[protocol.Command]:
    """The broker's replies to what was sent so far: LIST_WORKERS goes last, so its answer comes last."""
    await socket.send_multipart(protocol.encode(protocol.Command.LIST_WORKERS, os.urandom(16)))
    replies = []
    while True:
        message = protocol.decode(await asyncio.wait_for(socket.recv_multipart(), 30))
        if message.command is protocol.Command.WORKERS:
            return replies
        replies.append(message.command)


async def _served(client: BusClient) -> set[str] | None:
    """The models the broker lists, or None while it cannot be reached."""
    try:
        return {m.name for m in await client.models()}
    except BrokerUnreachable:
        return None


async def _serves(client: BusClient, model: str) -> bool:
    return model in (await _served(client) or set())
