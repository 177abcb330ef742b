"""Tool formats in the worker: which format a chat template gets, how the chat reaches it, the
grammar every answer follows, and answers read as they stream into reply text and calls; then
native formats end to end, on the tiny model and over the OpenAI API on the default model."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import openai
import pytest
from langchain_core.messages import HumanMessage, ToolMessage
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI
from transformers import AutoTokenizer

from broker.protocol import (
    ChatMessage,
    FinishReason,
    Function,
    GenerationRequest,
    ToolCall,
    Tools,
)
from broker.settings import load_settings
from tests.helpers import wait_for_models
from tests.openai_schema import validate
from tests.processes import free_address, start_broker, start_worker, stop
from tests.test_openai_api import Api
from worker.__main__ import build_engine
from worker.config import WorkerSettings
from worker.engine_api import DoneEvent, TokenEvent
from worker.grammar import GrammarCompiler, GrammarRefused
from worker.model_source import default_model_dir
from worker.prompt import PromptEncoder
from worker.tool_formats import GENERIC, HERMES, LLAMA3, format_for

TEMPLATES = Path(__file__).parent / "templates"
WEATHER = Function("get_weather", {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30}},
                                   "required": ["city"]}, "The weather in a city")
ADD = Function("add", {"type": "object", "properties": {"a": {"$ref": "#/$defs/Small"}, "b": {"$ref": "#/$defs/Small"}},
                       "required": ["a", "b"], "$defs": {"Small": {"type": "integer", "minimum": 0, "maximum": 99}}})
PARAMETERS = {"get_weather": WEATHER.parameters, "add": ADD.parameters}


def template(name: str) -> str:
    return (TEMPLATES / f"{name}.jinja").read_text()


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(default_model_dir())


def test_each_template_gets_its_format(tokenizer):
    assert format_for(tokenizer.chat_template) is GENERIC  # SmolLM2's template takes no tools
    assert format_for(template("hermes")) is HERMES and format_for(template("llama3")) is LLAMA3
    assert format_for("{% for tool in tools %}{{ tool.name }}{% endfor %}") is GENERIC  # calls in no known format
    assert format_for("{% generation %}<tool_call>{{ tools }}{% endgeneration %}") is HERMES  # transformers' own tag
    assert format_for(None) is GENERIC


# -- grammars


@pytest.fixture(scope="module")
def compiler(tokenizer) -> GrammarCompiler:
    return GrammarCompiler(tokenizer, frozenset({tokenizer.eos_token_id}))


def _allows(tokenizer, compiler: GrammarCompiler, tool_format, tools: Tools, text: str) -> bool:
    """Whether `text` is a whole answer the worker's grammar for `tools` in `tool_format` accepts."""
    row = compiler.start_tools(tools, tool_format)
    try:
        for token in tokenizer(text, add_special_tokens=False).input_ids:
            row.advance(token)
    except GrammarRefused:
        return False
    return row.matcher.is_accepting()


HERMES_CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
HERMES_ADD = '<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n</tool_call>'
LLAMA_CALL = '{"name": "get_weather", "parameters": {"city": "Paris"}}'
GENERIC_CALLS = '{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}]}'


@pytest.mark.parametrize("tool_format, choice, parallel, allowed, refused", [
    (HERMES, "auto", True, ["It is sunny.", HERMES_CALL, "Let me look.\n" + HERMES_CALL, HERMES_CALL + "\n" + HERMES_ADD],
     ['<tool_call>\n{"name": "delete_all", "arguments": {}}\n</tool_call>', HERMES_CALL + " Done.",
      '<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 300}}\n</tool_call>',
      '<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3, "c": 4}}\n</tool_call>']),
    (HERMES, "required", False, [HERMES_CALL, HERMES_ADD], ["It is sunny.", HERMES_CALL + "\n" + HERMES_ADD]),
    (LLAMA3, "auto", False, ["It is sunny.", LLAMA_CALL], ['{"answer": "sunny"}', LLAMA_CALL + " ok"]),
    (LLAMA3, "required", False, [LLAMA_CALL], ["It is sunny."]),
    (GENERIC, "auto", True, ['{"response": "It is sunny."}', GENERIC_CALLS], ["It is sunny.", '{"response": 1}']),
    (GENERIC, "required", False, [GENERIC_CALLS], ['{"response": "It is sunny."}']),
])
def test_answers_follow_the_format_and_the_parameters(tokenizer, compiler, tool_format, choice, parallel, allowed,
                                                      refused):
    tools = Tools((WEATHER, ADD), choice, parallel=parallel)
    for text in allowed:
        assert _allows(tokenizer, compiler, tool_format, tools, text), text
    for text in refused:
        assert not _allows(tokenizer, compiler, tool_format, tools, text), text


def test_definitions_move_to_the_root_and_properties_stay(tokenizer, compiler):
    """A function's own `$defs` (as pydantic writes nested models) must resolve from the root of the
    answer's schema; a parameter that happens to be called `definitions` is a parameter."""
    glossary = Function("define", {"type": "object", "required": ["definitions", "term"], "properties": {
        "definitions": {"type": "array", "items": {"type": "string"}}, "term": {"$ref": "#/$defs/Term"}},
        "$defs": {"Term": {"type": "string", "maxLength": 10}}})
    tools = Tools((glossary, ADD), "required")
    assert _allows(tokenizer, compiler, HERMES, tools, '<tool_call>\n{"name": "define", "arguments": {"definitions": ["a"], '
                                       '"term": "word"}}\n</tool_call>')
    assert not _allows(tokenizer, compiler, HERMES, tools, '<tool_call>\n{"name": "define", "arguments": {"definitions": ["a"], '
                                           '"term": "a very long word"}}\n</tool_call>')


def test_a_named_choice_allows_only_that_function(tokenizer, compiler):
    named = Tools((WEATHER, ADD), "required", "add")
    assert _allows(tokenizer, compiler, HERMES, named, HERMES_ADD)
    assert not _allows(tokenizer, compiler, HERMES, named, HERMES_CALL)


# -- readers


def _read(tool_format, text: str) -> tuple[str, list[tuple[str, str, str]], bool]:
    """Fed one character at a time (every cut a token could make): the reply text, and each call as
    (id, name, arguments) from its pieces."""
    reader, content, calls = tool_format.reader(), "", []
    for piece in [*text, None]:
        more, pieces = reader.finish() if piece is None else reader.push(piece)
        content += more
        for delta in pieces:
            if delta.id is not None:
                assert delta.index == len(calls) and delta.arguments == ""
                calls.append([delta.id, delta.name, ""])
            else:
                calls[delta.index][2] += delta.arguments
    return content, [tuple(call) for call in calls], reader.made_calls


@pytest.mark.parametrize("tool_format, text, content, calls", [
    (HERMES, "It is <b>sunny</b> <tool", "It is <b>sunny</b> <tool", []),
    (HERMES, "Let me look.\n" + HERMES_CALL + "\n" + HERMES_ADD, "Let me look.\n",
     [("get_weather", '{"city": "Paris"}'), ("add", '{"a": 2, "b": 3}')]),
    (HERMES, '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Pa\\"ris \\u00e9}"', "",
     [("get_weather", '{"city": "Pa\\"ris \\u00e9}"')]),  # cut by max_tokens: the arguments so far
    (HERMES, 'Hi <tool_call>\n{"name": "get_w', 'Hi <tool_call>\n{"name": "get_w', []),  # cut in a name
    (LLAMA3, "  " + LLAMA_CALL, "  ", [("get_weather", '{"city": "Paris"}')]),
    (LLAMA3, "\x1c" + LLAMA_CALL, "\x1c" + LLAMA_CALL, []),  # only what the grammar lets start a call does
    (LLAMA3, 'Use {"name": "x"} here', 'Use {"name": "x"} here', []),
    (GENERIC, GENERIC_CALLS, "", [("get_weather", '{"city": "Paris"}')]),
    (GENERIC, '{"response": "caf\\u00e9 \\ud83d\\ude00 ok\\n"}', "café 😀 ok\n", []),
    (GENERIC, '{"response": "Sun', "Sun", []),
    (GENERIC, "plain words", "plain words", []),
])
def test_answers_stream_into_text_and_calls(tool_format, text, content, calls):
    read_content, read_calls, made_calls = _read(tool_format, text)
    assert read_content == content
    assert [(name, arguments) for _, name, arguments in read_calls] == calls and made_calls == bool(calls)
    assert all(call_id.startswith("call_") for call_id, _, _ in read_calls)
    assert len({call_id for call_id, _, _ in read_calls}) == len(read_calls)


# -- what the template sees

HISTORY = (ChatMessage("system", "Be brief."), ChatMessage("user", "Weather in Paris?", "alice"),
           ChatMessage("assistant", "", tool_calls=(ToolCall("call_1", "get_weather", '{"city": "Paris"}'),)),
           ChatMessage("tool", "Sunny", "get_weather", tool_call_id="call_1"), ChatMessage("user", "And Rome?"))


def _prompt(tokenizer, chat_template: str | None, tools: Tools | None) -> str:
    if chat_template is not None:
        tokenizer = AutoTokenizer.from_pretrained(default_model_dir())
        tokenizer.chat_template = chat_template
    encoder = PromptEncoder(tokenizer, tokenizer.eos_token_id)
    ids = encoder.encode(GenerationRequest("m", HISTORY, tools=tools))
    return tokenizer.decode(ids)


def test_a_native_template_receives_the_tools_calls_and_results(tokenizer):
    prompt = _prompt(tokenizer, template("hermes"), Tools((WEATHER, ADD)))
    assert json.dumps({"type": "function", "function": WEATHER.to_fields()}) in prompt  # through the template
    assert HERMES_CALL in prompt and "<tool_response>\nSunny\n</tool_response>" in prompt
    assert '"response"' not in prompt  # nothing of the generic format
    llama = _prompt(tokenizer, template("llama3"), Tools((WEATHER,)))
    assert LLAMA_CALL in llama and "ipython<|end_header_id|>\n\nSunny" in llama and '"get_weather"' in llama


def test_the_generic_format_describes_the_tools_in_the_system_prompt(tokenizer):
    prompt = _prompt(tokenizer, None, Tools((WEATHER, ADD), "required", "add"))
    system = prompt.split("<|im_end|>")[0]
    assert system.startswith("<|im_start|>system\nBe brief.\n\nYou can call these tools") and '"add"' in system
    assert '"get_weather"' in system  # a named choice still shows every function; its grammar allows one
    assert '{"tool_calls": [{"id": "call_1", "name": "get_weather", "arguments": {"city": "Paris"}}]}' in prompt
    assert ('{"tool_response": {"tool_call_id": "call_1", "name": "get_weather", "content": "Sunny"}}' in prompt)
    assert "<tool_call>" not in _prompt(tokenizer, None, None)


# -- native formats on the tiny model


@pytest.fixture(scope="module", params=["hermes", "llama3"])
def native_engine(request, tiny_model_dir):
    args = ["--model", str(tiny_model_dir), "--chat-template", str(TEMPLATES / f"{request.param}.jinja")]
    return build_engine(load_settings(WorkerSettings, args))[0]


def test_sampled_calls_always_follow_the_parameters(native_engine):
    """Random weights at temperature 1: whatever the model would write, each call is whole and valid."""
    tools = Tools((WEATHER, ADD), "required", parallel=False)
    ends, calls = {}, {}
    for seed in range(6):
        rid = bytes([seed]) * 16
        assert native_engine.add(rid, GenerationRequest("m", HISTORY[1:2], max_tokens=120, temperature=1.0, seed=seed,
                                                        tools=tools)) == []
    while native_engine.has_work:
        for event in native_engine.step():
            if isinstance(event, TokenEvent):
                assert event.delta.text.strip() == ""  # required: calls, and no reply
                for piece in event.delta.tool_calls:
                    call = calls.setdefault(event.request_id, {"name": piece.name, "arguments": ""})
                    call["arguments"] += piece.arguments
            else:
                ends[event.request_id] = event
    for rid, end in ends.items():
        assert isinstance(end, DoneEvent)
        if end.done.finish_reason is FinishReason.LENGTH:
            continue  # a long string the model would not end: cut, as OpenAI does
        assert end.done.finish_reason is FinishReason.TOOL_CALLS
        jsonschema.validate(json.loads(calls[rid]["arguments"]), PARAMETERS[calls[rid]["name"]])
    assert sum(end.done.finish_reason is FinishReason.TOOL_CALLS for end in ends.values()) >= 4


# -- a native template over the OpenAI API, on the default model


@pytest.fixture(scope="module")
def hermes_api():
    address = free_address()
    broker = start_broker(address)
    worker = start_worker(address, None, "--model-names", "smollm2-hermes", "--chat-template",
                          str(TEMPLATES / "hermes.jinja"), "--dtype", "float32")
    api = None
    try:
        import asyncio

        asyncio.run(wait_for_models(address, {"smollm2-hermes"}))
        api = Api(address).wait()
        yield api
    finally:
        for process in ([api.process] if api else []) + [worker, broker]:
            stop(process)


OPENAI_TOOLS = [{"type": "function", "function": WEATHER.to_fields()},
                {"type": "function", "function": {"name": "add", "parameters": ADD.parameters}}]


def test_native_calls_streamed_and_not_match_the_spec(hermes_api):
    client = hermes_api.client()
    body = dict(model="smollm2-hermes", temperature=0, max_tokens=60, tools=OPENAI_TOOLS, tool_choice="required",
                parallel_tool_calls=False, messages=[{"role": "user", "content": "What is the weather in Paris?"}])
    whole = client.chat.completions.create(**body)
    validate("CreateChatCompletionResponse", whole.model_dump(mode="json", exclude_unset=True))
    choice = whole.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    jsonschema.validate(json.loads(call.function.arguments), PARAMETERS[call.function.name])
    chunks = list(client.chat.completions.create(**body, stream=True))
    for chunk in chunks:
        validate("CreateChatCompletionStreamResponse", chunk.model_dump(mode="json", exclude_unset=True))
    deltas = [c.choices[0].delta.tool_calls[0] for c in chunks if c.choices and c.choices[0].delta.tool_calls]
    assert deltas[0].id and deltas[0].function.name == call.function.name
    assert "".join(d.function.arguments for d in deltas) == call.function.arguments  # greedy: the same call
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


@tool
def get_weather(city: str) -> str:
    """The current weather in a city."""
    return f"Sunny and 21 degrees in {city}."


def test_langchain_round_trip_through_the_native_template(hermes_api):
    chat = ChatOpenAI(base_url=hermes_api.url + "/v1", api_key="none", model="smollm2-hermes", max_retries=0,
                      temperature=0, max_tokens=60)
    question = HumanMessage(content="What is the weather in Paris?")
    asked = chat.bind_tools([get_weather], tool_choice="get_weather").invoke([question])
    (call,) = asked.tool_calls
    assert call["name"] == "get_weather" and isinstance(call["args"]["city"], str)
    result = ToolMessage(content=get_weather.invoke(call["args"]), tool_call_id=call["id"])
    answer = chat.bind_tools([get_weather]).invoke([question, asked, result])
    assert answer.content or answer.tool_calls  # auto: a reply, or another call; never a 4xx or broken text
    with pytest.raises(openai.BadRequestError, match="tool_call_id"):
        hermes_api.client().chat.completions.create(model="smollm2-hermes", messages=[
            {"role": "tool", "content": "Sunny"}])
