"""OpenAI's tool fields on the bus: what `tools`, `tool_choice` and `parallel_tool_calls` become,
the history's calls and results as the bus carries them, and bad fields answered with 400s."""

from __future__ import annotations

import pytest

from broker.protocol import GenerationRequest, ToolCall, ToolCallDelta
from frontends.openai_api.errors import ApiError
from frontends.openai_api.requests import parse_chat
from frontends.openai_api.responses import ChatResponses
from frontends.openai_api.tools import call_delta, parse_tools, whole_calls

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
ADD = {"type": "function", "function": {
    "name": "add", "parameters": {"type": "object", "properties": {"a": {"type": "number"}, "b": {"type": "number"}},
                                  "required": ["a", "b"]}}}
ASK = [{"role": "user", "content": "Weather in Paris?"}]


def test_choices_become_the_bus_tools():
    auto = parse_tools({"tools": [WEATHER, ADD]})
    assert [f.name for f in auto.functions] == ["get_weather", "add"] and auto.choice == "auto" and auto.parallel
    assert auto.functions[0].description == "Weather in a city" and not auto.calls_required
    required = parse_tools({"tools": [WEATHER, ADD], "tool_choice": "required", "parallel_tool_calls": False})
    assert required.calls_required and not required.parallel
    named = parse_tools({"tools": [WEATHER, ADD], "tool_choice": {"type": "function", "function": {"name": "add"}}})
    assert named.function == "add" and named.calls_required and [f.name for f in named.callable] == ["add"]
    assert len(named.functions) == 2  # the model still sees every tool
    assert parse_tools({"tools": [WEATHER], "tool_choice": "none"}) is None
    assert parse_tools({}) is None


@pytest.mark.parametrize("body, param", [
    ({"tools": []}, "tools"),
    ({"tools": [WEATHER] * 129}, "tools"),
    ({"tools": [{"type": "function", "function": {"name": ""}}]}, "tools[0].function.name"),
    ({"tools": [WEATHER, WEATHER]}, "tools"),
    ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "add"}}}, "tool_choice"),
    ({"tools": [WEATHER], "parallel_tool_calls": "yes"}, "parallel_tool_calls"),
    ({"tool_choice": "auto"}, "tool_choice"),
])
def test_bad_tool_fields_are_400(body, param):
    with pytest.raises(ApiError) as caught:
        parse_tools(body)
    assert caught.value.status == 400 and caught.value.param == param


def test_the_history_reaches_the_bus_as_calls_and_results():
    call = parse_chat({"model": "m", "tools": [WEATHER], "messages": [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris?", "name": "alice"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": [{"type": "text", "text": "Sunny"}]},
    ]}, max_n=1)
    (request,) = call.requests
    system, user, assistant, result = request.messages
    assert (system.role, system.content) == ("system", "Be brief.")
    assert (user.role, user.content, user.name) == ("user", "Weather in Paris?", "alice")
    assert assistant.content == "" and assistant.tool_calls == (ToolCall("call_1", "get_weather", '{"city": "Paris"}'),)
    assert (result.role, result.content, result.tool_call_id, result.name) == ("tool", "Sunny", "call_1", "get_weather")
    assert request.tools is not None and request.constraint is None
    assert GenerationRequest.from_fields(request.to_fields()) == request  # as the broker and worker read it


@pytest.mark.parametrize("message, param", [
    ({"role": "tool", "content": "Sunny"}, "messages[0].tool_call_id"),
    ({"role": "assistant", "tool_calls": [{"type": "function"}]}, "messages[0].tool_calls[0]"),
    ({"role": "assistant", "tool_calls": "get_weather"}, "messages[0].tool_calls"),
])
def test_bad_history_is_400(message, param):
    with pytest.raises(ApiError) as caught:
        parse_chat({"model": "m", "messages": [message]}, max_n=1)
    assert caught.value.param == param


def test_response_formats_become_constraints():
    def constraint(response_format):
        return parse_chat({"model": "m", "messages": ASK, "response_format": response_format}, max_n=1).requests[0].constraint

    assert constraint({"type": "text"}) is None
    assert constraint({"type": "json_object"}).type == "json_object"
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    assert constraint({"type": "json_schema", "json_schema": {"name": "a", "schema": schema, "strict": True}}).schema == schema
    with pytest.raises(ApiError, match="cannot be combined"):
        parse_chat({"model": "m", "messages": ASK, "tools": [WEATHER], "response_format": {"type": "json_object"}}, 1)
    with pytest.raises(ApiError, match="'stop' cannot be combined") as caught:
        parse_chat({"model": "m", "messages": ASK, "tools": [WEATHER], "stop": "x"}, 1)
    assert caught.value.param == "stop"


def test_call_pieces_become_openai_deltas_and_calls():
    pieces = [ToolCallDelta(0, "", "call_a", "get_weather"), ToolCallDelta(0, '{"city": '), ToolCallDelta(0, '"Rome"}'),
              ToolCallDelta(1, "", "call_b", "add"), ToolCallDelta(1, '{"a": 1, "b": 2}')]
    assert call_delta(pieces[0]) == {"index": 0, "id": "call_a", "type": "function",
                                     "function": {"name": "get_weather", "arguments": ""}}
    assert call_delta(pieces[1]) == {"index": 0, "function": {"arguments": '{"city": '}}
    assert whole_calls(pieces) == [
        {"id": "call_a", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}},
        {"id": "call_b", "type": "function", "function": {"name": "add", "arguments": '{"a": 1, "b": 2}'}}]
    from broker.protocol import TokenDelta

    chunks = ChatResponses("m").delta_chunks(0, TokenDelta("Let me see.", 3, None, tuple(pieces[:2])))
    assert [c["choices"][0]["delta"] for c in chunks] == [
        {"content": "Let me see."}, {"tool_calls": [call_delta(pieces[0])]}, {"tool_calls": [call_delta(pieces[1])]}]


def test_tools_are_built_once_per_request_and_passed_on():
    call = parse_chat({"model": "m", "messages": ASK, "tools": [WEATHER], "n": 2}, max_n=2)
    first, second = call.requests
    assert first.tools is second.tools and first.tools.functions[0].name == "get_weather"
