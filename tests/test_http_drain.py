"""The API and the web chat as services: /ready for load balancers, and the drain on SIGTERM, over
real processes.

A frozen worker (SIGSTOP) holds a stream open for as long as a test needs, however fast the model.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager

import openai
import pytest
from gradio_client import Client

from frontends.client import SyncBusClient
from tests.helpers import HELLO, TINY_MODEL, Bus, wait_for_models
from tests.processes import free_address, output_of, start_broker, start_web, start_worker, stop
from tests.test_openai_api import Api
from tests.test_web import chat, text, title

# A worker frozen for a few seconds must not be declared dead meanwhile.
SLOW_HEARTBEAT = ("--heartbeat-interval", "10")


def get(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def wait_for(url: str, status: int, timeout: float = 120.0) -> dict:
    """Polls `url` until it answers `status`; returns that body."""
    deadline = time.monotonic() + timeout
    while True:
        answer, body = get(url)
        if answer == status:
            return body
        assert time.monotonic() < deadline, f"{url} still answers {answer} {body}"
        time.sleep(0.1)


@pytest.fixture
def slow_bus(tiny_model_dir) -> Iterator[Bus]:
    """A broker and the tiny model's worker that tolerate a frozen peer for 30 s."""
    address = free_address()
    running = Bus(address, TINY_MODEL, start_broker(address, *SLOW_HEARTBEAT), [])
    try:
        running.workers.append(start_worker(address, tiny_model_dir, "--model-names", TINY_MODEL, *SLOW_HEARTBEAT))
        asyncio.run(wait_for_models(address, {TINY_MODEL}))
        yield running
    finally:
        for process in [*running.workers, running.broker]:
            stop(process)


@contextmanager
def frozen(process: subprocess.Popen) -> Iterator[None]:
    os.kill(process.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(process.pid, signal.SIGCONT)


class Streaming(threading.Thread):
    """A chat stream read to its end on a thread of its own: its first byte may wait on a frozen worker."""

    def __init__(self, api: Api, max_tokens: int) -> None:
        super().__init__(daemon=True)
        self.api, self.max_tokens = api, max_tokens
        self.chunks: list = []
        self.error: Exception | None = None
        self.start()

    def run(self) -> None:
        try:
            self.chunks.extend(self.api.client().chat.completions.create(
                model=TINY_MODEL, messages=HELLO, max_tokens=self.max_tokens, stream=True,
                stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
        except Exception as exc:
            self.error = exc


def in_flight(address: str) -> int:
    with SyncBusClient(address) as client:
        return sum(w.in_flight for w in client.workers())


def wait_until(predicate, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"{what} not reached in {timeout}s"
        time.sleep(0.1)


def test_ready_waits_for_a_live_worker_and_needs_no_key(stack):
    stack.broker()
    api = Api(stack.address, "--api-keys", "secret").wait(503)
    try:
        status, body = get(api.url + "/ready")
        assert status == 503 and body == {"status": "unavailable", "reason": "no worker is live"}
        stack.worker()
        assert wait_for(api.url + "/ready", 200) == {"status": "ok", "models": [TINY_MODEL]}
        with pytest.raises(openai.AuthenticationError):  # the key is still asked for elsewhere
            api.client().models.list()
    finally:
        api.stop()


def test_sigterm_lets_an_open_stream_finish_and_refuses_new_requests(slow_bus):
    api = Api(slow_bus.address).wait()
    try:
        assert get(api.url + "/ready")[0] == 200
        with frozen(slow_bus.workers[0]):  # the stream is open until the worker thaws, however fast the model
            stream = Streaming(api, max_tokens=300)
            wait_until(lambda: in_flight(slow_bus.address) == 1, "the stream reaching the worker")
            api.process.send_signal(signal.SIGTERM)
            assert wait_for(api.url + "/ready", 503)["status"] == "draining"
            with pytest.raises(openai.InternalServerError) as refused:
                api.client().chat.completions.create(model=TINY_MODEL, messages=HELLO, max_tokens=2)
            assert refused.value.status_code == 503 and refused.value.code == "draining"
            assert get(api.url + "/health")[0] == 200, "draining is still alive"
            assert api.process.poll() is None, "the open stream holds the exit"
        stream.join(120)
        assert stream.error is None, repr(stream.error)
        assert stream.chunks[-2].choices[0].finish_reason == "length"
        assert stream.chunks[-1].usage.completion_tokens == 300
        assert api.process.wait(60) == 0
    finally:
        api.stop()


def test_a_stream_longer_than_the_drain_timeout_is_cut_and_the_process_exits(slow_bus):
    api = Api(slow_bus.address, "--drain-timeout", "1").wait()
    try:
        with frozen(slow_bus.workers[0]):
            stream = Streaming(api, max_tokens=300)
            wait_until(lambda: in_flight(slow_bus.address) == 1, "the stream reaching the worker")
            api.process.send_signal(signal.SIGTERM)
            assert api.process.wait(60) == 0
            stream.join(60)
            assert isinstance(stream.error, openai.APIConnectionError), repr(stream.error)
    finally:
        api.stop()


def test_the_web_chat_lets_an_open_reply_finish_on_sigterm_and_refuses_new_ones(slow_bus):
    process, url = start_web(slow_bus.address)
    try:
        client = Client(url, verbose=False)
        with frozen(slow_bus.workers[0]):
            job = client.submit("Hello there", [], TINY_MODEL, "", 1.0, 1.0, 64, api_name="/chat")
            wait_until(lambda: in_flight(slow_bus.address) == 1, "the reply reaching the worker")
            process.send_signal(signal.SIGTERM)
            wait_until(lambda: "draining" in output_of(process), "the drain")
            refused = chat(Client(url, verbose=False), "Hi")[-1]
            assert title(refused) == "Server restarting", text(refused)
            assert process.poll() is None, "the open reply holds the exit"
        history, _ = job.result(timeout=120)
        assert history[-1]["role"] == "assistant"
        assert title(history[-1]) in (None, "Empty reply"), text(history[-1])  # the model's answer, not an error
        assert process.wait(60) == 0
    finally:
        stop(process)
