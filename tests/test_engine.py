"""The engine driven by a fake runner: admission, stop tokens, stop strings, lengths, cancel, failures."""

from __future__ import annotations

import msgpack

from broker.protocol import Command
from worker.engine import Engine
from worker.prompt import PromptEncoder
from worker.runner import TokenChoice
from worker.scheduler import Scheduler, SchedulerLimits

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


class SplitCharTokenizer(CharTokenizer):
    """CharTokenizer, except that one token holds a space and the first half of an emoji."""

    SPLIT = 0x3000

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        pieces = (b" \xf0\x9f" if i == self.SPLIT else chr(i).encode() for i in ids if i != EOS)
        return b"".join(pieces).decode("utf-8", errors="replace")


class ScriptedRunner:
    """Plays back a script of characters per prompt; records what it was asked to do."""

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

    def decode(self):
        if self.fail_next_decode:
            raise RuntimeError("device lost")
        return [self._next(s) for s in self.rows]

    def release(self, sequences):
        if self.fail_next_release:
            self.fail_next_release = False
            raise RuntimeError("out of memory")
        self.released.extend(sequences)
        self.rows = [s for s in self.rows if s not in sequences]

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
    return engine.add(rid, msgpack.packb({"model": "m", "prompt": prompt, **params}))


def run(engine: Engine, events: list | None = None) -> dict[bytes, tuple[str, dict | None]]:
    """Step until idle; `events` are those of steps already taken."""
    texts: dict[bytes, str] = {}
    done: dict[bytes, dict] = {}
    events = list(events or [])
    while events or engine.has_work:
        for event in events or engine.step():
            if event.command is Command.TOKEN:
                texts[event.request_id] = texts.get(event.request_id, "") + event.fields["text"]
            else:
                assert event.request_id not in done, "exactly one final message per request"
                done[event.request_id] = {"command": event.command, **event.fields}
        events = []
    return {rid: (texts.get(rid, ""), done.get(rid)) for rid in done}


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
    assert event.fields["finish_reason"] == "cancelled"
    assert runner.rows == [] and not engine.has_work
    assert engine.cancel(b"a" * 16) == []  # cancelling twice does nothing


def test_bad_requests_and_oversized_prompts_are_answered_at_once():
    engine, _ = make_engine({})
    [error] = engine.add(b"x" * 16, b"\xc1")
    assert error.command is Command.ERROR and error.fields["code"] == "bad_request"
    [error] = add(engine, b"y" * 16, "p" * 70)
    assert error.fields["code"] == "context_length_exceeded"
    [error] = add(engine, b"z" * 16, "p", max_tokens=64)
    assert error.fields["code"] == "context_length_exceeded"
    [error] = engine.add(b"w" * 16, msgpack.packb({"model": "m", "messages": [{"role": "user", "content": "hi"}]}))
    assert error.fields["code"] == "bad_request" and "chat template" in error.fields["message"]
    [error] = add(engine, b"v" * 16, "")
    assert error.fields["code"] == "bad_request" and "empty" in error.fields["message"]
    assert not engine.has_work


def test_a_failing_step_ends_every_request_in_it_with_an_error():
    engine, runner = make_engine({"a": "a" * 10, "b": "b" * 10})
    add(engine, b"a" * 16, "a")
    add(engine, b"b" * 16, "b")
    engine.step()
    runner.fail_next_decode = True
    events = engine.step()
    assert {(e.request_id, e.fields["code"]) for e in events} == {(b"a" * 16, "internal_error"),
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
    events = []
    while engine.has_work:
        events += engine.step()
    tokens = [(e.fields["text"], e.fields["num_tokens"]) for e in events if e.command is Command.TOKEN]
    assert tokens == [("a", 1), ("b", 1), ("xyq", 3)]


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
    assert [(e.request_id, e.command) for e in failed if e.command is Command.ERROR] == [(b"b" * 16, Command.ERROR)]
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
