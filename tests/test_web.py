"""The browser chat's endpoints through gradio_client, over a real bus with the tiny model.

The tiny model has random weights: at temperature 0 it writes only newlines (which also exercises
the empty-reply notice), at temperature 1 random words. What reaches the worker is checked through
its own count of prompt tokens, which a context-length error reports.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from gradio_client import Client
from pydantic import ValidationError

from broker.protocol import Command, Done, FinishReason
from broker.settings import load_settings
from frontends.client import SyncBusClient
from frontends.web.chat import NOT_LOGGED_IN
from frontends.web.config import WebSettings
from tests.helpers import TINY_MODEL, wait_for_models
from tests.processes import free_address, running_web, start_broker, start_worker, stop
from tests.raw_worker import RawWorker

TOKEN = "open-sesame"
BUSY_MODEL = "tiny-b"  # a second model, capacity 1
HEARTBEAT = ("--heartbeat-interval", "0.5")  # a killed worker is noticed within 1.5 s


def text(message: dict) -> str:
    """The text of one chat message as gradio_client returns it (a list of parts)."""
    content = message["content"]
    return content if isinstance(content, str) else "".join(part.get("text", "") for part in content)


def title(message: dict) -> str | None:
    return (message.get("metadata") or {}).get("title")


def in_flight(address: str, model: str) -> int:
    with SyncBusClient(address) as client:
        return sum(m.in_flight for m in client.models() if m.name == model)


def wait_until(predicate, timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not reached in {timeout}s")
        time.sleep(0.1)


def log_in(url: str) -> Client:
    client = Client(url, verbose=False)
    assert client.predict(TOKEN, api_name="/login") == ""
    return client


def chat(client: Client, message: str, history=(), model=TINY_MODEL, system="", temperature=1.0,
         max_tokens=32) -> list[dict]:
    history, box = client.predict(message, list(history), model, system, temperature, 1.0, max_tokens,
                                  api_name="/chat")
    # The message box empties once the message is sent; refused, it keeps the text for another try.
    assert box == ("" if title(history[-1]) != "Not logged in" else message)
    return history


def prompt_tokens(client: Client, message: str, history=(), system="") -> int:
    """How many tokens the worker built from this turn: asking for the whole context makes it say."""
    error = chat(client, message, history, system=system, max_tokens=512)[-1]
    assert title(error) == "Conversation too long", text(error)
    return int(re.search(r"prompt has (\d+) tokens", text(error)).group(1))


@pytest.fixture(scope="module")
def stack(tiny_model_dir, tmp_path_factory) -> Iterator[tuple[str, str, Path]]:
    """(bus address, page URL, votes file): a broker that queues nothing, 'tiny' and 'tiny-b', the page."""
    address = free_address()
    votes = tmp_path_factory.mktemp("web") / "votes.jsonl"
    processes = [start_broker(address, "--max-queue", "0", *HEARTBEAT)]
    try:
        processes.append(start_worker(address, tiny_model_dir, "--model-names", TINY_MODEL, "--max-batch", "4",
                                      *HEARTBEAT))
        processes.append(start_worker(address, tiny_model_dir, "--model-names", BUSY_MODEL, "--max-batch", "1",
                                      *HEARTBEAT))
        asyncio.run(wait_for_models(address, {TINY_MODEL, BUSY_MODEL}))
        with running_web(address, "--auth-token", TOKEN, "--votes-file", str(votes)) as url:
            yield address, url, votes
    finally:
        for process in reversed(processes):
            stop(process)


def test_every_endpoint_refuses_until_the_token_is_given(stack):
    _, url, votes = stack
    client = Client(url, verbose=False)
    [reply] = chat(client, "Hi")[-1:]
    assert title(reply) == "Not logged in" and "access token" in text(reply)
    [reply] = client.predict([{"role": "user", "content": [{"type": "text", "text": "Hi"}]}], TINY_MODEL, "", 1.0, 1.0, 32,
                             api_name="/regenerate")[-1:]
    assert title(reply) == "Not logged in"
    assert client.predict("Hi", TINY_MODEL, TINY_MODEL, 1.0, 1.0, 32, api_name="/compare") == (
        f"⚠️ {NOT_LOGGED_IN}",) * 2
    assert "Log in" in client.predict(api_name="/vote_tie")
    *dropdowns, status = client.predict("", "", "", api_name="/models")
    assert status == "" and all("choices" not in d for d in dropdowns), "the model list is shown only after login"

    assert "Token incorrect" in client.predict("wrong", api_name="/login")
    assert "Token incorrect" in client.predict("", api_name="/login")
    assert title(chat(client, "Hi")[-1]) == "Not logged in", "a wrong token must not let the session in"
    assert client.predict(TOKEN, api_name="/login") == ""
    reply = chat(client, "Hi")[-1]
    assert reply["role"] == "assistant" and title(reply) is None and text(reply)
    assert not votes.exists()


def test_model_list_shows_live_models(stack):
    _, url, _ = stack
    client = log_in(url)
    model, model_a, model_b, status = client.predict("", "", BUSY_MODEL, api_name="/models")
    labels = {value: label for label, value in model["choices"]}
    assert set(labels) == {TINY_MODEL, BUSY_MODEL} and status == "2 models live"
    assert labels[TINY_MODEL].startswith(f"{TINY_MODEL} — 1 worker, ") and labels[BUSY_MODEL].endswith("/1 busy")
    assert model["value"] in labels and model_b["value"] == BUSY_MODEL  # a served choice is kept


def test_reply_streams_and_history_and_system_prompt_reach_the_model(stack):
    _, url, _ = stack
    client = log_in(url)
    job = client.submit("Tell me something.", [], TINY_MODEL, "", 1.0, 1.0, 48, api_name="/chat")
    history, _ = job.result(timeout=120)
    growing = [text(h[-1]) for h, _ in job.outputs() if h and h[-1]["role"] == "assistant"]
    growing = [t for i, t in enumerate(growing) if t and (i == 0 or t != growing[i - 1])]
    assert len(growing) >= 3, f"the reply should arrive in pieces, got {growing}"
    # The chat tidies whitespace (a space before a line break goes), so compare words and single spaces.
    words = [" ".join(t.split()) for t in growing]
    broken = [(earlier, later) for earlier, later in zip(words, words[1:]) if not later.startswith(earlier)]
    assert not broken, broken
    assert [m["role"] for m in history] == ["user", "assistant"] and text(history[-1]) == growing[-1]

    alone = prompt_tokens(client, "And then?")
    with_history = prompt_tokens(client, "And then?", history)
    assert with_history >= alone + 5 + len(growing[-1].split()) // 4  # both earlier turns went in
    # The template may add a default system prompt of its own, so compare two of ours.
    short = prompt_tokens(client, "And then?", system="Be brief.")
    long = prompt_tokens(client, "And then?", system="Be brief. " + "You are a pirate who answers in rhymes. " * 5)
    assert long >= short + 5 * 8
    # A note shown in the page (an error) is not a turn: the model never sees it.
    noted = history + chat(client, "Hi", model="no-such-model")[-1:]
    assert title(noted[-1]) == "Model not available"
    assert prompt_tokens(client, "And then?", noted) == with_history


def test_regenerate_replaces_the_last_answer(stack):
    _, url, _ = stack
    client = log_in(url)
    history = chat(client, "Hi")
    again = client.predict(history, TINY_MODEL, "", 1.0, 1.0, 32, api_name="/regenerate")
    assert [m["role"] for m in again] == ["user", "assistant"] and text(again[0]) == "Hi"
    assert title(again[-1]) is None and text(again[-1])
    [note] = client.predict([], TINY_MODEL, "", 1.0, 1.0, 32, api_name="/regenerate")
    assert title(note) == "Nothing to regenerate"
    assert client.predict(api_name="/clear") == ([], "")


def test_errors_show_in_the_chat(stack):
    _, url, _ = stack
    client = log_in(url)
    [user, reply] = chat(client, "Hi", temperature=0)
    assert text(user) == "Hi" and title(reply) == "Empty reply", "a blank answer must not look like nothing"
    reply = chat(client, "Hi", model="no-such-model")[-1]
    assert title(reply) == "Model not available" and "no-such-model" in text(reply)
    assert title(chat(client, "Hi", model="")[-1]) == "Model not available"


def test_busy_model_says_so_and_cancelling_stops_the_request_on_the_bus(stack):
    address, url, _ = stack
    worker = RawWorker(address, "raw-busy")  # capacity 1; a reply ends only when the test says so
    try:
        asyncio.run(wait_for_models(address, {"raw-busy"}))
        first, second = log_in(url), log_in(url)
        job = first.submit("Hi", [], "raw-busy", "", 0.0, 1.0, 400, api_name="/chat")
        request = worker.next(Command.REQUEST)
        worker.send(Command.TOKEN, request.request_id, {"text": "Hello"})
        reply = chat(second, "Hi", model="raw-busy")[-1]
        assert title(reply) == "Model busy" and "busy" in text(reply)
        job.cancel()
        assert worker.next(Command.CANCEL).request_id == request.request_id
        worker.send(Command.DONE, request.request_id, Done(FinishReason.CANCELLED, 3, 1).to_fields())
        wait_until(lambda: in_flight(address, "raw-busy") == 0, what="the cancelled reply leaving the worker")
        job = second.submit("Hi", [], "raw-busy", "", 0.0, 1.0, 400, api_name="/chat")
        request = worker.next(Command.REQUEST)
        worker.send(Command.TOKEN, request.request_id, {"text": "Free again"})
        worker.send(Command.DONE, request.request_id, Done(FinishReason.STOP, 3, 2).to_fields())
        history, _ = job.result(timeout=30)
        assert text(history[-1]) == "Free again" and title(history[-1]) is None
    finally:
        worker.close()


def test_worker_dying_mid_reply_keeps_the_partial_answer_and_says_why(stack, tiny_model_dir):
    address, url, _ = stack
    doomed = start_worker(address, tiny_model_dir, "--model-names", "doomed", "--max-batch", "1", *HEARTBEAT)
    try:
        asyncio.run(wait_for_models(address, {"doomed"}))
        client = log_in(url)
        job = client.submit("Tell me a long story.", [], "doomed", "", 1.0, 1.0, 400, api_name="/chat")
        wait_until(lambda: any(text(h[-1]).strip() for h, _ in job.outputs() if h and h[-1]["role"] == "assistant"),
                   what="the first words of the reply")
        os.kill(doomed.pid, signal.SIGKILL)
        history, _ = job.result(timeout=60)
    finally:
        stop(doomed)
    partial, error = history[-2:]
    assert partial["role"] == "assistant" and title(partial) is None and text(partial).strip()
    assert title(error) == "Worker stopped" and "worker" in text(error).lower()
    # The model is gone now: the next message says so instead of waiting.
    assert title(chat(client, "Hi", model="doomed")[-1]) in ("No worker for this model", "Model not available")


def test_side_by_side_answers_and_votes_go_to_the_file(stack):
    _, url, votes = stack
    client = log_in(url)
    job = client.submit("Name a color.", TINY_MODEL, BUSY_MODEL, 1.0, 0.5, 24, api_name="/compare")
    answer_a, answer_b = job.result(timeout=120)
    assert answer_a.strip() and answer_b.strip() and "⚠️" not in answer_a + answer_b
    both_growing = {side for a, b in job.outputs() for side, answer in ((0, a), (1, b))
                    if answer and answer not in (answer_a, answer_b)}
    assert both_growing == {0, 1}, "both answers should stream"
    assert "Recorded: B is better" in client.predict(api_name="/vote_right")
    assert "Nothing to vote on" in client.predict(api_name="/vote_left"), "one vote per comparison"

    # The same model with two settings; one side failing means there is nothing fair to vote on.
    same = client.predict("Name a color.", TINY_MODEL, TINY_MODEL, 0.0, 1.0, 24, api_name="/compare")
    assert same[0].startswith("⚠️ The model finished without") and same[1].strip()
    assert "Nothing to vote on" in client.predict(api_name="/vote_tie")
    broken = client.predict("Name a color.", TINY_MODEL, "no-such-model", 1.0, 1.0, 24, api_name="/compare")
    assert broken[0].strip() and not broken[0].startswith("⚠️") and broken[1].startswith("⚠️ Model not available")

    blank = client.predict("  ", TINY_MODEL, TINY_MODEL, 1.0, 1.0, 24, api_name="/compare")
    assert blank == ("⚠️ Type a prompt first.",) * 2
    assert "Nothing to vote on" in client.predict(api_name="/vote_left")

    # Votes arriving together still count once per comparison.
    again = client.predict("Name a color.", TINY_MODEL, BUSY_MODEL, 1.0, 0.5, 24, api_name="/compare")
    assert "⚠️" not in again[0] + again[1]
    ballots = [client.submit(api_name="/vote_tie") for _ in range(16)]
    assert sum("Recorded" in ballot.result(timeout=60) for ballot in ballots) == 1

    first, tie = [json.loads(line) for line in votes.read_text().splitlines()]
    assert tie["vote"] == "tie"
    vote = first
    assert vote["vote"] == "right" and vote["prompt"] == "Name a color."
    assert vote["a"] == {"model": TINY_MODEL, "temperature": 1.0, "answer": answer_a}
    assert vote["b"] == {"model": BUSY_MODEL, "temperature": 0.5, "answer": answer_b}


def test_without_a_broker_the_page_says_so():
    with running_web(free_address()) as url:  # no --auth-token: open, no login needed
        client = Client(url, verbose=False)
        *_, status = client.predict("", "", "", api_name="/models")
        assert status.startswith("⚠️ Broker unreachable")
        reply = chat(client, "Hi", model=TINY_MODEL)[-1]
        assert title(reply) == "Broker unreachable"


def test_an_empty_access_token_is_refused_at_start():
    with pytest.raises(ValidationError, match="auth_token"):
        load_settings(WebSettings, ["--auth-token", ""])
