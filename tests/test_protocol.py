"""Protocol round trips and rejection of malformed frames."""

import msgpack
import pytest

from broker import protocol
from broker.protocol import Command, GenerationRequest, ProtocolError

RID = bytes(range(16))


def test_message_round_trip():
    frames = protocol.encode(Command.TOKEN, RID, {"text": "héllo", "num_tokens": 1})
    assert frames[0] == protocol.PROTOCOL_SIGNATURE and frames[1] == b"TOKEN"
    message = protocol.decode(frames)
    assert message.command is Command.TOKEN and message.request_id == RID
    assert protocol.TokenDelta.from_fields(message.fields()) == protocol.TokenDelta("héllo", 1)


def test_packed_body_is_forwarded_verbatim():
    body = msgpack.packb({"text": "x"})
    assert protocol.encode(Command.TOKEN, RID, body)[3] is body


def test_generation_request_round_trip():
    request = GenerationRequest.from_fields({
        "model": "m", "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
        "max_tokens": 5, "temperature": 0, "stop": ["\n"], "seed": 3, "logprobs": True, "top_logprobs": 2,
    })
    assert GenerationRequest.from_fields(request.to_fields()) == request
    assert request.messages[1] == protocol.ChatMessage("user", "hi")
    named = GenerationRequest.from_fields({"model": "m", "messages": [{"role": "user", "content": "hi", "name": "ann"}]})
    assert named.messages[0].name == "ann" and named.to_fields()["messages"] == [
        {"role": "user", "content": "hi", "name": "ann"}]
    assert request.to_fields()["messages"][1] == {"role": "user", "content": "hi"}  # no name: no key
    assert GenerationRequest.from_fields({"model": "m", "prompt": "a", "top_k": -1}).top_k == 0  # vLLM's "off"


def test_typed_bodies_round_trip():
    top = (protocol.TokenLogprob("a", -0.5, b"a"), protocol.TokenLogprob("\ufffd", -1.5, b"\xe4"))
    delta = protocol.TokenDelta("a", 1, (protocol.TokenLogprob("a", -0.5, b"a", top),))
    assert protocol.TokenDelta.from_fields(delta.to_fields()) == delta
    done = protocol.Done(protocol.FinishReason.LENGTH, 3, 4)
    assert protocol.Done.from_fields(done.to_fields()) == done
    stopped = protocol.Done(protocol.FinishReason.STOP, 3, 4, stop="\n\n")
    assert protocol.Done.from_fields(stopped.to_fields()) == stopped and "stop" not in done.to_fields()
    error = protocol.Error(protocol.ErrorCode.OVERLOADED, "busy")
    assert protocol.Error.from_fields(error.to_fields()) == error
    ready = protocol.Ready("w1", ("a", "b"), 4, 512, 2048)
    assert protocol.Ready.from_fields(ready.to_fields()) == ready
    models = [protocol.ModelInfo("a", 1, 4, 0, 0, 512)]
    assert protocol.parse_model_list(protocol.model_list_fields(models)) == models
    workers = [protocol.WorkerInfo("w1", ("a",), 4, 1, 0.5, 7, 2048)]
    assert protocol.parse_worker_list(protocol.worker_list_fields(workers)) == workers


@pytest.mark.parametrize("frames, reason", [
    ([b"TBUS1", b"TOKEN", RID], "expected 4 frames"),
    ([b"TBUS9", b"TOKEN", RID, b"\x80"], "signature"),
    ([b"TBUS1", b"EXPLODE", RID, b"\x80"], "unknown command"),
    ([b"TBUS1", b"\xff\xfe", RID, b"\x80"], "unknown command"),
    ([b"TBUS1", b"TOKEN", b"short", b"\x80"], "request id"),
    ([b"TBUS1", b"TOKEN", RID, b"x" * (protocol.MAX_MESSAGE_SIZE + 1)], "too large"),
])
def test_malformed_frames_are_rejected(frames, reason):
    with pytest.raises(ProtocolError, match=reason):
        protocol.decode(frames)


@pytest.mark.parametrize("body", [b"\xc1", b"\x92\x01\x02", msgpack.packb("text"), b""])
def test_garbage_bodies_are_rejected(body):
    with pytest.raises(ProtocolError):
        protocol.decode([b"TBUS1", b"REQUEST", RID, body]).fields()


@pytest.mark.parametrize("fields, field", [
    ({}, "model"),
    ({"model": "m"}, "messages"),
    ({"model": "m", "prompt": "a", "messages": [{"role": "user", "content": "b"}]}, "messages"),
    ({"model": "m", "messages": []}, "messages"),
    ({"model": "m", "messages": [{"role": "robot", "content": "b"}]}, "messages[0].role"),
    ({"model": "m", "messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ({"model": 7, "prompt": "a"}, "model"),
    ({"model": "m", "prompt": "a", "max_tokens": 0}, "max_tokens"),
    ({"model": "m", "prompt": "a", "max_tokens": "5"}, "max_tokens"),
    ({"model": "m", "prompt": "a", "max_tokens": True}, "max_tokens"),
    ({"model": "m", "prompt": "a", "temperature": 2.5}, "temperature"),
    ({"model": "m", "prompt": "a", "temperature": float("nan")}, "temperature"),
    ({"model": "m", "prompt": "a", "top_p": 0}, "top_p"),
    ({"model": "m", "prompt": "a", "top_k": -2}, "top_k"),
    ({"model": "m", "prompt": "a", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"model": "m", "prompt": "a", "stop": [""]}, "stop"),
    ({"model": "m", "prompt": "a", "stop": [1]}, "stop"),
    ({"model": "m", "prompt": "a", "presence_penalty": 3}, "presence_penalty"),
    ({"model": "m", "prompt": "a", "top_logprobs": 21}, "top_logprobs"),
    ({"model": "m", "prompt": "a", "tools": []}, "tools"),
])
def test_invalid_requests_name_the_field(fields, field):
    with pytest.raises(ProtocolError) as error:
        GenerationRequest.from_fields(fields)
    assert error.value.field == field


def test_ready_needs_models_and_capacity():
    with pytest.raises(ProtocolError):
        protocol.Ready.from_fields({"worker_id": "w", "models": [], "capacity": 1})
    with pytest.raises(ProtocolError):
        protocol.Ready.from_fields({"worker_id": "w", "models": ["m"], "capacity": 0})


def test_constraint_round_trip_and_checks():
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    request = GenerationRequest.from_fields({"model": "m", "prompt": "x",
                                             "constraint": {"type": "json_schema", "schema": schema}})
    assert GenerationRequest.from_fields(request.to_fields()) == request
    assert request.constraint == protocol.Constraint("json_schema", schema)
    assert GenerationRequest.from_fields({"model": "m", "prompt": "x", "constraint": {"type": "json_object"}}
                                         ).constraint.schema is None
    reordered = protocol.Constraint("json_schema", {"required": ["a"], "properties": schema["properties"], "type": "object"})
    assert reordered.key == request.constraint.key


@pytest.mark.parametrize("constraint, field", [
    ("json", "constraint"),
    ({"type": "regex"}, "constraint.type"),
    ({"type": "json_schema"}, "constraint.schema"),
    ({"type": "json_object", "schema": {}}, "constraint.schema"),
    ({"type": "json_schema", "schema": []}, "constraint.schema"),
    ({"type": "json_schema", "schema": {"const": b"\x00"}}, "constraint.schema"),
    ({"type": "json_object", "grammar": "x"}, "constraint"),
])
def test_malformed_constraints_are_refused(constraint, field):
    with pytest.raises(ProtocolError) as caught:
        GenerationRequest.from_fields({"model": "m", "prompt": "x", "constraint": constraint})
    assert caught.value.field == field


def test_a_constraint_takes_no_stop_strings():
    with pytest.raises(ProtocolError, match="stop"):
        GenerationRequest.from_fields({"model": "m", "prompt": "x", "stop": ["}"], "constraint": {"type": "json_object"}})


WEATHER = {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}
CHAT = [{"role": "user", "content": "Weather?"}]


def test_tools_calls_and_results_round_trip():
    history = [*CHAT, {"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_1", "name": "get_weather", "arguments": '{"city": "Rome"}'}]},
        {"role": "tool", "content": "Sunny", "tool_call_id": "call_1", "name": "get_weather"}]
    request = GenerationRequest.from_fields({"model": "m", "messages": history, "tools": {
        "functions": [WEATHER, {"name": "add", "parameters": {}, "description": "Adds"}], "function": "add",
        "parallel": False}})
    assert GenerationRequest.from_fields(request.to_fields()) == request
    assert request.tools.calls_required and [f.name for f in request.tools.callable] == ["add"]
    assert request.messages[1].tool_calls[0].arguments == '{"city": "Rome"}'
    assert request.messages[2].tool_call_id == "call_1"
    delta = protocol.TokenDelta("", 3, None, (protocol.ToolCallDelta(0, "", "call_x", "add"),
                                              protocol.ToolCallDelta(0, '{"a": 1}')))
    assert protocol.TokenDelta.from_fields(delta.to_fields()) == delta
    assert protocol.Done.from_fields({"finish_reason": "tool_calls"}).finish_reason is protocol.FinishReason.TOOL_CALLS


@pytest.mark.parametrize("tools, field", [
    ([WEATHER], "tools"),
    ({"functions": []}, "tools.functions"),
    ({"functions": [WEATHER, WEATHER]}, "tools.functions"),
    ({"functions": [{"name": "f"}]}, "tools.functions[0].parameters"),
    ({"functions": [{**WEATHER, "strict": True}]}, "tools.functions[0]"),
    ({"functions": [WEATHER], "choice": "none"}, "tools.choice"),
    ({"functions": [WEATHER], "function": "add"}, "tools.function"),
    ({"functions": [WEATHER], "parallel": 1}, "tools.parallel"),
    ({"functions": [{**WEATHER, "parameters": {"const": b"\x00"}}]}, "tools.functions"),
])
def test_malformed_tools_are_refused(tools, field):
    with pytest.raises(ProtocolError) as caught:
        GenerationRequest.from_fields({"model": "m", "messages": CHAT, "tools": tools})
    assert caught.value.field == field


@pytest.mark.parametrize("fields, field", [
    ({"prompt": "x", "tools": {"functions": [WEATHER]}}, "tools"),
    ({"messages": CHAT, "tools": {"functions": [WEATHER]}, "constraint": {"type": "json_object"}}, "constraint"),
    ({"messages": CHAT, "tools": {"functions": [WEATHER]}, "stop": ["x"]}, "stop"),
    ({"messages": [{"role": "user", "content": "x", "tool_calls": [{"id": "c", "name": "f", "arguments": ""}]}]},
     "messages[0].tool_calls"),
    ({"messages": [{"role": "assistant", "content": "", "tool_calls": [{"id": "c"}]}]}, "messages[0].tool_calls[0].name"),
    ({"messages": [{"role": "tool", "content": "x", "tool_call_id": 5}]}, "messages[0].tool_call_id"),
    ({"messages": [{"role": "function", "content": "x"}]}, "messages[0].role"),
])
def test_tools_go_with_chats_and_nothing_that_could_break_a_call(fields, field):
    with pytest.raises(ProtocolError) as caught:
        GenerationRequest.from_fields({"model": "m", **fields})
    assert caught.value.field == field


def test_an_error_about_one_field_names_it_in_its_message_and_can_be_renamed():
    with pytest.raises(ProtocolError) as caught:
        GenerationRequest.from_fields({"model": "m", "prompt": "a", "max_tokens": 0})
    renamed = caught.value.renamed("max_completion_tokens")
    assert renamed.field == "max_completion_tokens"
    assert str(renamed) == "'max_completion_tokens' must be between 1 and 2147483647, got 0"
    with pytest.raises(ProtocolError) as caught:  # a message not built from the name keeps its text
        GenerationRequest.from_fields({"model": "m"})
    assert str(caught.value.renamed("input")) == str(caught.value) and caught.value.renamed("input").field == "input"
    with pytest.raises(ProtocolError, match="^'constraint.type' is required$"):  # a nested field, by its path
        GenerationRequest.from_fields({"model": "m", "prompt": "a", "constraint": {}})
