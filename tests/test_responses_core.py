"""The Responses API's core without processes: the events and objects a builder makes from bus
results, request parsing's defaults, and the store's order."""

from __future__ import annotations

import pytest

from broker.protocol import Done, FinishReason, TokenDelta, ToolCallDelta
from frontends.openai_api.errors import ApiError
from frontends.openai_api.responses_api.objects import ResponseBuilder
from frontends.openai_api.responses_api.request import parse_create
from frontends.openai_api.responses_api.store import ResponseStore, StoredResponse
from tests.openai_schema import validate
from tests.test_responses_api import EVENT_SCHEMAS

ECHO = parse_create({"model": "m", "input": "Hi"}, ResponseStore(1)).echo


def test_blank_text_before_a_call_is_no_reply():
    builder = ResponseBuilder(ECHO)
    events = builder.opening() + builder.delta(TokenDelta("\n "))
    events += builder.delta(TokenDelta("", tool_calls=(ToolCallDelta(0, "", "call_1", "f"),)))
    events += builder.delta(TokenDelta("", tool_calls=(ToolCallDelta(0, '{"a": 1}'),)))
    events += builder.finish(Done(FinishReason.TOOL_CALLS, 7, 5))
    assert [e["type"] for e in events] == [
        "response.created", "response.in_progress", "response.output_item.added",
        "response.function_call_arguments.delta", "response.function_call_arguments.done",
        "response.output_item.done", "response.completed"]
    assert [e["sequence_number"] for e in events] == list(range(7))
    (call,) = events[-1]["response"]["output"]
    assert (call["call_id"], call["name"], call["arguments"], call["status"]) == ("call_1", "f", '{"a": 1}', "completed")
    assert events[2]["item"]["arguments"] == "" and events[2]["item"]["status"] == "in_progress"
    assert builder.conversation() == [{"role": "assistant", "content": "",
                                       "tool_calls": [{"id": "call_1", "name": "f", "arguments": '{"a": 1}'}]}]
    for event in events:
        validate(EVENT_SCHEMAS[event["type"]], event)


def test_text_then_a_call_are_two_items_and_a_cut_leaves_them_incomplete():
    builder = ResponseBuilder(ECHO)
    builder.delta(TokenDelta("  Let me"))
    builder.delta(TokenDelta(" check.", tool_calls=(ToolCallDelta(0, '{"a"', "call_1", "f"),)))
    events = builder.finish(Done(FinishReason.LENGTH, 3, 9, cached_tokens=2))
    message, call = builder.response()["output"]
    assert message["content"][0]["text"] == "  Let me check." and message["status"] == "completed"
    assert call["arguments"] == '{"a"' and call["status"] == "incomplete"
    assert events[-1]["type"] == "response.incomplete"
    assert events[-1]["response"]["incomplete_details"] == {"reason": "max_output_tokens"}
    assert events[-1]["response"]["usage"]["input_tokens_details"]["cached_tokens"] == 2


def test_an_empty_answer_is_an_empty_message_and_a_failure_is_two_events():
    builder = ResponseBuilder(ECHO)
    events = builder.finish(Done(FinishReason.STOP, 3, 0))
    assert [e["type"] for e in events][:2] == ["response.output_item.added", "response.content_part.added"]
    assert builder.response()["output"][0]["content"][0]["text"] == ""
    failed = ResponseBuilder(ECHO).fail(ApiError(503, "the worker was lost", code="worker_lost"))
    assert [e["type"] for e in failed] == ["error", "response.failed"]
    assert failed[1]["response"]["error"] == {"code": "server_error", "message": "the worker was lost"}


def test_the_store_drops_the_oldest_first():
    store = ResponseStore(2)
    for name in ("a", "b", "c"):
        store.add(StoredResponse({"id": name}, ()))
    assert (store.get("a"), len(store)) == (None, 2)
    assert store.remove("b") and not store.remove("b") and store.get("c") is not None
    nothing = ResponseStore(0)
    nothing.add(StoredResponse({"id": "a"}, ()))
    assert nothing.get("a") is None


def test_a_stored_conversation_comes_before_the_input_and_instructions_stay_first():
    store = ResponseStore(4)
    calls = [{"id": "c1", "name": "f", "arguments": "{}"}]
    store.add(StoredResponse({"id": "resp_1"}, ({"role": "user", "content": "Weather?"},
                                                {"role": "assistant", "content": "", "tool_calls": calls})))
    call = parse_create({"model": "m", "instructions": "Be brief.", "previous_response_id": "resp_1", "input": [
        {"type": "function_call_output", "call_id": "c1", "output": [{"type": "input_text", "text": "Sunny"}]},
        {"role": "assistant", "content": "It is sunny."},
        {"type": "function_call", "call_id": "c2", "name": "f", "arguments": "{}"}]}, store)
    messages = [message.to_fields() for message in call.request.messages]
    assert messages == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": "", "tool_calls": calls},
        {"role": "tool", "content": "Sunny", "name": "f", "tool_call_id": "c1"},
        {"role": "assistant", "content": "It is sunny.",  # a call after a reply belongs to that turn
         "tool_calls": [{"id": "c2", "name": "f", "arguments": "{}"}]},
    ]
    assert list(call.conversation) == messages[1:], "instructions are not stored with the conversation"
    assert call.echo["previous_response_id"] == "resp_1" and call.store and not call.stream


def test_a_stored_response_is_seen_only_by_the_key_that_made_it():
    store = ResponseStore(4)
    store.add(StoredResponse({"id": "a"}, ({"role": "user", "content": "Hi"},), owner="alice"))
    assert store.get("a", "alice") is not None and store.get("a", "bob") is None and store.get("a") is None
    with pytest.raises(ApiError) as error:  # continuing another key's conversation: unknown to this one
        parse_create({"model": "m", "input": "Go on", "previous_response_id": "a"}, store, "bob")
    assert error.value.status == 404
    assert not store.remove("a", "bob") and store.remove("a", "alice") and len(store) == 0
