"""The generic tool format: tool plans, their schemas, the history as the model reads it, and answers parsed."""

from __future__ import annotations

import json

import jsonschema
import pytest

from frontends.openai_api.errors import ApiError
from frontends.openai_api.requests import parse_chat
from frontends.openai_api.tools import ReplyStream, parse_tools

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
ADD = {"type": "function", "function": {
    "name": "add", "parameters": {"type": "object", "properties": {"a": {"type": "number"}, "b": {"type": "number"}},
                                  "required": ["a", "b"]}}}
ASK = [{"role": "user", "content": "Weather in Paris?"}]
CALL = {"tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}]}


def test_auto_allows_a_reply_or_calls_and_nothing_else():
    plan = parse_tools({"tools": [WEATHER, ADD]})
    schema = plan.schema()
    jsonschema.validate({"response": "It is sunny."}, schema)
    jsonschema.validate({"tool_calls": [CALL["tool_calls"][0], {"name": "add", "arguments": {"a": 1, "b": 2}}]}, schema)
    for wrong in ({"tool_calls": [{"name": "get_weather", "arguments": {}}]},  # arguments against its parameters
                  {"tool_calls": [{"name": "delete_all", "arguments": {}}]},
                  {"tool_calls": []}, {"response": "x", "tool_calls": []}, {"text": "x"}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(wrong, schema)
    assert '"get_weather"' in plan.system_prompt() and '{"response"' in plan.system_prompt()


def test_required_named_and_single_choices():
    required = parse_tools({"tools": [WEATHER, ADD], "tool_choice": "required", "parallel_tool_calls": False})
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"response": "hi"}, required.schema())
    with pytest.raises(jsonschema.ValidationError):  # one call at most
        jsonschema.validate({"tool_calls": CALL["tool_calls"] * 2}, required.schema())
    named = parse_tools({"tools": [WEATHER, ADD], "tool_choice": {"type": "function", "function": {"name": "add"}}})
    jsonschema.validate({"tool_calls": [{"name": "add", "arguments": {"a": 1, "b": 2}}]}, named.schema())
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(CALL, named.schema())
    assert "get_weather" not in named.system_prompt()
    assert parse_tools({"tools": [WEATHER], "tool_choice": "none"}) is None
    assert parse_tools({}) is None


@pytest.mark.parametrize("body, param", [
    ({"tools": []}, "tools"),
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


def test_answers_parse_into_calls_or_content():
    plan = parse_tools({"tools": [WEATHER, ADD]})
    reply = plan.parse(json.dumps(CALL))
    assert reply.content is None and [c.name for c in reply.tool_calls] == ["get_weather"]
    assert json.loads(reply.tool_calls[0].arguments) == {"city": "Paris"} and reply.tool_calls[0].id.startswith("call_")
    assert plan.parse('{"response": "Sunny."}').content == "Sunny."
    assert plan.parse('{"response": "Sun').content == "Sun"  # cut by max_tokens: what there is
    assert plan.parse("plain words").content == "plain words"  # neither form: as it came


def test_the_history_reaches_the_bus_in_the_generic_format():
    call = parse_chat({"model": "m", "tools": [WEATHER], "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris?", "name": "alice"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "Sunny"},
    ]}, max_n=1)
    (request,) = call.requests
    system, user, assistant, result = request.messages
    assert system.role == "system" and system.content.startswith("Be brief.") and "get_weather" in system.content
    assert (user.role, user.content) == ("user", "Weather in Paris?")
    assert json.loads(assistant.content) == {"tool_calls": [{"id": "call_1", "name": "get_weather",
                                                             "arguments": {"city": "Paris"}}]}
    assert result.role == "user" and json.loads(result.content) == {
        "tool_response": {"tool_call_id": "call_1", "name": "get_weather", "content": "Sunny"}}
    assert request.constraint.type == "json_schema" and call.tools is not None


def test_response_formats_become_constraints():
    def constraint(response_format):
        return parse_chat({"model": "m", "messages": ASK, "response_format": response_format}, max_n=1).requests[0].constraint

    assert constraint({"type": "text"}) is None
    assert constraint({"type": "json_object"}).type == "json_object"
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    assert constraint({"type": "json_schema", "json_schema": {"name": "a", "schema": schema, "strict": True}}).schema == schema
    with pytest.raises(ApiError, match="cannot be combined"):
        parse_chat({"model": "m", "messages": ASK, "tools": [WEATHER], "response_format": {"type": "json_object"}}, 1)


CALLS_TEXT = ('{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Pa\\"ris \\u00e9"}}, '
              '{"name": "add", "arguments": {"a": 1, "b": [2, {"c": "}"}]}}]}')


def test_a_streamed_answer_gives_each_call_its_id_and_name_then_its_arguments():
    stream, deltas = ReplyStream(), []
    for char in CALLS_TEXT:  # one character at a time: every cut a token could make
        deltas += stream.push(char)
    assert stream.finish() == [] and stream.has_calls
    parts = [d["tool_calls"][0] for d in deltas]
    openings = [p for p in parts if "id" in p]
    assert [(p["index"], p["function"]["name"], p["function"]["arguments"]) for p in openings] == [
        (0, "get_weather", ""), (1, "add", "")]
    arguments = {}
    for part in parts:
        arguments[part["index"]] = arguments.get(part["index"], "") + part["function"]["arguments"]
    assert [json.loads(a) for a in arguments.values()] == [{"city": 'Pa"ris é'}, {"a": 1, "b": [2, {"c": "}"}]}]
    whole = parse_tools({"tools": [WEATHER, ADD]}).parse(CALLS_TEXT)
    assert [c.arguments for c in whole.tool_calls] == list(arguments.values())


def test_a_streamed_reply_is_content_as_it_comes():
    text = '{"response": "caf\\u00e9 \\ud83d\\ude00 ok\\n"}'
    stream, content = ReplyStream(), ""
    for char in text:
        for delta in stream.push(char):
            content += delta["content"]
    assert content == "café 😀 ok\n" and not stream.has_calls
    cut = ReplyStream()
    assert cut.push('{"response": "Sun') == [{"content": "Sun"}] and cut.finish() == []
    other = ReplyStream()
    assert other.push("plain") == [] and other.finish() == [{"content": "plain"}]


def test_parameters_with_their_own_definitions_still_resolve():
    """pydantic writes nested models as `$defs` and `#/$defs/...` references; inside the answer's
    schema they must resolve from its root, for two tools that both name a definition `Address`."""
    import openai
    from pydantic import BaseModel

    class Address(BaseModel):
        city: str
        zip_code: str

    class Ship(BaseModel):
        to: Address
        weight_kg: float

    class Bill(BaseModel):
        address: Address

    tools = [openai.pydantic_function_tool(Ship), openai.pydantic_function_tool(Bill)]
    assert "$defs" in tools[0]["function"]["parameters"]
    schema = parse_tools({"tools": tools, "tool_choice": "required"}).schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    address = {"city": "Paris", "zip_code": "75001"}
    jsonschema.validate({"tool_calls": [{"name": "Ship", "arguments": {"to": address, "weight_kg": 2.5}},
                                        {"name": "Bill", "arguments": {"address": address}}]}, schema)
    with pytest.raises(jsonschema.ValidationError):  # the nested model is enforced, not skipped
        jsonschema.validate({"tool_calls": [{"name": "Ship", "arguments": {"to": {"city": 1}, "weight_kg": 2}}]},
                            schema)
