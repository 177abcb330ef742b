"""A request resumed after a fault, in the engine: cut after any frame and sent again with the tokens
already delivered, it continues exactly as the uncut run (tiny model, float32, exact)."""

from __future__ import annotations

import pytest

from broker.protocol import GenerationRequest
from broker.settings import load_settings
from tests.helpers import HELLO
from worker.__main__ import build_engine
from worker.config import WorkerSettings
from worker.engine_api import DoneEvent, ErrorEvent, TokenEvent

WEATHER = {"type": "function", "function": {"name": "weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
    "required": ["city", "days"]}}}


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    args = ["--model", str(tiny_model_dir), "--device", "cpu", "--dtype", "float32"]
    return build_engine(load_settings(WorkerSettings, args))[0]


def run(engine, fields: dict, request_id: bytes = b"r" * 16) -> tuple[list, DoneEvent]:
    """Every TOKEN delta of one request, and its DONE."""
    assert engine.add(request_id, GenerationRequest.from_fields(fields)) == []
    deltas = []
    while engine.has_work:
        for event in engine.step():
            assert not isinstance(event, ErrorEvent), event
            if isinstance(event, TokenEvent):
                deltas.append(event.delta)
            elif isinstance(event, DoneEvent):
                return deltas, event
    raise AssertionError("no DONE")


def answer(deltas) -> tuple[str, dict[int, str], list]:
    """What a caller assembles: text, each call's name and arguments, the logprobs."""
    calls: dict[int, str] = {}
    for delta in deltas:
        for call in delta.tool_calls:
            calls[call.index] = calls.get(call.index, "") + (call.name or "") + call.arguments
    return "".join(d.text for d in deltas), calls, [lp for d in deltas for lp in d.logprobs or ()]


def check_every_cut(engine, fields: dict) -> str:
    whole, done = run(engine, fields)
    assert sum(d.num_tokens for d in whole) == done.done.completion_tokens == sum(len(d.token_ids) for d in whole)
    for cut in range(1, len(whole)):
        delivered = [t for d in whole[:cut] for t in d.token_ids]
        rest, resumed_done = run(engine, {**fields, "resume_ids": delivered}, bytes([cut]) * 16)
        assert answer(whole[:cut] + rest) == answer(whole), cut
        assert (resumed_done.done.prompt_tokens, resumed_done.done.completion_tokens,
                resumed_done.done.finish_reason) == (done.done.prompt_tokens, done.done.completion_tokens,
                                                     done.done.finish_reason)
        assert sum(d.num_tokens for d in rest) == done.done.completion_tokens - len(delivered)
    return answer(whole)[0]


def test_greedy_text_with_a_stop_string_resumes_anywhere(engine):
    base = {"model": "m", "messages": HELLO, "temperature": 0, "max_tokens": 24, "logprobs": True, "top_logprobs": 2}
    text = answer(run(engine, base)[0])[0]
    stop = text[len(text) // 2:len(text) // 2 + 5]  # ends the answer mid-way; its first letters are held back
    cut_text = check_every_cut(engine, {**base, "stop": [stop]})
    assert cut_text == text[:text.index(stop)]


def test_seeded_sampling_draws_the_same_after_a_resume(engine):
    text = check_every_cut(engine, {"model": "m", "messages": HELLO, "temperature": 1.0, "seed": 11, "max_tokens": 16})
    other = answer(run(engine, {"model": "m", "messages": HELLO, "temperature": 1.0, "seed": 12, "max_tokens": 16})[0])
    assert text and other[0] != text


def test_constrained_json_resumes_inside_a_value(engine):
    schema = {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}
    text = check_every_cut(engine, {"model": "m", "messages": HELLO, "temperature": 0, "max_tokens": 20,
                                    "constraint": {"type": "json_schema", "schema": schema}})
    assert text.startswith('{"name": "')


def test_a_tool_call_resumes_inside_its_arguments(engine):
    from frontends.openai_api.tools import parse_tools

    tools = parse_tools({"tools": [WEATHER], "tool_choice": "required"}).to_fields()
    whole, _ = run(engine, {"model": "m", "messages": HELLO, "temperature": 0, "max_tokens": 40, "tools": tools})
    assert answer(whole)[1]  # it calls
    check_every_cut(engine, {"model": "m", "messages": HELLO, "temperature": 0, "max_tokens": 40, "tools": tools})


def test_resume_ids_that_break_the_constraint_are_refused(engine):
    fields = {"model": "m", "messages": HELLO, "max_tokens": 8, "constraint": {"type": "json_object"},
              "resume_ids": [engine.prompts.tokenizer("hello", add_special_tokens=False).input_ids[0]]}
    [error] = engine.add(b"x" * 16, GenerationRequest.from_fields(fields))
    assert isinstance(error, ErrorEvent) and "resume_ids" in error.error.message
    assert not engine.has_work
