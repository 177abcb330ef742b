"""Prefix caching end to end: conversations through the OpenAI API over two caching workers, checked
turn by turn against a worker without a cache (the same tiny model under another name)."""

from __future__ import annotations

import os
import signal
import time
import urllib.request

import openai
import pytest

from frontends.client import SyncBusClient
from tests.helpers import TINY_MODEL
from tests.processes import free_port, spawn, stop

PLAIN = "tiny-plain"  # the same model on a worker without a prefix cache
SYSTEM = "You are a careful assistant. Answer every question in one short sentence, and be kind. " * 4


def start_api(address: str):
    port = free_port()
    process = spawn("frontends.openai_api", "--broker", address, "--port", str(port), log_name="api")
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            with urllib.request.urlopen(url + "/health", timeout=5):
                break
        except OSError:
            time.sleep(0.1)
    else:
        stop(process)
        raise TimeoutError(f"the API at {url} never became healthy")
    return process, openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)


def wait_for_workers(bus: SyncBusClient, count: int) -> None:
    for _ in range(600):
        if len(bus.workers()) == count:
            return
        time.sleep(0.1)
    raise TimeoutError(f"never {count} workers")


class Talks:
    """Conversations sent one turn at a time; each turn is checked against the worker without a cache."""

    def __init__(self, api: openai.OpenAI, bus: SyncBusClient, count: int) -> None:
        self.api, self.bus = api, bus
        self.histories = [[{"role": "system", "content": SYSTEM}] for _ in range(count)]

    def served(self) -> dict[str, int]:
        return {w.worker_id: w.served for w in self.bus.workers()}

    def ask(self, talk: int, question: str, max_tokens: int = 8) -> tuple[str, int]:
        """One turn: the worker that served it and its cached prompt tokens."""
        history = self.histories[talk]
        history.append({"role": "user", "content": question})
        before = self.served()
        answer = self.api.chat.completions.create(model=TINY_MODEL, messages=history, temperature=0,
                                                  max_tokens=max_tokens)
        after = self.served()
        [worker] = [w for w, count in after.items() if count != before.get(w, 0)]
        reference = self.api.chat.completions.create(model=PLAIN, messages=history, temperature=0,
                                                     max_tokens=max_tokens)
        text = answer.choices[0].message.content
        assert text == reference.choices[0].message.content, "the cache must never change an answer"
        assert reference.usage.prompt_tokens_details.cached_tokens == 0
        assert answer.usage.prompt_tokens == reference.usage.prompt_tokens
        history.append({"role": "assistant", "content": text})
        return worker, answer.usage.prompt_tokens_details.cached_tokens


@pytest.fixture
def two_caching_workers(stack):
    stack.broker()
    workers = [stack.worker("--threads", "1") for _ in range(2)]
    stack.worker("--threads", "1", "--prefix-cache-tokens", "0", name=PLAIN)
    api, client = start_api(stack.address)
    with SyncBusClient(stack.address) as bus:
        wait_for_workers(bus, 3)
        yield stack, workers, client, bus
    stop(api)


def test_turns_stay_on_the_worker_that_holds_them_and_a_lost_worker_costs_only_speed(two_caching_workers):
    stack, workers, api, bus = two_caching_workers
    talks = Talks(api, bus, 3)
    question = "Talk {0}, turn {1}: think about it with care, and then say what you think of it. " * 2
    placed = [[talks.ask(t, question.format(t, turn)) for turn in range(2)] for t in range(3)]
    # Without affinity, one request at a time alternates between two idle workers; with it, every
    # turn follows the first one, which holds the shared system prompt.
    holder = placed[0][0][0]
    assert {worker for turns in placed for worker, _ in turns} == {holder}
    assert placed[0][0][1] == 0, "the very first prompt is computed"
    assert all(cached >= 16 for t, turns in enumerate(placed) for turn, (_, cached) in enumerate(turns) if t or turn)
    assert placed[0][1][1] > placed[1][0][1], "a later turn reuses its whole history, not only the system prompt"

    # The holder dies while a turn that uses its cache streams: that turn goes on on the other worker...
    victim = next(p for p in workers if holder.endswith(f"-{p.pid}"))
    talks.histories[0].append({"role": "user", "content": "Tell me a long story."})
    stream = api.chat.completions.create(model=TINY_MODEL, messages=talks.histories[0], temperature=0,
                                         max_tokens=250, stream=True)
    next(iter(stream))
    os.kill(victim.pid, signal.SIGKILL)
    assert [chunk.choices[0].finish_reason for chunk in stream if chunk.choices][-1] == "length"
    talks.histories[0].pop()
    wait_for_workers(bus, 2)
    # ... and the conversation goes on, right, on the other worker, which now holds its start: the
    # resumed turn was prefilled there.
    survivor, cached = talks.ask(0, "Tell me a long story.")
    assert survivor != holder and cached > 0
    stack.worker("--threads", "1")  # a fresh worker in the dead one's place, its cache empty
    wait_for_workers(bus, 3)
    worker, cached = talks.ask(0, "And then?")
    assert worker == survivor and cached > 0
