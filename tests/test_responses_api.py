"""OpenAI's Responses API over the real bus: the official `openai` client, raw HTTP, LangChain, and the spec."""

from __future__ import annotations

import json
import os
import signal
import threading
import urllib.request


import jsonschema
import openai
import pytest
from langchain_core.messages import HumanMessage, ToolMessage
from langchain_openai import ChatOpenAI
from pydantic import BaseModel, Field

from tests.helpers import TINY_MODEL, a_client_that_leaves_is_cancelled, serving
from tests.openai_schema import validate
from tests.processes import free_address, spawn, stop
from tests.test_openai_api import Api, post

WEATHER = {"type": "function", "name": "get_weather", "description": "The current weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Rome"]}},
                          "required": ["city"], "additionalProperties": False}}

EVENT_SCHEMAS = {
    "response.created": "ResponseCreatedEvent", "response.in_progress": "ResponseInProgressEvent",
    "response.output_item.added": "ResponseOutputItemAddedEvent", "response.output_item.done": "ResponseOutputItemDoneEvent",
    "response.content_part.added": "ResponseContentPartAddedEvent", "response.content_part.done": "ResponseContentPartDoneEvent",
    "response.output_text.delta": "ResponseTextDeltaEvent", "response.output_text.done": "ResponseTextDoneEvent",
    "response.function_call_arguments.delta": "ResponseFunctionCallArgumentsDeltaEvent",
    "response.function_call_arguments.done": "ResponseFunctionCallArgumentsDoneEvent",
    "response.completed": "ResponseCompletedEvent", "response.incomplete": "ResponseIncompleteEvent",
    "response.failed": "ResponseFailedEvent", "error": "ResponseErrorEvent",
}


class Verdict(BaseModel):
    ok: bool
    colour: str = Field(json_schema_extra={"enum": ["red", "green"]})


@pytest.fixture(scope="module")
def api(bus):
    server = Api(bus.address).wait()
    yield server
    server.stop()


def create(api: Api, **params) -> tuple[openai.types.responses.Response, dict]:
    """A response through the official client, and its JSON as sent, checked against the spec."""
    raw = api.client().responses.with_raw_response.create(**params)
    body = raw.http_response.json()
    validate("Response", body)
    return raw.parse(), body


def sse_events(url: str, body: dict) -> list[dict]:
    """A stream's events as sent, each checked against the spec and against its `event:` line."""
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        assert response.headers["Content-Type"].startswith("text/event-stream")
        text = response.read().decode()
    events = []
    for block in filter(None, text.split("\n\n")):
        name_line, data_line = block.split("\n")
        event = json.loads(data_line.removeprefix("data: "))
        assert name_line == f"event: {event['type']}"
        validate(EVENT_SCHEMAS[event["type"]], event)  # first alone, for an error that says what is wrong
        validate("ResponseStreamEvent", event)
        events.append(event)
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    return events


def check_error(status: int, body: dict, expected_status: int, param: str | None) -> None:
    assert status == expected_status, body
    validate("ErrorResponse", body)
    assert body["error"]["param"] == param, body


# -- creating


def test_text_response_matches_the_spec(api):
    response, body = create(api, model=TINY_MODEL, input="Hello there", instructions="Be brief.",
                            max_output_tokens=5, metadata={"ticket": "42"}, temperature=0.5, user="u1")
    assert response.id.startswith("resp_") and response.object == "response"
    assert response.status == "incomplete" and response.incomplete_details.reason == "max_output_tokens"
    (message,) = response.output
    assert message.type == "message" and message.role == "assistant" and message.status == "incomplete"
    assert response.output_text == message.content[0].text != ""
    usage = response.usage
    assert usage.output_tokens == 5 and usage.total_tokens == usage.input_tokens + 5
    assert usage.output_tokens_details.reasoning_tokens == 0 and usage.input_tokens_details.cached_tokens >= 0
    assert (body["metadata"], body["instructions"], body["temperature"], body["max_output_tokens"]) == (
        {"ticket": "42"}, "Be brief.", 0.5, 5)
    assert body["store"] is True and body["error"] is None and body["previous_response_id"] is None


def test_input_items_and_instructions_count_as_prompt(api):
    _, short = create(api, model=TINY_MODEL, input="Hi", max_output_tokens=1)
    _, long = create(api, model=TINY_MODEL, max_output_tokens=1, instructions="You are a careful assistant.", input=[
        {"role": "developer", "content": "Answer in French."},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hi"}]},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Bonjour"}]},
        {"role": "user", "content": "Again"}])
    assert long["usage"]["input_tokens"] > short["usage"]["input_tokens"] + 10


def test_stream_events_in_order_match_the_spec(api):
    events = sse_events(api.url + "/v1/responses", {"model": TINY_MODEL, "input": "Hello there",
                                                    "max_output_tokens": 6, "stream": True})
    kinds = [e["type"] for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.incomplete"]
    assert set(kinds[4:-4]) == {"response.output_text.delta"}
    final = events[-1]["response"]
    assert len({e["response"]["id"] for e in events if "response" in e}) == 1
    text = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    assert final["output"][0]["content"][0]["text"] == text == events[-4]["text"]
    assert final["usage"]["output_tokens"] == 6 and final["incomplete_details"] == {"reason": "max_output_tokens"}


def test_official_client_streams_and_parses_a_pydantic_model(api):
    client = api.client()
    with client.responses.stream(model=TINY_MODEL, input="Judge this.", text_format=Verdict,
                                 max_output_tokens=40) as stream:
        events = list(stream)
        final = stream.get_final_response()  # raises unless the stream ends with response.completed
    numbers = [event.sequence_number for event in events]
    assert numbers == sorted(numbers) and len(set(numbers)) == len(numbers)
    assert events[0].type == "response.created" and events[-1].type == "response.completed"
    assert isinstance(final.output_parsed, Verdict) and final.status == "completed"
    # Constrained decoding keeps even a random model's output valid; only a cut can leave it unfinished.
    parsed = client.responses.parse(model=TINY_MODEL, input="Judge this.", text_format=Verdict,
                                    max_output_tokens=40, temperature=1.0)
    assert isinstance(parsed.output_parsed, Verdict) and parsed.usage.output_tokens <= 40
    cut = client.responses.create(model=TINY_MODEL, input="Judge this.", max_output_tokens=3, text={"format": {
        "type": "json_schema", "name": "verdict", "schema": Verdict.model_json_schema(), "strict": True}})
    assert cut.status == "incomplete" and cut.incomplete_details.reason == "max_output_tokens"


def test_json_object_format_is_valid_json(api):
    response, body = create(api, model=TINY_MODEL, input="JSON please", max_output_tokens=60,
                            text={"format": {"type": "json_object"}})
    assert body["text"] == {"format": {"type": "json_object"}}
    if response.status == "completed":  # a random model may ramble until the cut: then it is unfinished, not wrong
        assert isinstance(json.loads(response.output_text), dict)
    else:
        assert response.incomplete_details.reason == "max_output_tokens"


# -- tools


def test_function_call_round_trip(api):
    client = api.client()
    call_response, body = create(api, model=TINY_MODEL, input="Weather in Paris?", tools=[WEATHER],
                                 tool_choice={"type": "function", "name": "get_weather"}, max_output_tokens=40)
    assert body["tools"][0]["name"] == "get_weather" and body["tool_choice"] == {"type": "function",
                                                                                 "name": "get_weather"}
    assert call_response.status == "completed"
    (call,) = [item for item in call_response.output if item.type == "function_call"]
    assert call.name == "get_weather" and call.id.startswith("fc_") and call.call_id and call.status == "completed"
    jsonschema.validate(json.loads(call.arguments), WEATHER["parameters"])
    answer, body = create(api, model=TINY_MODEL, previous_response_id=call_response.id, tools=[WEATHER],
                          max_output_tokens=4, input=[{"type": "function_call_output", "call_id": call.call_id,
                                                       "output": "Sunny, 21 degrees"}])
    assert answer.output_text and answer.usage.input_tokens > call_response.usage.input_tokens
    assert body["previous_response_id"] == call_response.id
    # The same conversation sent whole, without the store, is read the same way.
    again = client.responses.create(model=TINY_MODEL, tools=[WEATHER], max_output_tokens=4, store=False, input=[
        {"role": "user", "content": "Weather in Paris?"},
        {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
        {"type": "function_call_output", "call_id": call.call_id, "output": "Sunny, 21 degrees"}])
    assert again.usage.input_tokens == answer.usage.input_tokens


def test_function_call_streamed_matches_the_spec(api):
    events = sse_events(api.url + "/v1/responses", {
        "model": TINY_MODEL, "input": "Weather?", "tools": [WEATHER], "tool_choice": "required",
        "parallel_tool_calls": False, "max_output_tokens": 40, "stream": True})
    added = [e for e in events if e["type"] == "response.output_item.added"]
    assert added and all(e["item"]["type"] == "function_call" for e in added), "blank text before a call is no reply"
    done = next(e for e in events if e["type"] == "response.function_call_arguments.done")
    pieces = "".join(e["delta"] for e in events if e["type"] == "response.function_call_arguments.delta")
    assert done["arguments"] == pieces and done["name"] == "get_weather"
    assert events[-1]["type"] == "response.completed"
    assert events[-1]["response"]["output"][0]["arguments"] == pieces


# -- the store


def test_previous_response_continues_the_conversation(api):
    client = api.client()
    first = client.responses.create(model=TINY_MODEL, input="My name is Ada.", max_output_tokens=3,
                                    instructions="A long instruction that is not carried over to the next turn.")
    second = client.responses.create(model=TINY_MODEL, input="What is my name?", max_output_tokens=3,
                                     previous_response_id=first.id)
    assert second.usage.input_tokens > first.usage.input_tokens
    alone = client.responses.create(model=TINY_MODEL, max_output_tokens=3, store=False, input=[
        {"role": "user", "content": "My name is Ada."},
        {"role": "assistant", "content": first.output_text},
        {"role": "user", "content": "What is my name?"}])
    assert second.usage.input_tokens == alone.usage.input_tokens, "instructions are not carried over"


def test_get_and_delete_a_stored_response(api):
    client = api.client()
    created = client.responses.create(model=TINY_MODEL, input="Hi", max_output_tokens=2, metadata={"a": "b"})
    status, body = get(api, created.id)
    assert status == 200 and body["id"] == created.id and body["metadata"] == {"a": "b"}
    validate("Response", body)
    assert client.responses.retrieve(created.id).output_text == created.output_text
    status, deleted = call(api, "DELETE", created.id)
    assert (status, deleted) == (200, {"id": created.id, "object": "response", "deleted": True})
    for method in ("GET", "DELETE"):
        status, body = call(api, method, created.id)
        check_error(status, body, 404, None)
        assert created.id in body["error"]["message"]
    unstored = client.responses.create(model=TINY_MODEL, input="Hi", max_output_tokens=2, store=False)
    check_error(*get(api, unstored.id), 404, None)
    other = client.responses.create(model=TINY_MODEL, input="Hi", max_output_tokens=2)
    client.responses.delete(other.id)
    with pytest.raises(openai.NotFoundError, match=other.id):
        client.responses.retrieve(other.id)


def test_unknown_previous_response_is_404_naming_it(api):
    status, body = post(api.url + "/v1/responses", {"model": TINY_MODEL, "input": "Hi",
                                                    "previous_response_id": "resp_missing"})
    check_error(status, body, 404, "previous_response_id")
    assert "resp_missing" in body["error"]["message"]
    with pytest.raises(openai.NotFoundError):
        api.client().responses.create(model=TINY_MODEL, input="Hi", previous_response_id="resp_missing")


def test_the_oldest_response_is_evicted_when_the_store_is_full(bus):
    server = Api(bus.address, "--max-stored-responses", "2").wait()
    try:
        client = server.client()
        ids = [client.responses.create(model=TINY_MODEL, input="Hi", max_output_tokens=1).id for _ in range(3)]
        check_error(*get(server, ids[0]), 404, None)
        assert [get(server, i)[0] for i in ids[1:]] == [200, 200]
        status, body = post(server.url + "/v1/responses", {"model": TINY_MODEL, "input": "Hi",
                                                           "previous_response_id": ids[0]})
        check_error(status, body, 404, "previous_response_id")
    finally:
        server.stop()


def call(api: Api, method: str, response_id: str) -> tuple[int, dict]:
    request = urllib.request.Request(f"{api.url}/v1/responses/{response_id}", method=method)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def get(api: Api, response_id: str) -> tuple[int, dict]:
    return call(api, "GET", response_id)


# -- errors


@pytest.mark.parametrize("body, param", [
    ({"input": "Hi"}, "model"),
    ({"model": TINY_MODEL}, "input"),
    ({"model": TINY_MODEL, "input": 5}, "input"),
    ({"model": TINY_MODEL, "input": []}, "input"),
    ({"model": TINY_MODEL, "input": [{"type": "image_generation_call"}]}, "input[0].type"),
    ({"model": TINY_MODEL, "input": [{"role": "robot", "content": "Hi"}]}, "input[0].role"),
    ({"model": TINY_MODEL, "input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
     "input[0].content[0]"),
    ({"model": TINY_MODEL, "input": [{"role": "user", "content": "Hi"},
                                     {"type": "function_call_output", "call_id": "call_x", "output": "1"}]},
     "input[1].call_id"),
    ({"model": TINY_MODEL, "input": [{"type": "function_call", "call_id": "c", "name": "f"}]}, "input[0].arguments"),
    ({"model": TINY_MODEL, "input": "Hi", "max_output_tokens": 0}, "max_output_tokens"),
    ({"model": TINY_MODEL, "input": "Hi", "temperature": 5}, "temperature"),
    ({"model": TINY_MODEL, "input": "Hi", "stream": "yes"}, "stream"),
    ({"model": TINY_MODEL, "input": "Hi", "store": 1}, "store"),
    ({"model": TINY_MODEL, "input": "Hi", "metadata": {"a": 1}}, "metadata"),
    ({"model": TINY_MODEL, "input": "Hi", "instructions": ["x"]}, "instructions"),
    ({"model": TINY_MODEL, "input": "Hi", "text": {"format": {"type": "yaml"}}}, "text.format"),
    ({"model": TINY_MODEL, "input": "Hi", "text": {"format": {"type": "json_schema", "schema": {}}}}, "text.format"),
    ({"model": TINY_MODEL, "input": "Hi", "tools": [{"type": "web_search"}]}, "tools[0]"),
    ({"model": TINY_MODEL, "input": "Hi", "tools": [{"type": "function", "name": "f", "what": 1}]}, "tools[0].what"),
    ({"model": TINY_MODEL, "input": "Hi", "tools": [WEATHER], "tool_choice": {"type": "function", "name": "x"}},
     "tool_choice"),
    ({"model": TINY_MODEL, "input": "Hi", "tools": [WEATHER], "text": {"format": {"type": "json_object"}}},
     "text.format"),
    ({"model": TINY_MODEL, "input": "Hi", "truncation": "auto"}, "truncation"),
    ({"model": TINY_MODEL, "input": "Hi", "background": True}, "background"),
    ({"model": TINY_MODEL, "input": "Hi", "conversation": "conv_1"}, "conversation"),
    ({"model": TINY_MODEL, "input": "Hi", "previous_response_id": 7}, "previous_response_id"),
])
def test_bad_requests_get_400_naming_the_param(api, body, param):
    check_error(*post(api.url + "/v1/responses", body), 400, param)


def test_ignored_and_harmless_fields_are_accepted(api):
    status, body = post(api.url + "/v1/responses", {
        "model": TINY_MODEL, "input": "Hi", "max_output_tokens": 1, "reasoning": {"effort": "low"},
        "include": ["reasoning.encrypted_content"], "truncation": "disabled", "background": False,
        "service_tier": "auto", "prompt_cache_key": "k", "tool_choice": "auto", "parallel_tool_calls": True})
    assert status == 200, body
    validate("Response", body)


def test_unknown_model_is_404_and_a_healthy_stream_still_completes(api):
    finished: list[dict] = []
    worker = threading.Thread(target=lambda: finished.extend(sse_events(api.url + "/v1/responses", {
        "model": TINY_MODEL, "input": "Hello there", "max_output_tokens": 40, "stream": True})))
    worker.start()
    for _ in range(5):  # bad requests side by side with the stream
        check_error(*post(api.url + "/v1/responses", {"model": "made-up", "input": "Hi"}), 404, "model")
        check_error(*post(api.url + "/v1/responses", {"model": TINY_MODEL, "input": [{"type": "nope"}]}), 400,
                    "input[0].type")
    worker.join(60)
    assert finished and finished[-1]["type"] == "response.incomplete"
    assert finished[-1]["response"]["usage"]["output_tokens"] == 40


def test_prompt_over_the_context_is_400_naming_the_input(api):
    check_error(*post(api.url + "/v1/responses", {"model": TINY_MODEL, "input": "word " * 2000}), 400, "input")


def test_worker_death_mid_stream_is_an_error_then_a_failed_response(tiny_model_dir):
    with serving(tiny_model_dir, TINY_MODEL, "--model-names", TINY_MODEL) as running:
        server = Api(running.address).wait()
        try:
            body = {"model": TINY_MODEL, "input": "Hello there", "max_output_tokens": 480, "stream": True}
            request = urllib.request.Request(server.url + "/v1/responses", data=json.dumps(body).encode(),
                                             headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=60) as response:
                response.readline()
                os.kill(running.workers[0].pid, signal.SIGKILL)
                text = response.read().decode()
            events = [json.loads(block.split("data: ", 1)[1]) for block in text.split("\n\n") if "data: " in block]
            error, failed = events[-2:]
            assert error["type"] == "error" and "lost" in error["message"]
            assert failed["type"] == "response.failed" and failed["response"]["status"] == "failed"
            for event in (error, failed):
                validate(EVENT_SCHEMAS[event["type"]], event)
        finally:
            server.stop()


async def test_client_disconnect_cancels_the_bus_request(api, bus):
    await a_client_that_leaves_is_cancelled(api.url + "/v1/responses", {"model": TINY_MODEL, "input": "Hello there", "max_output_tokens": 480, "stream": True}, bus.address)


def test_metrics_count_the_endpoint(api):
    api.client().responses.create(model=TINY_MODEL, input="Hi", max_output_tokens=2)
    with urllib.request.urlopen(api.url + "/metrics") as response:
        text = response.read().decode()
    assert f'tokenbus_api_requests_total{{endpoint="/v1/responses",model="{TINY_MODEL}",status="200"}}' in text


def test_no_broker_is_503():
    server = Api(free_address()).wait(status=503)
    try:
        with pytest.raises(openai.InternalServerError) as error:
            server.client().responses.create(model=TINY_MODEL, input="Hi")
        assert error.value.status_code == 503
    finally:
        server.stop()


def test_overload_is_429_and_counted(tiny_model_dir):
    with serving(tiny_model_dir, TINY_MODEL, "--model-names", TINY_MODEL, "--max-batch", "1") as running:
        stop(running.broker)
        running.broker = spawn("broker", "--bind", running.address, "--max-queue", "0", log_name="broker")
        server = Api(running.address).wait()
        try:
            client = server.client()
            long_stream = client.responses.create(model=TINY_MODEL, input="Hi", max_output_tokens=480, stream=True)
            next(iter(long_stream))
            with pytest.raises(openai.RateLimitError):
                client.responses.create(model=TINY_MODEL, input="Hi", max_output_tokens=2)
            long_stream.close()
            with urllib.request.urlopen(server.url + "/metrics") as response:
                text = response.read().decode()
            assert f'tokenbus_api_rejected_overloaded_total{{model="{TINY_MODEL}"}} 1.0' in text
            assert f'tokenbus_api_requests_total{{endpoint="/v1/responses",model="{TINY_MODEL}",status="429"}}' in text
        finally:
            server.stop()


# -- LangChain


def test_langchain_chat_openai_with_the_responses_api(api):
    chat = ChatOpenAI(base_url=api.url + "/v1", api_key="none", model=TINY_MODEL, max_tokens=6, temperature=0,
                      max_retries=0, use_responses_api=True)
    answer = chat.invoke("Hello there")
    assert answer.text and answer.usage_metadata["output_tokens"] == 6
    streamed = "".join(chunk.text for chunk in chat.stream("Hello there"))
    assert streamed == answer.text


def test_langchain_tool_round_trip_with_the_responses_api(api):
    chat = ChatOpenAI(base_url=api.url + "/v1", api_key="none", model=TINY_MODEL, max_tokens=40, max_retries=0,
                      use_responses_api=True)
    question = HumanMessage(content="Weather in Paris?")
    called = chat.bind_tools([WEATHER], tool_choice="get_weather").invoke([question])
    (call,) = called.tool_calls
    assert call["name"] == "get_weather" and call["args"]["city"] in ("Paris", "Rome")
    answer = chat.invoke([question, called, ToolMessage(content="Sunny", tool_call_id=call["id"])])
    assert answer.text and answer.usage_metadata["input_tokens"] > called.usage_metadata["input_tokens"]


def test_a_schema_the_worker_cannot_compile_is_400_saying_why(api):
    for stream in (False, True):
        status, body = post(api.url + "/v1/responses", {
            "model": TINY_MODEL, "input": "Hi", "stream": stream, "text": {"format": {
                "type": "json_schema", "name": "x", "schema": {"type": "string", "minLength": 3, "maxLength": 1}}}})
        check_error(status, body, 400, "text.format")  # the worker's verdict names the field
        assert "cannot be compiled" in body["error"]["message"] and "minLength" in body["error"]["message"]
