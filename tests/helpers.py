"""What tests share: a tiny real model (random weights, the default model's tokenizer) and a live bus."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from subprocess import Popen

from frontends.client import BusClient, BusError
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
