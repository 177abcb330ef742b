"""Anthropic Messages request bodies to bus requests. Errors name the field as Anthropic does
(`messages.1.content.0.tool_use_id`); ranges the bus shares with OpenAI are checked by
`GenerationRequest`, as for the OpenAI routes."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from broker.protocol import Function, GenerationRequest, ProtocolError, ToolCall, Tools
from frontends.openai_api.body import object_body
from frontends.openai_api.errors import ApiError, bad_request, in_api_terms

_CHAT_FIELDS = {"model", "messages", "system", "tools", "tool_choice"}
MESSAGE_FIELDS = _CHAT_FIELDS | {"max_tokens", "stop_sequences", "temperature", "top_p", "top_k", "stream"}
# Accepted and dropped: they never change the output (bookkeeping on Anthropic's side, and caching, which
# the prefix cache does unasked).
IGNORED_FIELDS = frozenset({"metadata", "service_tier", "cache_control"})
_BLOCK_IGNORED = frozenset({"cache_control", "citations"})  # caching is automatic here (the prefix cache)
_TOOL_CHOICES = {"auto": "auto", "any": "required", "tool": "required"}
# bus field -> Anthropic field, for the errors of the bus request (the tools' own fields are all `tools`)
FIELD_NAMES = {"stop": "stop_sequences", "tools": "tools"}


@dataclass(frozen=True, slots=True)
class MessagesCall:
    """A parsed `/v1/messages` body: the one bus request, and whether to stream the answer."""

    request: GenerationRequest
    stream: bool


def invalid(field: str | None, problem: str) -> ApiError:
    """A 400 whose message starts with the offending field, as Anthropic's do."""
    return bad_request(f"{field}: {problem}" if field else problem, field)


def parse_message_request(body: Any) -> MessagesCall:
    body = object_body(body, MESSAGE_FIELDS, IGNORED_FIELDS, unsupported=_extra_input)
    fields = _chat_fields(body)
    if "max_tokens" not in body:
        raise invalid("max_tokens", "Field required")
    max_tokens = body["max_tokens"]
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        raise invalid("max_tokens", "must be a positive integer")
    stop = body.get("stop_sequences", [])
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise invalid("stop_sequences", "must be an array of strings")
    temperature = body.get("temperature", 1.0)
    if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or not 0 <= temperature <= 1:
        raise invalid("temperature", "must be a number from 0 to 1")
    for name in ("top_p", "top_k"):
        if name in body and (not isinstance(body[name], (int, float)) or isinstance(body[name], bool)):
            raise invalid(name, "must be a number")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise invalid("stream", "must be a boolean")
    sampling = {name: body[name] for name in ("top_p", "top_k") if name in body}
    request = _generation_request({**fields, **sampling, "max_tokens": max_tokens, "stop": stop,
                                   "temperature": temperature})
    return MessagesCall(request, stream)


def parse_count_request(body: Any) -> GenerationRequest:
    """A `/v1/messages/count_tokens` body: the bus request whose prompt is counted."""
    body = object_body(body, _CHAT_FIELDS, IGNORED_FIELDS, unsupported=_extra_input)
    return _generation_request(_chat_fields(body))


def _generation_request(fields: dict[str, Any]) -> GenerationRequest:
    try:
        return GenerationRequest.from_fields(fields)
    except ProtocolError as exc:
        error = in_api_terms(exc, FIELD_NAMES)
        raise invalid(error.field, str(error)) from None


def _extra_input(name: str) -> ApiError:
    return invalid(name, "Extra inputs are not permitted (not supported by this server)")


def _chat_fields(body: dict[str, Any]) -> dict[str, Any]:
    """The bus fields for `model`, `system`, `messages`, `tools` and `tool_choice`."""
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise invalid("model", "Field required (a non-empty string)")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise invalid("messages", "Field required (a non-empty array)")
    chat = []
    if "system" in body:
        chat.append({"role": "system", "content": _text(body["system"], "system")})
    chat += _messages(messages)
    return {"model": model, "messages": chat, "tools": _tools(body)}


def _messages(messages: list[Any]) -> list[dict[str, Any]]:
    """Anthropic turns as bus chat messages: an assistant's `tool_use` blocks become its calls, and
    each `tool_result` block a `tool` message answering the call of the same id."""
    called: dict[str, str] = {}  # tool_use id -> tool name, for the results that follow
    chat: list[dict[str, Any]] = []
    for index, message in enumerate(messages):
        path = f"messages.{index}"
        if not isinstance(message, dict):
            raise invalid(path, "must be an object with 'role' and 'content'")
        extra = sorted(set(message) - {"role", "content"})
        if extra:
            raise invalid(f"{path}.{extra[0]}", "Extra inputs are not permitted")
        role = message.get("role")
        if role not in ("user", "assistant"):
            raise invalid(f"{path}.role", "must be 'user' or 'assistant'")
        content = message.get("content")
        blocks = [{"type": "text", "text": content}] if isinstance(content, str) else content
        if not isinstance(blocks, list):
            raise invalid(f"{path}.content", "must be a string or an array of content blocks")
        if role == "assistant":
            chat.append(_assistant(blocks, f"{path}.content", called))
        else:
            chat += _user(blocks, f"{path}.content", called)
    if messages[-1].get("role") == "assistant":  # a chat template cannot go on from a prefilled reply
        raise invalid(f"messages.{len(messages) - 1}.role", "the last message must be a user message "
                      "(prefilling the assistant's reply is not supported)")
    return chat


def _assistant(blocks: list[Any], path: str, called: dict[str, str]) -> dict[str, Any]:
    texts, calls = [], []
    for index, block in enumerate(blocks):
        kind = _block_type(block, f"{path}.{index}", ("text", "tool_use"))
        if kind == "text":
            texts.append(_block_text(block, f"{path}.{index}"))
            continue
        _known_keys(block, f"{path}.{index}", {"type", "id", "name", "input"})
        for key, kinds in (("id", str), ("name", str), ("input", dict)):
            if not isinstance(block.get(key), kinds):
                raise invalid(f"{path}.{index}.{key}", f"must be {'an object' if kinds is dict else 'a string'}")
        called[block["id"]] = block["name"]
        calls.append(ToolCall(block["id"], block["name"], json.dumps(block["input"], ensure_ascii=False)).to_fields())
    return {"role": "assistant", "content": "".join(texts), **({"tool_calls": calls} if calls else {})}


def _user(blocks: list[Any], path: str, called: dict[str, str]) -> list[dict[str, Any]]:
    """A user turn's blocks in order: runs of text as user messages, each tool result as a tool message."""
    chat: list[dict[str, Any]] = []
    texts: list[str] = []
    for index, block in enumerate(blocks):
        kind = _block_type(block, f"{path}.{index}", ("text", "tool_result"))
        if kind == "text":
            texts.append(_block_text(block, f"{path}.{index}"))
            continue
        if texts:
            chat.append({"role": "user", "content": "".join(texts)})
            texts = []
        chat.append(_tool_result(block, f"{path}.{index}", called))
    if texts or not chat:
        chat.append({"role": "user", "content": "".join(texts)})
    return chat


def _tool_result(block: dict[str, Any], path: str, called: dict[str, str]) -> dict[str, Any]:
    _known_keys(block, path, {"type", "tool_use_id", "content", "is_error"})
    call_id = block.get("tool_use_id")
    if not isinstance(call_id, str):
        raise invalid(f"{path}.tool_use_id", "must be a string")
    if call_id not in called:
        raise invalid(f"{path}.tool_use_id", f"'{call_id}' matches no tool_use block in an earlier assistant message")
    if not isinstance(block.get("is_error") or False, bool):
        raise invalid(f"{path}.is_error", "must be a boolean")
    content = _text(block.get("content") or "", f"{path}.content")
    if block.get("is_error"):  # the bus has no such flag: the model reads it in the text
        content = f"Error: {content}"
    return {"role": "tool", "content": content, "tool_call_id": call_id, "name": called[call_id]}


def _text(value: Any, path: str) -> str:
    """A string, or an array of text blocks joined together (`system`, a tool result's `content`)."""
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise invalid(path, "must be a string or an array of text blocks")
    texts = []
    for index, block in enumerate(value):
        _block_type(block, f"{path}.{index}", ("text",))
        texts.append(_block_text(block, f"{path}.{index}"))
    return "".join(texts)


def _block_type(block: Any, path: str, allowed: tuple[str, ...]) -> str:
    if not isinstance(block, dict):
        raise invalid(path, "must be a content block object")
    kind = block.get("type")
    if kind not in allowed:
        raise invalid(f"{path}.type", f"block type {json.dumps(kind)} is not supported here; "
                      f"expected {' or '.join(allowed)}")
    return kind


def _block_text(block: dict[str, Any], path: str) -> str:
    _known_keys(block, path, {"type", "text"})
    if not isinstance(block.get("text"), str):
        raise invalid(f"{path}.text", "must be a string")
    return block["text"]


def _known_keys(block: dict[str, Any], path: str, allowed: set[str]) -> None:
    extra = sorted({key for key, value in block.items() if value is not None} - allowed - _BLOCK_IGNORED)
    if extra:
        raise invalid(f"{path}.{extra[0]}", "Extra inputs are not permitted")


def _tools(body: dict[str, Any]) -> Tools | None:
    """The bus `tools` for `tools` and `tool_choice`; None when no tool is offered (or choice is none)."""
    tools = body.get("tools")
    choice = body.get("tool_choice", {"type": "auto"})
    if not isinstance(choice, dict) or choice.get("type") not in (*_TOOL_CHOICES, "none"):
        raise invalid("tool_choice", "must be {\"type\": \"auto\"}, {\"type\": \"any\"}, {\"type\": \"none\"} "
                      "or {\"type\": \"tool\", \"name\": ...}")
    _known_keys(choice, "tool_choice", {"type", "name", "disable_parallel_tool_use"})
    disable_parallel = choice.get("disable_parallel_tool_use") or False
    if not isinstance(disable_parallel, bool):
        raise invalid("tool_choice.disable_parallel_tool_use", "must be a boolean")
    if tools is None:
        if choice["type"] in ("any", "tool"):
            raise invalid("tool_choice", "needs 'tools'")
        return None
    if not isinstance(tools, list) or not tools:
        raise invalid("tools", "must be a non-empty array")
    functions = tuple(_function(tool, f"tools.{index}") for index, tool in enumerate(tools))
    if choice["type"] == "none":
        return None
    name = choice.get("name") if choice["type"] == "tool" else None
    if choice["type"] == "tool" and not isinstance(name, str):
        raise invalid("tool_choice.name", "must name one of the tools")
    try:
        return Tools(functions, _TOOL_CHOICES[choice["type"]], name, not disable_parallel)
    except ProtocolError as exc:  # a named tool that is none of them; or too many, names alike, a schema not JSON
        field = "tool_choice.name" if exc.field == "tools.function" else "tools"
        raise invalid(field, exc.problem or str(exc)) from None


def _function(tool: Any, path: str) -> Function:
    if not isinstance(tool, dict):
        raise invalid(path, "must be an object with 'name' and 'input_schema'")
    if (tool.get("type") or "custom") != "custom":  # Anthropic's server tools (web search, code execution...)
        raise invalid(f"{path}.type", f"tool type {json.dumps(tool['type'])} is not supported; only custom tools")
    _known_keys(tool, path, {"type", "name", "description", "input_schema"})
    try:
        return Function(tool.get("name"), tool.get("input_schema"), tool.get("description") or None)
    except ProtocolError as exc:  # the function's own rules; Anthropic calls its parameters `input_schema`
        field = f"{path}.{'input_schema' if exc.field == 'parameters' else exc.field}"
        raise invalid(field, exc.problem or str(exc)) from None
