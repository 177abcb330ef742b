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
            done = protocol.Done(protocol.FinishReason.STOP, 3, 1).to_fields()
            for _ in range(num_requests):
                request = await asyncio.to_thread(worker.next, protocol.Command.REQUEST)
                worker.send(protocol.Command.DONE, request.request_id, done)
            results = await asyncio.wait_for(
                asyncio.gather(*(s.collect() for s in streams), return_exceptions=True), 60)
        unknown = [r for r in results if isinstance(r, BrokerUnreachable) and "does not know" in r.message]
        assert not unknown, f"{len(unknown)} of {num_requests} requests were named in a heartbeat before they were sent"
    finally:
        worker.close()


async def test_a_request_cancelled_while_sending_leaves_no_open_stream():
    # No broker, and a long liveness: the send waits for one until it is cancelled.
    async with BusClient(free_address(), heartbeat_interval=60) as client:
        sending = asyncio.create_task(client.chat("any", HELLO))
        for _ in range(300):
            if client._streams:
                break
            await asyncio.sleep(0.01)
        assert client._streams and not sending.done(), "the request should be waiting to be sent"
        sending.cancel()
        with pytest.raises(asyncio.CancelledError):
            await sending
        assert client._streams == {}


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
        interrupt = threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT))
        interrupt.start()
        try:
            chat.reply("Hello there")
        except KeyboardInterrupt:
            pytest.fail("Ctrl-C escaped the reply")
        finally:
            interrupt.join()
        assert "[cancelled]" in capsys.readouterr().out
        assert chat.history == []
        for _ in range(3000):  # the interrupted call is cancelled on the client's loop thread
            if not client._client._streams:
                break
            time.sleep(0.01)
        assert client._client._streams == {}
