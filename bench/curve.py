"""python -m bench.curve: what CURVE encryption costs the bus.

Two measurements, each with and without CURVE keys:
- frames per second the broker relays, between a client and a worker process that answers every
  request at once with a fixed number of TOKEN frames (no model: the bus alone);
- tokens per second through the OpenAI API at 16 streams on the real model (the whole stack).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import msgpack
import zmq
from openai import AsyncOpenAI
from pydantic import Field
from pydantic_settings import BaseSettings

from bench.load import run_level
from bench.stack import LocalStack, free_port
from broker import keys, protocol, sockets
from broker.auth import CurveKeys, Role
from broker.protocol import Command
from broker.settings import cli_config, load_settings

RELAY_MODEL = "relay"


class CurveBenchSettings(BaseSettings):
    model_config = cli_config("bench_curve", "python -m bench.curve")

    relay_requests: int = Field(2000, ge=1, description="requests through the relay measurement")
    relay_tokens: int = Field(32, ge=1, description="TOKEN frames the relay worker answers each request with")
    relay_concurrency: int = Field(64, ge=1, description="requests in flight at once in the relay measurement")
    streams: int = Field(16, ge=0, description="concurrent streams through the API; 0 skips the model")
    requests_per_stream: int = Field(2, ge=1, description="requests per stream at that level")
    max_tokens: int = Field(64, ge=2, description="new tokens per API request (greedy)")
    worker_args: list[str] = Field([], description="more flags for the worker (e.g. --model, --dtype)")
    output_dir: Path = Field(Path("bench/results"), description="where curve.json goes")


def make_keys(folder: Path) -> Path:
    """A key folder with a broker pair, a worker key and a client key."""
    with contextlib.redirect_stdout(io.StringIO()):
        keys.init(folder)
        keys.new(folder, "worker", Role.WORKER)
        keys.new(folder, "client", Role.CLIENT)
    return folder


def peer_curve(keys_dir: Path | None, name: str) -> CurveKeys | None:
    if keys_dir is None:
        return None
    return CurveKeys.load(keys_dir / "issued" / f"{name}.key_secret", keys_dir / "broker.key")


def relay_worker(address: str, keys_dir: Path | None, tokens_per_request: int) -> None:
    """A worker without a model: every REQUEST is answered at once with tokens and a DONE."""
    context = zmq.Context()
    dealer = sockets.dealer(context, address, curve=peer_curve(keys_dir, "worker"))
    dealer.send_multipart(protocol.encode(Command.READY, b"", protocol.Ready("relay", (RELAY_MODEL,), 1024).to_fields()))
    token = msgpack.packb(protocol.TokenDelta("x", 1).to_fields())  # packed once: the bus is measured, not us
    done = msgpack.packb(protocol.Done(protocol.FinishReason.LENGTH, 1, tokens_per_request).to_fields())
    next_heartbeat = 0.0
    while True:
        if time.monotonic() >= next_heartbeat:
            dealer.send_multipart(protocol.encode(Command.HEARTBEAT, b"", {"worker_id": "relay"}))
            next_heartbeat = time.monotonic() + protocol.HEARTBEAT_INTERVAL
        if not dealer.poll(100):
            continue
        while dealer.poll(0):
            message = protocol.decode(dealer.recv_multipart())
            if message.command is not Command.REQUEST:
                continue
            for _ in range(tokens_per_request):
                dealer.send_multipart(protocol.encode(Command.TOKEN, message.request_id, token))
            dealer.send_multipart(protocol.encode(Command.DONE, message.request_id, done))


def relay_rate(settings: CurveBenchSettings, keys_dir: Path | None) -> float:
    """Frames per second relayed by the broker (requests, tokens and DONEs together)."""
    address = f"tcp://127.0.0.1:{free_port()}"
    broker_args = ["--keys-dir", str(keys_dir)] if keys_dir else []
    broker = subprocess.Popen([sys.executable, "-m", "broker", "--bind", address, "--metrics-port", "0",
                               "--max-queue", str(settings.relay_requests), *broker_args],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    worker = multiprocessing.get_context("spawn").Process(
        target=relay_worker, args=(address, keys_dir, settings.relay_tokens), daemon=True)
    worker.start()
    context = zmq.Context()
    client = sockets.dealer(context, address, curve=peer_curve(keys_dir, "client"))
    try:
        _wait_for_relay(client)
        body = {"model": RELAY_MODEL, "prompt": "x", "max_tokens": settings.relay_tokens}
        sent = ended = frames = 0
        start = time.perf_counter()
        while ended < settings.relay_requests:
            while sent < settings.relay_requests and sent - ended < settings.relay_concurrency:
                client.send_multipart(protocol.encode(Command.REQUEST, sent.to_bytes(16, "big"), body))
                sent += 1
            if not client.poll(30_000):
                raise TimeoutError("the relay stopped answering")
            while client.poll(0):
                command = client.recv_multipart()[1]
                frames += 1
                if command in (b"DONE", b"ERROR"):
                    ended += 1
        elapsed = time.perf_counter() - start
        return (frames + sent) / elapsed
    finally:
        client.close(linger=0)
        context.term()
        worker.terminate()
        broker.terminate()
        broker.wait(10)


def _wait_for_relay(client: zmq.Socket) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        client.send_multipart(protocol.encode(Command.LIST_MODELS, os.urandom(16)))
        if client.poll(2000):
            reply = protocol.decode(client.recv_multipart())
            if any(m.name == RELAY_MODEL for m in protocol.parse_model_list(reply.fields())):
                return
        time.sleep(0.2)
    raise TimeoutError("the relay worker never joined")


async def api_tokens_per_second(settings: CurveBenchSettings, api_url: str, model: str) -> float:
    client = AsyncOpenAI(base_url=api_url, api_key="bench", max_retries=0, timeout=600)
    await run_level(client, model, 1, 1, 8, first_index=10_000)  # warm-up
    level = await run_level(client, model, settings.streams, settings.streams * settings.requests_per_stream,
                            settings.max_tokens, first_index=0)
    await client.close()
    return level.tokens_per_second


def stack_rate(settings: CurveBenchSettings, keys_dir: Path | None) -> float:
    from worker.model_source import resolve

    model_flag = settings.worker_args[settings.worker_args.index("--model") + 1] if "--model" in settings.worker_args \
        else None
    model = resolve(model_flag).default_name
    with LocalStack(["--max-batch", str(max(16, settings.streams)), *settings.worker_args], keys_dir=keys_dir) as stack:
        return asyncio.run(api_tokens_per_second(settings, stack.api_url, model))


def main() -> None:
    settings = load_settings(CurveBenchSettings)
    results: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as folder:
        keys_dir = make_keys(Path(folder) / "keys")
        for label, curve in (("plain", None), ("curve", keys_dir)):
            results[f"relay_frames_per_second_{label}"] = relay_rate(settings, curve)
            print(f"broker relay, {label:5}: {results[f'relay_frames_per_second_{label}']:9.0f} frames/s", flush=True)
        if settings.streams:
            for label, curve in (("plain", None), ("curve", keys_dir)):
                results[f"api_tokens_per_second_{label}"] = stack_rate(settings, curve)
                print(f"API at {settings.streams} streams, {label:5}: "
                      f"{results[f'api_tokens_per_second_{label}']:7.1f} tok/s", flush=True)
    print()
    print(f"CURVE relays {results['relay_frames_per_second_curve'] / results['relay_frames_per_second_plain']:.0%} "
          "of the plain bus's frames per second", end="")
    if settings.streams:
        print(f"; the whole stack at {settings.streams} streams keeps "
              f"{results['api_tokens_per_second_curve'] / results['api_tokens_per_second_plain']:.0%} of its tokens/s")
    else:
        print()
    settings.output_dir.mkdir(parents=True, exist_ok=True)
    path = settings.output_dir / "curve.json"
    path.write_text(json.dumps({"settings": settings.model_dump(mode="json"), "results": results}, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
