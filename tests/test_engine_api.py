"""A second engine plugs into the worker's server through `WorkerEngine` alone: the real server, a
real broker process and the real bus client, with an engine that is not the transformers one."""

from __future__ import annotations

import asyncio
import threading

import pytest

from broker import protocol
from broker.protocol import ErrorCode, FinishReason, GenerationRequest
from frontends.client import BusClient, BusError
from tests.helpers import wait_until
from tests.processes import free_address, start_broker, stop
from worker.engine_api import DoneEvent, ErrorEvent, Event, Request, TokenEvent, WorkerEngine
from worker.server import WorkerServer


class SpellingEngine:
    """Spells the prompt back one character per step, all its requests batched in each step."""

    def __init__(self) -> None:
        self.held: dict[bytes, tuple[str, int]] = {}  # request id: prompt, characters sent

    @property
    def has_work(self) -> bool:
        return bool(self.held)

    def add(self, request_id: bytes, request: Request) -> list[Event]:
        if not isinstance(request, GenerationRequest) or not request.prompt:
            return [ErrorEvent(request_id, protocol.Error(ErrorCode.BAD_REQUEST, "a prompt, please", "prompt"))]
        self.held[request_id] = (request.prompt, 0)
        return []

    def step(self) -> list[Event]:
        events: list[Event] = []
        for request_id, (prompt, sent) in list(self.held.items()):
            char = prompt[sent]
            events.append(TokenEvent(request_id, protocol.TokenDelta(char, 1, token_ids=(ord(char),))))
            self.held[request_id] = (prompt, sent + 1)
            if sent + 1 == len(prompt):
                del self.held[request_id]
                events.append(DoneEvent(request_id, protocol.Done(FinishReason.STOP, len(prompt), len(prompt))))
        return events

    def cancel(self, request_id: bytes, reason: FinishReason = FinishReason.CANCELLED) -> list[Event]:
        held = self.held.pop(request_id, None)
        return [] if held is None else [DoneEvent(request_id, protocol.Done(reason, len(held[0]), held[1]))]

    def drop_all(self) -> None:
        self.held.clear()


@pytest.fixture
def spelling_worker():
    address = free_address()
    broker = start_broker(address)
    engine: WorkerEngine = SpellingEngine()
    server = WorkerServer(engine, protocol.Ready("speller-1", ("speller",), capacity=4), address, heartbeat_interval=0.5)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        yield address
    finally:
        server.stopping.set()
        thread.join(5)
        stop(broker)


async def test_the_server_serves_another_engine_through_the_interface(spelling_worker):
    async with BusClient(spelling_worker) as client:
        await wait_until(lambda: _serves(client))
        answers = await asyncio.gather(*(client.complete("speller", word) for word in ("tokenbus", "zmq")))
        done = [await stream.collect() for stream in answers]
        assert [c.text for c in done] == ["tokenbus", "zmq"]
        assert [c.completion_tokens for c in done] == [8, 3] and done[0].finish_reason == "stop"
        with pytest.raises(BusError, match="a prompt, please") as refused:
            await (await client.complete("speller", "")).collect()
        assert refused.value.field == "prompt"


async def _serves(client: BusClient) -> bool:
    return "speller" in {model for worker in await client.workers() for model in worker.models}
