"""What tests share: a tiny real model (random weights, the default model's tokenizer) and a live bus."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from subprocess import Popen

import aiohttp
import zmq
import zmq.asyncio

from broker import protocol
from broker.protocol import Message
from frontends.client import BrokerUnreachable, BusClient, BusError
from tests.processes import free_address, start_broker, start_worker, stop

TINY_MODEL = "tiny"


def build_tiny_model(target: Path) -> Path:
    """A two-layer Llama with random weights and SmolLM2's real tokenizer and chat template."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from worker.model_source import default_model_dir

    tokenizer = AutoTokenizer.from_pretrained(default_model_dir())
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target


async def wait_for_models(address: str, names: set[str], timeout: float = 120.0) -> None:
    """Until the broker lists every model in `names`."""
    deadline = time.monotonic() + timeout
    async with BusClient(address) as client:
        while time.monotonic() < deadline:
            try:
                if names <= {m.name for m in await client.models()}:
                    return
            except BusError:
                pass
            await asyncio.sleep(0.2)
    raise TimeoutError(f"models {names} not served at {address} after {timeout}s")


@dataclass
class Bus:
    address: str
    model: str
    broker: Popen
    workers: list[Popen]


@contextmanager
def serving(model_dir: Path | None, name: str, *worker_args: str) -> Iterator[Bus]:
    """A broker and one worker (`model_dir` None: the default model), stopped on exit."""
    address = free_address()
    running = Bus(address, name, start_broker(address), [])
    try:
        running.workers.append(start_worker(address, model_dir, *worker_args))
        asyncio.run(wait_for_models(address, {name}))
        yield running
    finally:
        # A test may have replaced the broker or added workers: stop what is there now.
        for process in [*running.workers, running.broker]:
            stop(process)


HELLO = [{"role": "user", "content": "Hello there"}]


async def wait_until(predicate, timeout=30.0):
    for _ in range(int(timeout / 0.1)):
        if await predicate():
            return
        await asyncio.sleep(0.1)
    raise TimeoutError("condition not reached")


async def in_flight(client: BusClient) -> int:
    return sum(w.in_flight for w in await client.workers())


async def num_workers(client: BusClient, count: int) -> bool:
    return len(await client.workers()) == count


async def idle(client: BusClient) -> bool:
    return await in_flight(client) == 0


async def a_client_that_leaves_is_cancelled(url: str, body: dict, bus_address: str) -> None:
    """Open a stream at `url`, drop the connection after its first line: the worker must stop the request."""
    async with aiohttp.ClientSession() as session, BusClient(bus_address) as client:
        response = await session.post(url, json=body)
        await response.content.readline()
        assert await in_flight(client) == 1
        response.close()  # drop the connection mid-stream
        try:
            await wait_until(lambda: idle(client), timeout=6)
        except TimeoutError:
            raise AssertionError("the worker kept generating for a client that left") from None


async def num_queued_is(client: BusClient, count: int) -> bool:
    return sum(m.queued for m in await client.models()) == count


async def reachable(client: BusClient) -> bool:
    return await served_models(client) is not None


async def served_models(client: BusClient) -> set[str] | None:
    """The models the broker lists, or None while it cannot be reached."""
    try:
        return {m.name for m in await client.models()}
    except BrokerUnreachable:
        return None


async def serves(client: BusClient, model: str) -> bool:
    return model in (await served_models(client) or set())


@asynccontextmanager
async def worker_behind_raw_broker(model_dir, interval: float = 60.0):
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


def raw_dealer(address: str) -> zmq.asyncio.Socket:
    socket = zmq.asyncio.Context.instance().socket(zmq.DEALER)
    socket.setsockopt(zmq.LINGER, 0)
    socket.connect(address)
    return socket
