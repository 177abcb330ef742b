"""OpenAI's `tools`, `tool_choice` and `parallel_tool_calls`, and the calls and results in a chat's
history, as the bus carries them. How a model sees the tools and writes its calls is the worker's
business (worker/tool_formats/); its calls come back as pieces on TOKEN frames."""

from __future__ import annotations

import json
from typing import Any

from broker.protocol import (
    Function,
    ProtocolError,
    ToolCall,
    ToolCallDelta,
    Tools,
)
from frontends.openai_api.errors import bad_request

_NO_PARAMETERS = {"type": "object", "properties": {}}
_TOOL_CHOICES = ("none", "auto", "required")


def parse_tools(body: dict[str, Any], flat: bool = False) -> Tools | None:
    """The bus `tools` for `tools`, `tool_choice` and `parallel_tool_calls`; None when no tool is offered.
    `flat`: the Responses API's shape, where a function's fields and a named choice's name sit beside
    their `type` rather than under `function`."""
    tools = body.get("tools")
    choice = body.get("tool_choice", "auto" if tools else "none")
    parallel = body.get("parallel_tool_calls", True)
    if not isinstance(parallel, bool):
        raise bad_request("'parallel_tool_calls' must be a boolean", "parallel_tool_calls", "invalid_type")
    if tools is None:
        if choice != "none":
            raise bad_request("'tool_choice' needs 'tools'", "tool_choice")
        return None
    if not isinstance(tools, list) or not tools:
        raise bad_request("'tools' must be a non-empty array", "tools", "invalid_type")
    functions = tuple(_function(tool, index, flat) for index, tool in enumerate(tools))
    if isinstance(choice, dict):
        named = choice if flat else choice.get("function")
        name = named.get("name") if isinstance(named, dict) else None
        if choice.get("type") != "function" or not isinstance(name, str):
            shape = '"name": ...' if flat else '"function": {"name": ...}'
            raise bad_request(f"'tool_choice' must name a function: {{\"type\": \"function\", {shape}}}",
                              "tool_choice")
        return _tools(functions, "required", name, parallel=False)
    if choice not in _TOOL_CHOICES:
        raise bad_request("'tool_choice' must be none, auto, required or a named function", "tool_choice")
    if choice == "none":
        return None
    return _tools(functions, choice, None, parallel)


def _tools(functions: tuple[Function, ...], choice: str, name: str | None, parallel: bool) -> Tools:
    try:
        return Tools(functions, choice, name, parallel)
    except ProtocolError as exc:  # a named choice that names no tool; or too many, names alike, a schema not JSON
        error = exc.renamed("tool_choice" if exc.field == "tools.function" else "tools")
        raise bad_request(str(error), error.field) from None


def _function(tool: Any, index: int, flat: bool) -> Function:
    param = f"tools[{index}]"
    if flat:
        if not isinstance(tool, dict) or tool.get("type") != "function":
            raise bad_request(f"{param} must be {{\"type\": \"function\", \"name\": ...}} (the only tools served)",
                              param)
        function = {key: value for key, value in tool.items() if key != "type"}
    else:
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(tool.get("function"), dict):
            raise bad_request(f"{param} must be {{\"type\": \"function\", \"function\": {{...}}}}", param)
        function, param = tool["function"], f"{param}.function"
    extra = sorted(set(function) - {"name", "description", "parameters", "strict"})
    if extra:
        raise bad_request(f"{param}.{extra[0]} is not supported", f"{param}.{extra[0]}", "unsupported_parameter")
    parameters = function.get("parameters")
    if parameters is None or parameters == {}:  # OpenAI's default: a function of no arguments
        parameters = _NO_PARAMETERS
    try:
        return Function.at(param, function.get("name"), parameters, function.get("description") or None)
    except ProtocolError as exc:
        raise bad_request(str(exc), exc.field) from None


def assistant_calls(tool_calls: Any, param: str) -> tuple[ToolCall, ...]:
    """An assistant message's `tool_calls`, checked."""
    if not isinstance(tool_calls, list) or not tool_calls:
        raise bad_request(f"{param} must be a non-empty array", param, "invalid_type")
    calls = []
    for index, call in enumerate(tool_calls):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise bad_request(f"{param}[{index}] must be a function call with a name", f"{param}[{index}]")
        arguments = function.get("arguments", "{}")
        if not isinstance(arguments, str):
            arguments = json.dumps(arguments, ensure_ascii=False)
        call_id = call.get("id")
        calls.append(ToolCall(call_id if isinstance(call_id, str) else f"call_{index}", function["name"], arguments))
    return tuple(calls)


def call_delta(delta: ToolCallDelta) -> dict[str, Any]:
    """A piece of a call as OpenAI streams it: id and name first, then the arguments."""
    if delta.id is not None:
        return {"index": delta.index, "id": delta.id, "type": "function",
                "function": {"name": delta.name, "arguments": delta.arguments}}
    return {"index": delta.index, "function": {"arguments": delta.arguments}}


def whole_calls(deltas: list[ToolCallDelta]) -> list[dict[str, Any]]:
    """The calls streamed pieces add up to, as OpenAI's `message.tool_calls`."""
    calls: list[dict[str, Any]] = []
    for delta in deltas:
        if delta.id is not None:
            calls.append({"id": delta.id, "type": "function", "function": {"name": delta.name, "arguments": ""}})
        calls[delta.index]["function"]["arguments"] += delta.arguments
    return calls
