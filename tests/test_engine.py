"""The engine driven by a fake runner: admission, stop tokens, stop strings, lengths, cancel, failures;
token counts with the tiny real model, in the engine and over the bus; the server's parsing of REQUEST
bodies."""

from __future__ import annotations

import pytest

from broker import protocol
from broker.protocol import Command, GenerationRequest, Message
from broker.settings import load_settings
from frontends.client import BusClient
from tests.helpers import HELLO, TINY_MODEL
from worker.__main__ import build_engine
from worker.config import WorkerSettings
from worker.engine import Engine
from worker.engine_api import DoneEvent, ErrorEvent, TokenEvent
from worker.prompt import PromptEncoder
from worker.sampling import TokenChoice
from worker.scheduler import Scheduler, SchedulerLimits
from worker.server import WorkerServer, event_frames

EOS = 0


class CharTokenizer:
    """One token per character (id = code point); id 0 is the end of turn. No chat template."""

    chat_template = None
    eos_token_id = EOS
    all_special_ids = [EOS]

    def __call__(self, text: str, add_special_tokens: bool = True):
        return type("Encoding", (), {"input_ids": [ord(c) for c in text]})()

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return "".join(chr(i) for i in ids if i != EOS)

    def convert_ids_to_tokens(self, token_id: int) -> str:
        return chr(token_id)


class SplitCharTokenizer(CharTokenizer):
    """CharTokenizer, except that one token holds a space and the first half of an emoji."""

    SPLIT = 0x3000

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        pieces = (b" \xf0\x9f" if i == self.SPLIT else chr(i).encode() for i in ids if i != EOS)
        return b"".join(pieces).decode("utf-8", errors="replace")


class ScriptedRunner:
    """Plays back a script of characters per prompt; records what it was asked to do. Like the real
    runner, it keeps rows only for the sequences it prefilled, and decodes exactly those."""

    prefixes = None  # no prefix cache

    def __init__(self, scripts: dict[str, str]) -> None:
        self.scripts = scripts
        self.rows: list = []
        self.released: list = []
        self.fail_next_decode = False
        self.fail_next_prefill = False
        self.fail_next_release = False
        self.chunks: list[tuple[str, int, int]] = []

    def prefill(self, sequences):
        if self.fail_next_prefill:
            self.fail_next_prefill = False
            raise RuntimeError("out of memory")
        self.rows.extend(sequences)
        return [self._next(s) for s in sequences]

    def prefill_chunk(self, sequence, start, end):
        self.chunks.append((sequence.request.prompt, start, end))
        if end < len(sequence.prompt_ids):
            return None
        return self.prefill([sequence])[0]

    def decode(self, batch):
        assert list(map(id, batch)) == list(map(id, self.rows)), "decode the cached rows, in row order"
        if self.fail_next_decode:
            raise RuntimeError("device lost")
        return [self._next(s) for s in batch]

    def release(self, batch, leaving, keep=True):
        assert [id(s) for s in batch] == [id(s) for s in self.rows], "the batch is the cached rows, in row order"
        if self.fail_next_release:
            self.fail_next_release = False
            raise RuntimeError("out of memory")
        self.released.extend(leaving)
        self.rows = [s for s in self.rows if s not in leaving]

    def _next(self, sequence) -> TokenChoice:
        script = self.scripts[sequence.request.prompt]
        position = len(sequence.output_ids)
        return TokenChoice(ord(script[position]) if position < len(script) else EOS)


def make_engine(scripts: dict[str, str], max_batch: int = 4, max_prefill_tokens: int = 10_000,
                tokenizer: CharTokenizer | None = None) -> tuple[Engine, ScriptedRunner]:
    runner = ScriptedRunner(scripts)
    scheduler = Scheduler(SchedulerLimits(max_batch=max_batch, max_batch_tokens=10_000,
                                          max_prefill_tokens=max_prefill_tokens))
    return Engine(runner, PromptEncoder(tokenizer or CharTokenizer(), EOS), scheduler, context_length=64), runner


def add(engine: Engine, rid: bytes, prompt: str, **params) -> list:
    return engine.add(rid, GenerationRequest(model="m", prompt=prompt, **params))


def final(event) -> dict:
    """A DONE or ERROR event as its command and body fields."""
    if isinstance(event, DoneEvent):
        return {"command": Command.DONE, **event.done.to_fields()}
    return {"command": Command.ERROR, **event.error.to_fields()}


def run(engine: Engine, events: list | None = None) -> dict[bytes, tuple[str, dict | None]]:
    """Step until idle; `events` are those of steps already taken. Checks on the way that each
    request's TOKEN frames count exactly the tokens its DONE reports."""
    texts: dict[bytes, str] = {}
    counted: dict[bytes, int] = {}
    done: dict[bytes, dict] = {}
    events = list(events or [])
    while events or engine.has_work:
        for event in events or engine.step():
            assert event.request_id not in done, "nothing after the final message"
            if isinstance(event, TokenEvent):
                texts[event.request_id] = texts.get(event.request_id, "") + event.delta.text
                counted[event.request_id] = counted.get(event.request_id, 0) + event.delta.num_tokens
            else:
                done[event.request_id] = final(event)
                if isinstance(event, DoneEvent) and event.done.finish_reason.value != "cancelled":
                    assert counted.get(event.request_id, 0) == event.done.completion_tokens
        events = []
    return {rid: (texts.get(rid, ""), done.get(rid)) for rid in done}


def frames(engine: Engine, rid: bytes) -> list[tuple[str, int]]:
    """Step until idle; the (text, num_tokens) of each TOKEN frame for `rid`, then its finish reason."""
    out = []
    while engine.has_work:
        for event in engine.step():
            if event.request_id == rid:
                out.append((event.delta.text, event.delta.num_tokens) if isinstance(event, TokenEvent)
                           else event.done.finish_reason.value)
    return out


def test_end_of_turn_stop_string_and_length_in_one_batch():
    engine, runner = make_engine({"a": "hello", "b": "one, two STOP three", "c": "abcdefgh"})
    assert add(engine, b"a" * 16, "a") == []
    assert add(engine, b"b" * 16, "b", stop=["STOP"]) == []
    assert add(engine, b"c" * 16, "c", max_tokens=3) == []
    results = run(engine)
    assert results[b"a" * 16] == ("hello", {"command": Command.DONE, "finish_reason": "stop", "prompt_tokens": 1,
                                           "completion_tokens": 6})
    assert results[b"b" * 16][0] == "one, two " and results[b"b" * 16][1]["finish_reason"] == "stop"
    assert results[b"c" * 16] == ("abc", {"command": Command.DONE, "finish_reason": "length", "prompt_tokens": 1,
                                         "completion_tokens": 3})
    assert runner.rows == [] and len(runner.released) == 3


def test_requests_join_a_running_batch_when_a_place_frees():
    engine, runner = make_engine({"a": "xx", "b": "yyyy", "c": "z"}, max_batch=2)
    for rid, prompt in ((b"a" * 16, "a"), (b"b" * 16, "b"), (b"c" * 16, "c")):
        add(engine, rid, prompt)
    first = engine.step()
    assert [s.request.prompt for s in runner.rows] == ["a", "b"]
    results = run(engine, first)
    assert {rid: text for rid, (text, _) in results.items()} == {b"a" * 16: "xx", b"b" * 16: "yyyy", b"c" * 16: "z"}


def test_cancel_frees_the_row_before_the_next_step():
    engine, runner = make_engine({"a": "a" * 40})
    add(engine, b"a" * 16, "a")
    engine.step()
    [event] = engine.cancel(b"a" * 16)
    assert event.done.finish_reason.value == "cancelled"
    assert runner.rows == [] and not engine.has_work
    assert engine.cancel(b"a" * 16) == []  # cancelling twice does nothing


def test_a_cancel_that_crosses_the_done_does_nothing():
    engine, runner = make_engine({"a": "ab", "b": "b" * 10})
    add(engine, b"a" * 16, "a")
    add(engine, b"b" * 16, "b")
    events = []
    while not any(isinstance(e, DoneEvent) and e.request_id == b"a" * 16 for e in events):
        events += engine.step()
    released = list(runner.released)
    assert engine.cancel(b"a" * 16) == []  # its DONE is on the way: the broker frees the slot on it
    assert runner.released == released and [s.request_id for s in engine.scheduler.running] == [b"b" * 16]
    assert run(engine, events)[b"b" * 16] == ("b" * 10, {"command": Command.DONE, "finish_reason": "stop",
                                                  "prompt_tokens": 1, "completion_tokens": 11})


def test_requests_that_cannot_run_are_answered_at_once():
    engine, _ = make_engine({})
    [error] = add(engine, b"y" * 16, "p" * 70)
    assert error.error.code.value == "context_length_exceeded"
    [error] = add(engine, b"z" * 16, "p", max_tokens=64)
    assert error.error.code.value == "context_length_exceeded"
    [error] = engine.add(b"w" * 16, GenerationRequest(model="m", messages=(protocol.ChatMessage("user", "hi"),)))
    assert error.error.code.value == "bad_request" and "chat template" in error.error.message
    [error] = add(engine, b"v" * 16, "")
    assert error.error.code.value == "bad_request" and "empty" in error.error.message
    assert not engine.has_work


def test_the_server_answers_a_body_it_cannot_parse_and_frames_the_engine_events():
    engine, _ = make_engine({"a": "hi"})
    server = WorkerServer(engine, protocol.Ready("w", ("m",), 1), "tcp://127.0.0.1:1")
    for body in (b"\xc1", protocol.encode(Command.REQUEST, b"", {"model": "m"})[3],
                 protocol.encode(Command.REQUEST, b"", {"model": "m", "prompt": "a", "temperature": 9})[3]):
        [error] = server.on_command(Message(Command.REQUEST, b"x" * 16, body))
        assert isinstance(error, ErrorEvent) and error.error.code.value == "bad_request"
        assert protocol.decode(event_frames(error)).command is Command.ERROR
    assert not engine.has_work
    body = protocol.encode(Command.REQUEST, b"", {"model": "m", "prompt": "a"})[3]
    assert server.on_command(Message(Command.REQUEST, b"a" * 16, body)) == []
    messages = [protocol.decode(event_frames(e)) for e in engine.step() + engine.step() + engine.step()]
    assert [m.command for m in messages] == [Command.TOKEN] * 3 + [Command.DONE]
    assert {m.request_id for m in messages} == {b"a" * 16}
    assert [m.fields() for m in messages[:3]] == [{"text": "h", "num_tokens": 1, "token_ids": [104]},
                                                   {"text": "i", "num_tokens": 1, "token_ids": [105]},
                                                   {"text": "", "num_tokens": 1, "token_ids": [0]}]
    assert messages[3].fields() == {"finish_reason": "stop", "prompt_tokens": 1, "completion_tokens": 3}


def test_a_failing_step_ends_every_request_in_it_with_an_error():
    engine, runner = make_engine({"a": "a" * 10, "b": "b" * 10})
    add(engine, b"a" * 16, "a")
    add(engine, b"b" * 16, "b")
    engine.step()
    runner.fail_next_decode = True
    events = engine.step()
    assert {(e.request_id, e.error.code.value) for e in events} == {(b"a" * 16, "internal_error"),
                                                                     (b"b" * 16, "internal_error")}
    assert not engine.has_work and runner.rows == []


def test_a_failing_decode_keeps_the_events_its_step_already_made():
    engine, runner = make_engine({"a": "a" * 10, "b": "b", "c": ""})
    add(engine, b"a" * 16, "a")
    engine.step()
    add(engine, b"b" * 16, "b")  # joins with its one letter, then ends at the decode that fails
    add(engine, b"c" * 16, "c")  # joins and ends at once: its first token is the end of turn
    runner.fail_next_decode = True
    events = engine.step()
    results = run(engine, events)
    assert results[b"c" * 16] == ("", {"command": Command.DONE, "finish_reason": "stop",
                                       "prompt_tokens": 1, "completion_tokens": 1})
    assert results[b"b" * 16][0] == "b" and results[b"b" * 16][1]["code"] == "internal_error"
    assert results[b"a" * 16][1]["code"] == "internal_error"


def test_a_request_that_finished_before_its_step_failed_gets_no_error_after_its_done():
    engine, runner = make_engine({"a": "a", "b": "b" * 6})
    add(engine, b"a" * 16, "a")
    add(engine, b"b" * 16, "b")
    runner.fail_next_release = True  # "a" ends at the first decode, and letting its row go fails
    results = run(engine)  # asserts exactly one final message per request
    assert results[b"a" * 16] == ("a", {"command": Command.DONE, "finish_reason": "stop",
                                       "prompt_tokens": 1, "completion_tokens": 2})
    assert results[b"b" * 16][1]["code"] == "internal_error"


def test_a_token_frame_counts_the_tokens_held_back_before_it():
    engine, _ = make_engine({"a": "abxyq"})
    add(engine, b"a" * 16, "a", stop=["xyz"])  # "x" and "y" wait: they might start the stop string
    # the end of turn brings no text: a last frame counts it
    assert frames(engine, b"a" * 16) == [("a", 1), ("b", 1), ("xyq", 3), ("", 1), "stop"]


def test_tokens_still_uncounted_at_the_end_get_a_last_frame_before_done():
    engine, _ = make_engine({"a": "abxyz", "b": "abxy", "c": "ab", "d": ""})
    add(engine, b"a" * 16, "a", stop=["xyz"])  # the stop string swallows three tokens
    assert frames(engine, b"a" * 16) == [("a", 1), ("b", 1), ("", 3), "stop"]
    add(engine, b"b" * 16, "b", stop=["xyz"], max_tokens=4)  # held back "xy" comes out at the length limit
    assert frames(engine, b"b" * 16) == [("a", 1), ("b", 1), ("xy", 2), "length"]
    add(engine, b"c" * 16, "c", stop=["bq"])  # "b" held back, then the end of turn: it was plain text
    assert frames(engine, b"c" * 16) == [("a", 1), ("b", 2), "stop"]
    add(engine, b"d" * 16, "d")  # an end of turn at once
    assert frames(engine, b"d" * 16) == [("", 1), "stop"]
    add(engine, b"e" * 16, "a", stop=["xyz"], logprobs=True)  # with logprobs every token has its frame
    assert frames(engine, b"e" * 16) == [("a", 1), ("b", 1), ("", 1), ("", 1), ("", 1), "stop"]


def test_an_end_of_turn_after_half_a_character_keeps_the_text_before_it():
    engine, _ = make_engine({"a": "hi" + chr(SplitCharTokenizer.SPLIT)}, tokenizer=SplitCharTokenizer())
    add(engine, b"a" * 16, "a", stop=["zz"])
    assert run(engine)[b"a" * 16][0] == "hi "


def test_a_failing_prefill_ends_only_the_joining_requests():
    engine, runner = make_engine({"a": "a" * 6, "b": "b" * 6})
    add(engine, b"a" * 16, "a")
    first = engine.step()
    add(engine, b"b" * 16, "b")
    runner.fail_next_prefill = True
    failed = engine.step()
    assert [e.request_id for e in failed if isinstance(e, ErrorEvent)] == [b"b" * 16]
    results = run(engine, first + failed)
    assert results[b"a" * 16][0] == "aaaaaa" and results[b"a" * 16][1]["finish_reason"] == "stop"


def test_drop_all_forgets_every_request_silently():
    engine, runner = make_engine({"a": "a" * 10, "b": "b" * 10}, max_batch=1)
    add(engine, b"a" * 16, "a")
    add(engine, b"b" * 16, "b")
    engine.step()  # a runs, b waits
    engine.drop_all()
    assert not engine.has_work and runner.rows == []


def test_a_request_id_sent_again_starts_over():
    engine, runner = make_engine({"a": "abc"})
    add(engine, b"a" * 16, "a")
    engine.step()
    add(engine, b"a" * 16, "a")
    assert len(runner.rows) == 0 and len(engine.scheduler.waiting) == 1
    text, done = run(engine)[b"a" * 16]
    assert text == "abc" and done["finish_reason"] == "stop"


def test_a_long_prompt_joins_chunk_by_chunk_while_others_stream():
    long_prompt = "L" * 25
    engine, runner = make_engine({"a": "a" * 8, long_prompt: "long answer"}, max_prefill_tokens=10)
    add(engine, b"a" * 16, "a")
    first = engine.step()
    add(engine, b"l" * 16, long_prompt)
    steps = [engine.step() for _ in range(3)]
    assert runner.chunks == [(long_prompt, 0, 10), (long_prompt, 10, 20), (long_prompt, 20, 25)]
    assert all(any(e.request_id == b"a" * 16 for e in events) for events in steps), "a streams on every step"
    results = run(engine, first + [e for events in steps for e in events])
    assert results[b"l" * 16][0] == "long answer" and results[b"a" * 16][0] == "a" * 8


@pytest.fixture(scope="module")
def tiny_engine(tiny_model_dir):
    engine, _ = build_engine(load_settings(WorkerSettings, ["--model", str(tiny_model_dir), "--device", "cpu",
                                                            "--dtype", "float32"]))
    return engine


def test_token_frames_add_up_to_the_completion_tokens_with_the_tiny_model(tiny_engine):
    """`run` checks the sum of each stream's `num_tokens` against its DONE, for every way to end."""
    engine = tiny_engine
    chat = (protocol.ChatMessage("user", "What is the capital of France?"),)

    def ask(rid: bytes, **params):  # seeded draws: greedy, the random model repeats one token
        assert engine.add(rid, GenerationRequest(model="m", messages=chat, seed=3, **params)) == []
        sequence = engine.scheduler.find(rid)
        text, done = run(engine)[rid]
        return text, done, sequence.output_ids

    for logprobs in (False, True):
        text, done, ids = ask(b"l" * 16, max_tokens=12, logprobs=logprobs)
        assert done["finish_reason"] == "length" and done["completion_tokens"] == 12 and text

        stop = text[len(text) // 3:len(text) // 3 + 2]
        stopped, done, _ = ask(b"s" * 16, max_tokens=12, stop=[stop], logprobs=logprobs)
        assert done["finish_reason"] == "stop" and stopped == text[:text.index(stop)]

        # The model's end of turn, played by a token it writes: its last token brings no text.
        k = next(i for i in range(4, 12) if ids[i] not in ids[:i])
        end_of_turn = engine.prompts.stop_token_ids
        engine.prompts.stop_token_ids = end_of_turn | {ids[k]}
        try:
            ended, done, _ = ask(b"e" * 16, max_tokens=12, logprobs=logprobs)
        finally:
            engine.prompts.stop_token_ids = end_of_turn
        assert done["finish_reason"] == "stop" and done["completion_tokens"] == k + 1 and text.startswith(ended)


async def test_token_frames_add_up_to_the_completion_tokens_over_the_bus(bus):
    async def ask(client: BusClient, **params) -> tuple[str, int, protocol.Done]:
        stream = await client.chat(TINY_MODEL, HELLO, seed=3, max_tokens=12, **params)
        deltas = [delta async for delta in stream]
        return "".join(d.text for d in deltas), sum(d.num_tokens for d in deltas), stream.done

    async with BusClient(bus.address) as client:
        for logprobs in (False, True):
            text, counted, done = await ask(client, logprobs=logprobs)
            assert done.finish_reason.value == "length" and counted == done.completion_tokens == 12
            stop = text[len(text) // 3:len(text) // 3 + 2]
            stopped, counted, done = await ask(client, stop=[stop], logprobs=logprobs)
            assert done.finish_reason.value == "stop" and stopped == text[:text.index(stop)]
            assert counted == done.completion_tokens
