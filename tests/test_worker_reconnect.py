"""The reference worker on a real bus: one registry entry however it reconnects, and a CANCEL that
crosses its own DONE."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import zmq.asyncio

from broker import protocol, sockets
from frontends.client import BrokerUnreachable, BusClient
from tests.helpers import TINY_MODEL, wait_for_models, worker_behind_raw_broker
from tests.processes import free_address, start_broker, start_worker, stop

INTERVAL = 0.2  # seconds; a worker reconnects after three silent ones


async def _worker_counts(client: BusClient, after_first: float) -> list[int]:
    """LIST_WORKERS answers, polled until `after_first` seconds after the first that lists a worker."""
    counts: list[int] = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            counts.append(len(await asyncio.wait_for(client.workers(), 5)))
        except (BrokerUnreachable, TimeoutError):
            pass
        if counts and max(counts) and deadline > time.monotonic() + after_first:
            deadline = time.monotonic() + after_first
        await asyncio.sleep(0.02)
    return counts


async def test_a_worker_reconnects_under_its_own_routing_identity(tiny_model_dir):
    """A broker that hears the same identity again replaces the entry instead of adding one."""
    address = free_address()
    broker = sockets.router(zmq.asyncio.Context.instance())
    broker.bind(address)
    worker = start_worker(address, tiny_model_dir, "--model-names", TINY_MODEL, "--heartbeat-interval", str(INTERVAL))
    try:
        announced_by = []
        while len(announced_by) < 2:  # never answered, the worker reconnects after three intervals
            identity, *frames = await asyncio.wait_for(broker.recv_multipart(), 120)
            if protocol.decode(frames).command is protocol.Command.READY:
                announced_by.append(identity)
        assert announced_by[0] == announced_by[1]
    finally:
        stop(worker)
        broker.close()


async def test_a_worker_is_listed_once_however_a_restarted_broker_meets_it(tiny_model_dir):
    """Brokers restart at different moments of the worker's reconnect cycle; a READY still queued in a
    socket the worker is about to close must not leave a second entry behind."""
    address = free_address()
    broker = start_broker(address, "--heartbeat-interval", str(INTERVAL))
    worker = start_worker(address, tiny_model_dir, "--model-names", TINY_MODEL, "--heartbeat-interval", str(INTERVAL))
    try:
        await wait_for_models(address, {TINY_MODEL})
        async with BusClient(address) as client:
            for pause in (0.3, 0.6, 0.9):  # around the worker's 0.6 s of patience (a broker takes ~1 s to start)
                broker.send_signal(signal.SIGKILL)
                broker.wait()
                await asyncio.sleep(pause)
                broker = start_broker(address, "--heartbeat-interval", str(INTERVAL))
                counts = await _worker_counts(client, after_first=INTERVAL * protocol.HEARTBEAT_LIVENESS * 3)
                assert counts and max(counts) == 1 and counts[-1] == 1, (pause, counts)
    finally:
        stop(worker)
        stop(broker)


async def test_a_cancel_that_crosses_the_done_gets_no_answer(tiny_model_dir):
    async with worker_behind_raw_broker(tiny_model_dir) as (send, receive):
        finished, later = os.urandom(16), os.urandom(16)
        await send(protocol.Command.REQUEST, finished, {"model": TINY_MODEL, "prompt": "x", "max_tokens": 2})
        while (await receive()).command is not protocol.Command.DONE:
            pass
        await send(protocol.Command.CANCEL, finished)  # as if sent before the DONE arrived
        await send(protocol.Command.REQUEST, later, {"model": TINY_MODEL, "prompt": "x", "max_tokens": 2})
        answers = [await receive()]
        while answers[-1].command is not protocol.Command.DONE:
            answers.append(await receive())
        assert {m.request_id for m in answers if m.command is not protocol.Command.HEARTBEAT} == {later}
