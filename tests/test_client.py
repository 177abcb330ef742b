"""The bus client against a real broker process, with the worker played by hand."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from collections.abc import Iterator

import pytest

from broker import protocol
from frontends.cli import Chat, CliSettings
from frontends.client import BrokerUnreachable, BusClient, SyncBusClient
from tests.helpers import wait_for_models
from tests.processes import free_address, start_broker, stop
from tests.raw_worker import RawWorker

HELLO = [{"role": "user", "content": "Hello there"}]
DONE = protocol.Done(protocol.FinishReason.STOP, 3, 1).to_fields()


@pytest.fixture
def broker_address() -> Iterator[str]:
    address = free_address()
    process = start_broker(address)
    try:
        yield address
    finally:
        stop(process)


async def test_a_heartbeat_never_names_a_request_before_it_is_sent(broker_address):
    num_requests = 300
    worker = RawWorker(broker_address, "raw-many", capacity=num_requests)
    try:
        await wait_for_models(broker_address, {"raw-many"})
        # Heartbeats this often are due at nearly every send, where a request may not be out yet.
        async with BusClient(broker_address, heartbeat_interval=0.02) as client:
            streams = [await client.chat("raw-many", HELLO) for _ in range(num_requests)]
            for _ in range(num_requests):
                request = await asyncio.to_thread(worker.next, protocol.Command.REQUEST)
                worker.send(protocol.Command.DONE, request.request_id, DONE)
            results = await asyncio.wait_for(
                asyncio.gather(*(s.collect() for s in streams), return_exceptions=True), 60)
        unknown = [r for r in results if isinstance(r, BrokerUnreachable) and "does not know" in r.message]
        assert not unknown, f"{len(unknown)} of {num_requests} requests were named in a heartbeat before they were sent"
    finally:
        worker.close()


async def until_a_stream_opens(client: BusClient) -> None:
    for _ in range(300):
        if client.open_streams:
            return
        await asyncio.sleep(0.01)


async def test_a_request_cancelled_while_sending_leaves_no_open_stream():
    # No broker, and a long liveness: the send waits for one until it is cancelled.
    async with BusClient(free_address(), heartbeat_interval=60) as client:
        sending = asyncio.create_task(client.chat("any", HELLO))
        await until_a_stream_opens(client)
        assert client.open_streams and not sending.done(), "the request should be waiting to be sent"
        sending.cancel()
        with pytest.raises(asyncio.CancelledError):
            await sending
        assert client.open_streams == ()


@pytest.mark.timeout(60)
def test_a_closed_sync_client_refuses_calls_and_closes_again():
    client = SyncBusClient(free_address())
    client.close()
    client.close()
    with pytest.raises(BrokerUnreachable, match="closed"):
        client.models()
    with pytest.raises(BrokerUnreachable, match="closed"):
        client.chat("any", HELLO)


@pytest.mark.timeout(60)
def test_ctrl_c_before_a_reply_starts_cancels_it_and_forgets_the_turn(capsys):
    # No broker, and a long liveness: the send waits for one long after the Ctrl-C, unless it is cancelled.
    address = free_address()
    with SyncBusClient(address, heartbeat_interval=60) as client:
        chat = Chat(client, CliSettings(broker=address, model="any"))

        def interrupt_the_send() -> None:  # once the reply waits on its send, however slow the host
            while not client.open_streams:
                time.sleep(0.01)
            os.kill(os.getpid(), signal.SIGINT)

        interrupt = threading.Thread(target=interrupt_the_send, daemon=True)
        # Ctrl-C raises KeyboardInterrupt, as at an interactive terminal, even if the suite started with SIGINT ignored.
        handler = signal.signal(signal.SIGINT, signal.default_int_handler)
        interrupt.start()
        try:
            chat.reply("Hello there")
        except KeyboardInterrupt:
            pytest.fail("Ctrl-C escaped the reply")
        finally:
            interrupt.join()
            signal.signal(signal.SIGINT, handler)
        assert "[cancelled]" in capsys.readouterr().out
        assert chat.history == []
        for _ in range(3000):  # the interrupted call is cancelled on the client's loop thread
            if not client.open_streams:
                break
            time.sleep(0.01)
        assert client.open_streams == ()


async def test_a_request_sent_while_no_broker_is_up_goes_out_when_one_starts():
    address = free_address()
    worker = RawWorker(address, "raw-early")  # its announcement waits for the broker too
    broker = None
    try:
        async with BusClient(address, reconnect_timeout=120) as client:
            sending = asyncio.create_task(client.chat("raw-early", HELLO))
            await until_a_stream_opens(client)
            assert client.open_streams and not sending.done(), "the request should be waiting for a broker"
            broker = start_broker(address)
            request = await asyncio.to_thread(worker.next, protocol.Command.REQUEST)
            stream = await asyncio.wait_for(sending, 30)
            assert request.request_id == stream.request_id
            worker.send(protocol.Command.DONE, request.request_id, DONE)
            assert (await asyncio.wait_for(stream.collect(), 30)).finish_reason is protocol.FinishReason.STOP
    finally:
        worker.close()
        if broker is not None:
            stop(broker)


async def test_a_broker_restart_resends_requests_without_tokens_and_fails_those_with_some():
    address = free_address()
    broker = start_broker(address)
    worker = RawWorker(address, "raw-restart", capacity=2)
    try:
        await wait_for_models(address, {"raw-restart"})
        async with BusClient(address, reconnect_timeout=120) as client:
            streaming = await client.chat("raw-restart", HELLO)
            waiting = await client.chat("raw-restart", HELLO)
            received = {(await asyncio.to_thread(worker.next, protocol.Command.REQUEST)).request_id for _ in range(2)}
            assert received == {streaming.request_id, waiting.request_id}
            worker.send(protocol.Command.TOKEN, streaming.request_id, {"text": "Hi", "num_tokens": 1})
            assert (await asyncio.wait_for(anext(streaming), 30)).text == "Hi"
            broker.send_signal(signal.SIGKILL)
            broker.wait()
            worker.close()  # this worker cannot re-announce itself: a fresh one stands in for it
            broker = start_broker(address)
            worker = RawWorker(address, "raw-restart", capacity=2)
            with pytest.raises(BrokerUnreachable):  # half an answer is never restarted silently
                await asyncio.wait_for(streaming.collect(), 30)
            request = await asyncio.to_thread(worker.next, protocol.Command.REQUEST)
            assert request.request_id == waiting.request_id and waiting.num_sends >= 2
            worker.send(protocol.Command.TOKEN, request.request_id, {"text": "Hello", "num_tokens": 1})
            worker.send(protocol.Command.DONE, request.request_id, DONE)
            assert (await asyncio.wait_for(waiting.collect(), 30)).text == "Hello"
    finally:
        worker.close()
        stop(broker)
