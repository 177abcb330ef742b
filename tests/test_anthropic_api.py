"""Anthropic's Messages API over the real bus: the official `anthropic` client, raw HTTP and LangChain."""

from __future__ import annotations

import json
import os
import signal
import urllib.request

import anthropic
import pytest
from langchain_anthropic import ChatAnthropic

from broker.protocol import Done, FinishReason, TokenDelta, ToolCallDelta
from frontends.client import Completion
from frontends.openai_api.anthropic.responses import MessageEvents, message
from tests.helpers import TINY_MODEL, a_client_that_leaves_is_cancelled, serving
from tests.test_openai_api import Api, post

HELLO = [{"role": "user", "content": "Hello there"}]
WEATHER = {"name": "get_weather", "description": "The weather in a city",
           "input_schema": {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}},
                            "required": ["city"]}}
# one call, whose arguments the schema leaves no room to ramble in: the answer always ends with it
FORCED = {"type": "tool", "name": "get_weather", "disable_parallel_tool_use": True}


@pytest.fixture(scope="module")
def api(bus):
    server = Api(bus.address).wait()
    yield server
    server.stop()


def client(api: Api, key: str = "none") -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=api.url, api_key=key, max_retries=0)


def sse_events(url: str, body: dict) -> list[tuple[str, dict]]:
    """A stream's events as (event name, data)."""
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        assert response.headers["Content-Type"].startswith("text/event-stream")
        text = response.read().decode()
    events = []
    for block in text.strip().split("\n\n"):
        name, data = block.split("\n")
        events.append((name.removeprefix("event: "), json.loads(data.removeprefix("data: "))))
    return events


# -- events and messages from bus results, no processes


def test_stream_events_for_a_call_after_a_blank_line():
    events = MessageEvents(TINY_MODEL, may_call=True)
    assert [name for name, _ in events.opening()] == ["message_start", "ping"]
    frames = [TokenDelta("\n"), TokenDelta("", tool_calls=(ToolCallDelta(0, "", "call_1", "get_weather"),)),
              TokenDelta("", tool_calls=(ToolCallDelta(0, '{"city":'),)),
              TokenDelta("", tool_calls=(ToolCallDelta(0, ' "Rome"}'),))]
    sent = [event for frame in frames for event in events.delta(frame)]
    sent += events.closing(Done(FinishReason.TOOL_CALLS, 7, 9))
    assert sent == [
        ("content_block_start", {"type": "content_block_start", "index": 0, "content_block": {
            "type": "tool_use", "id": "call_1", "name": "get_weather", "input": {}}}),
        ("content_block_delta", {"type": "content_block_delta", "index": 0,
                                 "delta": {"type": "input_json_delta", "partial_json": '{"city":'}}),
        ("content_block_delta", {"type": "content_block_delta", "index": 0,
                                 "delta": {"type": "input_json_delta", "partial_json": ' "Rome"}'}}),
        ("content_block_stop", {"type": "content_block_stop", "index": 0}),
        ("message_delta", {"type": "message_delta", "delta": {"stop_reason": "tool_use", "stop_sequence": None},
                           "usage": {"input_tokens": 7, "output_tokens": 9}}),
        ("message_stop", {"type": "message_stop"}),
    ]


def test_stream_events_for_text_then_a_call():
    events = MessageEvents(TINY_MODEL, may_call=True)
    sent = events.delta(TokenDelta("\n")) + events.delta(TokenDelta("Let me look."))
    sent += events.delta(TokenDelta("", tool_calls=(ToolCallDelta(0, "{}", "call_1", "f"),)))
    assert [(name, data.get("index")) for name, data in sent] == [
        ("content_block_start", 0), ("content_block_delta", 0), ("content_block_stop", 0),
        ("content_block_start", 1), ("content_block_delta", 1)]
    assert sent[1][1]["delta"] == {"type": "text_delta", "text": "\nLet me look."}  # held back, then sent whole
    plain = MessageEvents(TINY_MODEL, may_call=False)  # without tools, blank text is a reply's: sent at once
    assert plain.delta(TokenDelta("\n"))[1][1]["delta"] == {"type": "text_delta", "text": "\n"}


def test_message_from_a_completion():
    calls = (ToolCallDelta(0, "", "call_1", "f"), ToolCallDelta(0, '{"a": 1}'), ToolCallDelta(1, "", "call_2", "g"),
             ToolCallDelta(1, '{"b": '))
    body = message("msg_1", TINY_MODEL, Completion("\n", FinishReason.LENGTH, 5, 8, tool_calls=calls))
    assert body["content"] == [{"type": "tool_use", "id": "call_1", "name": "f", "input": {"a": 1}},
                               {"type": "tool_use", "id": "call_2", "name": "g", "input": {}}]  # cut short: {}
    assert (body["stop_reason"], body["usage"]) == ("max_tokens", {"input_tokens": 5, "output_tokens": 8})
    stopped = message("msg_2", TINY_MODEL, Completion("Hi", FinishReason.STOP, 5, 2, stop="END"))
    assert stopped["content"] == [{"type": "text", "text": "Hi"}]
    assert (stopped["stop_reason"], stopped["stop_sequence"]) == ("stop_sequence", "END")


# -- messages
# (this `anthropic` client has no sampling arguments; `temperature` travels in `extra_body`, as LangChain sends it)


def test_sdk_create_answers_a_message(api):
    answer = client(api).messages.create(model=TINY_MODEL, max_tokens=5, messages=HELLO, system="Be brief.",
                                         metadata={"user_id": "u1"})
    assert answer.id.startswith("msg_") and answer.type == "message" and answer.role == "assistant"
    assert answer.model == TINY_MODEL
    assert [block.type for block in answer.content] == ["text"] and answer.content[0].text
    assert answer.stop_reason == "max_tokens" and answer.stop_sequence is None
    assert answer.usage.output_tokens == 5 and answer.usage.input_tokens > 0
    # system as text blocks, content as text blocks: the same prompt, so the same size
    blocks = client(api).messages.create(
        model=TINY_MODEL, max_tokens=1, system=[{"type": "text", "text": "Be brief."}],
        messages=[{"role": "user", "content": [{"type": "text", "text": "Hello "}, {"type": "text", "text": "there"}]}])
    assert blocks.usage.input_tokens == answer.usage.input_tokens


def test_sdk_stream_assembles_the_same_message(api):
    whole = client(api).messages.create(model=TINY_MODEL, max_tokens=8, messages=HELLO, extra_body={"temperature": 0})
    with client(api).messages.stream(model=TINY_MODEL, max_tokens=8, messages=HELLO,
                                     extra_body={"temperature": 0}) as stream:
        pieces = list(stream.text_stream)
        final = stream.get_final_message()
    assert len(pieces) > 1 and "".join(pieces) == whole.content[0].text
    assert final.content[0].text == whole.content[0].text and final.id.startswith("msg_")
    assert final.stop_reason == "max_tokens"
    assert (final.usage.input_tokens, final.usage.output_tokens) == (whole.usage.input_tokens, 8)


def test_stream_events_come_in_anthropics_order(api):
    events = sse_events(api.url + "/v1/messages", {"model": TINY_MODEL, "messages": HELLO, "max_tokens": 4,
                                                   "stream": True})
    names = [name for name, _ in events]
    assert names[:4] == ["message_start", "ping", "content_block_start", "content_block_delta"]
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert set(names[3:-3]) == {"content_block_delta"}
    assert all(data["type"] == name for name, data in events)
    start = events[0][1]["message"]
    assert start["id"].startswith("msg_") and start["content"] == [] and start["stop_reason"] is None
    assert events[2][1] == {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}
    assert all(data["index"] == 0 and data["delta"]["type"] == "text_delta" for _, data in events[3:-3])
    delta = events[-2][1]
    assert delta["delta"] == {"stop_reason": "max_tokens", "stop_sequence": None}
    assert delta["usage"]["output_tokens"] == 4 and delta["usage"]["input_tokens"] > 0


def test_stop_sequences_cut_the_text(api):
    full = client(api).messages.create(model=TINY_MODEL, max_tokens=24, messages=HELLO,
                                       extra_body={"temperature": 0})
    text = full.content[0].text
    stop = text[len(text) // 2:][:3]
    cut = client(api).messages.create(model=TINY_MODEL, max_tokens=24, messages=HELLO, extra_body={"temperature": 0},
                                      stop_sequences=[stop])
    assert "".join(block.text for block in cut.content) == text[:text.index(stop)]
    assert cut.usage.output_tokens < 24
    assert (cut.stop_reason, cut.stop_sequence) == ("stop_sequence", stop)
    events = sse_events(api.url + "/v1/messages", {"model": TINY_MODEL, "messages": HELLO, "max_tokens": 24,
                                                   "temperature": 0, "stop_sequences": ["zzz", stop], "stream": True})
    assert events[-2][1]["delta"] == {"stop_reason": "stop_sequence", "stop_sequence": stop}
    free = client(api).messages.create(model=TINY_MODEL, max_tokens=24, messages=HELLO, stop_sequences=["zzzz"])
    assert free.stop_sequence is None and free.stop_reason in ("end_turn", "max_tokens")


# -- tools


def test_tool_use_round_trip(api):
    anthropic_client = client(api)
    question = [{"role": "user", "content": "What is the weather in Paris?"}]
    call = anthropic_client.messages.create(model=TINY_MODEL, max_tokens=100, messages=question, tools=[WEATHER],
                                            tool_choice=FORCED, extra_body={"temperature": 0})
    assert call.stop_reason == "tool_use"
    uses = [block for block in call.content if block.type == "tool_use"]
    assert len(uses) == 1 and uses[0].name == "get_weather" and uses[0].input["city"] in ("Paris", "Rome")
    with anthropic_client.messages.stream(model=TINY_MODEL, max_tokens=100, messages=question, tools=[WEATHER],
                                          tool_choice=FORCED, extra_body={"temperature": 0}) as stream:
        streamed = stream.get_final_message()
    assert streamed.stop_reason == "tool_use" and streamed.content[-1].input == uses[0].input
    history = [*question, {"role": "assistant", "content": [block.model_dump() for block in call.content]},
               {"role": "user", "content": [{"type": "tool_result", "tool_use_id": uses[0].id,
                                             "content": [{"type": "text", "text": "Sunny, 21 C"}]},
                                            {"type": "text", "text": "Thanks!"}]}]
    answer = anthropic_client.messages.create(model=TINY_MODEL, max_tokens=6, messages=history, tools=[WEATHER],
                                              tool_choice={"type": "none"})
    assert answer.stop_reason in ("end_turn", "max_tokens") and answer.content[0].type == "text"
    # the tool result reached the prompt: a longer one answers a longer prompt
    longer = [*history[:2], {"role": "user", "content": [{**history[2]["content"][0], "content": "Sunny " * 20},
                                                         history[2]["content"][1]]}]
    again = anthropic_client.messages.create(model=TINY_MODEL, max_tokens=1, messages=longer, tools=[WEATHER],
                                             tool_choice={"type": "none"})
    assert again.usage.input_tokens > answer.usage.input_tokens


def test_tool_use_streams_input_json_deltas(api):
    events = sse_events(api.url + "/v1/messages", {
        "model": TINY_MODEL, "max_tokens": 100, "messages": HELLO, "tools": [WEATHER], "tool_choice": FORCED,
        "stream": True})
    starts = [data["content_block"] for name, data in events if name == "content_block_start"]
    assert [block["type"] for block in starts] == ["tool_use"]
    assert starts[0]["name"] == "get_weather" and starts[0]["input"] == {}
    partial = "".join(data["delta"]["partial_json"] for name, data in events if name == "content_block_delta")
    assert json.loads(partial)["city"] in ("Paris", "Rome")
    assert events[-2][1]["delta"]["stop_reason"] == "tool_use"


# -- count_tokens


def test_count_tokens_is_the_size_of_the_prompt_answered(api):
    anthropic_client = client(api)
    question = [{"role": "user", "content": "What is the weather in Paris?"}]
    for tools in ({}, {"tools": [WEATHER]}, {"tools": [WEATHER], "tool_choice": FORCED}):
        counted = anthropic_client.messages.count_tokens(model=TINY_MODEL, messages=question, system="Be brief.",
                                                         **tools)
        answer = anthropic_client.messages.create(model=TINY_MODEL, max_tokens=1, messages=question,
                                                  system="Be brief.", **tools)
        assert counted.input_tokens == answer.usage.input_tokens > 0
    without_tools = anthropic_client.messages.count_tokens(model=TINY_MODEL, messages=question, system="Be brief.")
    assert counted.input_tokens > without_tools.input_tokens
    with pytest.raises(anthropic.NotFoundError):
        anthropic_client.messages.count_tokens(model="nope", messages=question)
    with pytest.raises(anthropic.BadRequestError, match="messages.0.content.0.type"):
        anthropic_client.messages.count_tokens(model=TINY_MODEL, messages=[
            {"role": "user", "content": [{"type": "image", "source": {"type": "url", "url": "http://x"}}]}])


# -- LangChain


def test_langchain_chat_anthropic(api):
    chat = ChatAnthropic(base_url=api.url, api_key="none", model=TINY_MODEL, max_tokens=6, temperature=0,
                         max_retries=0)
    answer = chat.invoke("Hello there")
    assert answer.content and answer.response_metadata["stop_reason"] == "max_tokens"
    assert answer.usage_metadata["output_tokens"] == 6
    streamed = "".join(chunk.text for chunk in chat.stream("Hello there"))
    assert streamed == answer.content


# -- errors


@pytest.mark.parametrize("body, status, kind, field", [
    (b"{not json", 400, "invalid_request_error", "JSON"),
    ({"model": TINY_MODEL, "messages": HELLO}, 400, "invalid_request_error", "max_tokens"),
    ({"model": TINY_MODEL, "messages": HELLO, "max_tokens": "5"}, 400, "invalid_request_error", "max_tokens"),
    ({"messages": HELLO, "max_tokens": 5}, 400, "invalid_request_error", "model"),
    ({"model": TINY_MODEL, "messages": "hi", "max_tokens": 5}, 400, "invalid_request_error", "messages"),
    ({"model": TINY_MODEL, "messages": HELLO, "max_tokens": 5, "temperature": 1.5}, 400, "invalid_request_error",
     "temperature"),
    ({"model": TINY_MODEL, "messages": HELLO, "max_tokens": 5, "top_p": 3}, 400, "invalid_request_error", "top_p"),
    ({"model": TINY_MODEL, "messages": HELLO, "max_tokens": 5, "stop_sequences": "x"}, 400, "invalid_request_error",
     "stop_sequences"),
    ({"model": TINY_MODEL, "messages": HELLO, "max_tokens": 5, "stop_sequences": ["a", "b", "c", "d", "e"]}, 400,
     "invalid_request_error", "stop_sequences"),
    ({"model": TINY_MODEL, "messages": HELLO, "max_tokens": 5, "stream": "yes"}, 400, "invalid_request_error",
     "stream"),
    ({"model": TINY_MODEL, "messages": HELLO, "max_tokens": 5, "system": 5}, 400, "invalid_request_error", "system"),
    ({"model": TINY_MODEL, "messages": HELLO, "max_tokens": 5, "thinking": {"type": "enabled"}}, 400,
     "invalid_request_error", "thinking"),
    ({"model": TINY_MODEL, "max_tokens": 5, "messages": [{"role": "user", "content": [
        {"type": "image", "source": {"type": "url", "url": "http://x"}}]}]}, 400, "invalid_request_error",
     "messages.0.content.0.type"),
    ({"model": TINY_MODEL, "max_tokens": 5, "messages": [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": [
            {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_2", "content": "Sunny"}]}]}, 400,
     "invalid_request_error", "messages.2.content.0.tool_use_id"),
    ({"model": TINY_MODEL, "max_tokens": 5, "messages": [{"role": "tool", "content": "x"}]}, 400,
     "invalid_request_error", "messages.0.role"),
    ({"model": TINY_MODEL, "max_tokens": 5, "messages": [*HELLO, {"role": "assistant", "content": "Well"}]}, 400,
     "invalid_request_error", "messages.1.role"),
    ({"model": TINY_MODEL, "max_tokens": 5, "messages": HELLO, "tools": [{"name": "f"}]}, 400,
     "invalid_request_error", "tools.0.input_schema"),
    ({"model": TINY_MODEL, "max_tokens": 5, "messages": HELLO, "tools": [WEATHER],
      "tool_choice": {"type": "tool", "name": "other"}}, 400, "invalid_request_error", "tool_choice.name"),
    ({"model": TINY_MODEL, "max_tokens": 5, "messages": HELLO, "tools": [WEATHER], "stop_sequences": ["x"]}, 400,
     "invalid_request_error", "stop_sequences"),
    ({"model": "nope", "messages": HELLO, "max_tokens": 5}, 404, "not_found_error", "nope"),
])
def test_bad_requests_get_anthropics_error_naming_the_field(api, body, status, kind, field):
    for stream in (False, True):
        sent = body if isinstance(body, bytes) else {**body, "stream": body.get("stream", stream)}
        got_status, error = post(api.url + "/v1/messages", sent)
        assert got_status == status, error
        assert set(error) == {"type", "error"} and error["type"] == "error"
        assert error["error"]["type"] == kind and field in error["error"]["message"], error


def test_errors_outside_the_handler_have_anthropics_shape_too(bus):
    server = Api(bus.address, "--max-body-bytes", "2048").wait()
    try:
        status, error = post(server.url + "/v1/messages", {"model": TINY_MODEL, "max_tokens": 3,
                                                           "messages": [{"role": "user", "content": "x" * 5000}]})
        assert status == 413 and error["error"]["type"] == "request_too_large"
        status, error = post(server.url + "/v1/messages", {"model": TINY_MODEL, "max_tokens": 3,
                                                           "messages": [{"role": "user", "content": "hi " * 600}]})
        assert status == 400 and error["error"]["message"].startswith("messages: the prompt has")
        with pytest.raises(urllib.error.HTTPError) as wrong_method:
            urllib.request.urlopen(server.url + "/v1/messages")
        assert wrong_method.value.code == 405 and json.loads(wrong_method.value.read())["type"] == "error"
    finally:
        server.stop()


def test_sdk_raises_anthropics_exception_types(api):
    with pytest.raises(anthropic.BadRequestError, match="messages.0.content.0.type") as error:
        client(api).messages.create(model=TINY_MODEL, max_tokens=5, messages=[{"role": "user", "content": [
            {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "x"}}]}])
    assert error.value.body["error"]["type"] == "invalid_request_error"
    with pytest.raises(anthropic.NotFoundError):
        client(api).messages.create(model="nope", max_tokens=5, messages=HELLO)
    # the other routes keep OpenAI's shape
    status, body = post(api.url + "/v1/chat/completions", {"model": "nope", "messages": HELLO})
    assert status == 404 and body["error"]["code"] == "model_not_found"
    client(api).messages.create(model=TINY_MODEL, max_tokens=1, messages=HELLO)
    with urllib.request.urlopen(api.url + "/metrics") as response:
        text = response.read().decode()
    assert "nope" not in text, "a client's model string must not become a label"
    assert f'tokenbus_api_requests_total{{endpoint="/v1/messages",model="{TINY_MODEL}",status="200"}}' in text
    assert 'tokenbus_api_requests_total{endpoint="/v1/messages",model="",status="404"}' in text


def test_bad_requests_leave_a_running_stream_alone(api):
    with client(api).messages.stream(model=TINY_MODEL, max_tokens=200, messages=HELLO) as stream:
        first = next(iter(stream))
        assert first.type == "message_start"
        for body in ({"model": TINY_MODEL, "messages": HELLO},
                     {"model": TINY_MODEL, "max_tokens": 5, "messages": [{"role": "user", "content": [{"type": "x"}]}]},
                     {"model": "nope", "messages": HELLO, "max_tokens": 5, "stream": True}):
            assert post(api.url + "/v1/messages", body)[0] in (400, 404)
        final = stream.get_final_message()
    assert final.stop_reason == "max_tokens" and final.usage.output_tokens == 200


async def test_client_disconnect_cancels_the_bus_request(api, bus):
    await a_client_that_leaves_is_cancelled(api.url + "/v1/messages", {"model": TINY_MODEL, "messages": HELLO, "max_tokens": 480, "stream": True}, bus.address)


def test_worker_death_mid_stream_is_an_error_event(tiny_model_dir):
    with serving(tiny_model_dir, TINY_MODEL, "--model-names", TINY_MODEL) as running:
        server = Api(running.address).wait()
        try:
            with client(server).messages.stream(model=TINY_MODEL, max_tokens=480, messages=HELLO) as stream:
                events = iter(stream)
                next(events)
                os.kill(running.workers[0].pid, signal.SIGKILL)
                with pytest.raises(anthropic.APIStatusError, match="lost") as error:
                    for _ in events:
                        pass
            assert error.value.body["error"]["type"] == "overloaded_error"
        finally:
            server.stop()


def test_api_keys_from_either_header(bus):
    server = Api(bus.address, "--api-keys", '["k1","k2"]').wait()
    try:
        with pytest.raises(anthropic.AuthenticationError) as error:
            client(server, "wrong").messages.create(model=TINY_MODEL, max_tokens=1, messages=HELLO)
        assert error.value.body["error"]["type"] == "authentication_error"
        assert client(server, "k2").messages.create(model=TINY_MODEL, max_tokens=1, messages=HELLO).usage.output_tokens
        # each client's header works on each route; a wrong key is refused in the route's shape
        status, _ = post(server.url + "/v1/messages", {"model": TINY_MODEL, "messages": HELLO, "max_tokens": 1},
                         headers={"Authorization": "Bearer k1"})
        assert status == 200
        status, _ = post(server.url + "/v1/chat/completions", {"model": TINY_MODEL, "messages": HELLO, "max_tokens": 1},
                         headers={"x-api-key": "k1"})
        assert status == 200
        status, error = post(server.url + "/v1/chat/completions", {"model": TINY_MODEL, "messages": HELLO},
                             headers={"x-api-key": "k3"})
        assert status == 401 and error["error"]["code"] == "invalid_api_key"
    finally:
        server.stop()


@pytest.mark.slow
def test_the_default_model_calls_a_tool_and_reads_its_result(default_bus):
    server = Api(default_bus.address).wait()
    try:
        anthropic_client = client(server)
        question = [{"role": "user", "content": "What is the weather in Rome?"}]
        call = anthropic_client.messages.create(model=default_bus.model, max_tokens=100, messages=question,
                                                tools=[WEATHER], tool_choice={"type": "any"},
                                                extra_body={"temperature": 0})
        assert call.stop_reason == "tool_use", call
        use = next(block for block in call.content if block.type == "tool_use")
        assert use.name == "get_weather" and use.input["city"] in ("Paris", "Rome")
        history = [*question, {"role": "assistant", "content": [block.model_dump() for block in call.content]},
                   {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id,
                                                 "content": "Sunny, 21 degrees"}]}]
        answer = anthropic_client.messages.create(model=default_bus.model, max_tokens=60, messages=history,
                                                  tools=[WEATHER], extra_body={"temperature": 0})
        assert answer.stop_reason in ("end_turn", "max_tokens", "tool_use") and answer.content
        assert anthropic_client.messages.count_tokens(model=default_bus.model, messages=history,
                                                      tools=[WEATHER]).input_tokens == answer.usage.input_tokens
    finally:
        server.stop()
