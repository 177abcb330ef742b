"""OpenAI tool calling in the generic format: tools described in the system prompt, the answer
constrained to JSON that is either a reply or calls whose arguments follow each function's schema.

The model sees one of two JSON objects, and must write one of them:

    {"tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}]}
    {"response": "The weather in Paris is sunny."}

Earlier calls in the history are written back in the first form, with their ids; a `tool` message
becomes a user turn `{"tool_response": {"tool_call_id": ..., "name": ..., "content": ...}}`.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

from frontends.openai_api.errors import bad_request

_TOOL_CHOICES = ("none", "auto", "required")


@dataclass(frozen=True, slots=True)
class ToolCall:
    """One call the model made: its id, the function's name and its arguments as JSON text."""

    id: str
    name: str
    arguments: str

    def to_openai(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass(frozen=True, slots=True)
class Reply:
    """A parsed answer: text for the user, or calls (never both)."""

    content: str | None
    tool_calls: tuple[ToolCall, ...] = ()


@dataclass(frozen=True, slots=True)
class ToolPlan:
    """How one chat request offers its tools: the prompt that describes them and the schema the
    answer must follow."""

    functions: tuple[dict[str, Any], ...]  # {"name", "description", "parameters"} of each offered tool
    calls_required: bool  # `required` or a named function: the answer is a call, never text
    parallel: bool  # more than one call at once allowed

    def system_prompt(self) -> str:
        listed = json.dumps(list(self.functions), ensure_ascii=False)
        reply = ("" if self.calls_required else
                 ', or with {"response": "<your answer>"} to answer the user directly')
        many = "one or more calls" if self.parallel else "exactly one call"
        return (f"You can call these tools (JSON Schema parameters):\n{listed}\n"
                f'Respond with a JSON object: {{"tool_calls": [{{"name": "<tool name>", "arguments": '
                f"{{...}}}}]}} with {many}{reply}.")

    def schema(self) -> dict[str, Any]:
        """The JSON schema every answer validates against."""
        definitions: dict[str, Any] = {}
        calls = [{"type": "object", "additionalProperties": False, "required": ["name", "arguments"],
                  "properties": {"name": {"const": f["name"]},
                                 "arguments": _hoist_definitions(f["parameters"], f"{index}_", definitions)}}
                 for index, f in enumerate(self.functions)]
        call_list: dict[str, Any] = {"type": "array", "items": calls[0] if len(calls) == 1 else {"anyOf": calls},
                                     "minItems": 1}
        if not self.parallel:
            call_list["maxItems"] = 1
        with_calls = {"type": "object", "additionalProperties": False, "required": ["tool_calls"],
                      "properties": {"tool_calls": call_list}}
        text = {"type": "object", "additionalProperties": False, "required": ["response"],
                "properties": {"response": {"type": "string"}}}
        schema = with_calls if self.calls_required else {"anyOf": [with_calls, text]}
        return {**schema, "$defs": definitions} if definitions else schema

    def parse(self, text: str) -> Reply:
        """The answer as content or calls (a call's arguments as the model wrote them). An answer cut
        by max_tokens gives what it holds so far; text in neither form stays content as it came."""
        partial = read_partial(text)
        if partial.content is not None:
            return Reply(partial.content)
        if partial.calls:
            return Reply(None, tuple(ToolCall(new_call_id(), name, arguments) for name, arguments in partial.calls))
        return Reply(text)


def _hoist_definitions(parameters: dict[str, Any], prefix: str, definitions: dict[str, Any]) -> dict[str, Any]:
    """`parameters` without its own `$defs` (or `definitions`), which move to `definitions` under
    `prefix`ed names, its `$ref`s rewritten to match: nested deep in the answer's schema, a reference
    like `#/$defs/Address` (as pydantic writes them) must still resolve from the root."""
    moved = {**parameters.get("$defs", {}), **parameters.get("definitions", {})}
    if not moved:
        return parameters

    def rewrite(node: Any) -> Any:
        if isinstance(node, dict):
            rewritten = {key: rewrite(value) for key, value in node.items() if key not in ("$defs", "definitions")}
            ref = node.get("$ref")
            if isinstance(ref, str):
                for root in ("#/$defs/", "#/definitions/"):
                    if ref.startswith(root):
                        rewritten["$ref"] = "#/$defs/" + prefix + ref.removeprefix(root)
            return rewritten
        if isinstance(node, list):
            return [rewrite(item) for item in node]
        return node

    for name, definition in moved.items():
        definitions[prefix + name] = rewrite(definition)
    return rewrite(parameters)


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


# The answer's JSON is compact, with these separators (the worker's grammar writes it so), and its
# keys come in the schema's order: the start of each part can be recognised as text.
_REPLY_START = '{"response": "'
_CALLS_START = '{"tool_calls": ['
_NAME_START = '{"name": "'
_ARGUMENTS_START = ', "arguments": '


@dataclass(frozen=True, slots=True)
class Partial:
    """What an answer holds so far: reply text, or calls with their whole names and the arguments
    text written so far (the last one's may be unfinished)."""

    content: str | None
    calls: tuple[tuple[str, str], ...] = ()


def read_partial(text: str) -> Partial:
    """Read as much of an answer in the generic format as has been written."""
    if text.startswith(_REPLY_START):
        return Partial(_string_prefix(text, len(_REPLY_START))[0])
    if not text.startswith(_CALLS_START):
        return Partial(None)
    calls = []
    position = len(_CALLS_START)
    while text.startswith(_NAME_START, position):
        name, name_end = _string_prefix(text, position + len(_NAME_START))
        if name_end is None or not text.startswith(_ARGUMENTS_START, name_end + 1):
            break  # a call is listed once its name is whole
        start = name_end + 1 + len(_ARGUMENTS_START)
        end = _value_end(text, start)
        calls.append((name, text[start:len(text) if end is None else end]))
        if end is None or not text.startswith("}, ", end):
            break
        position = end + 3
    return Partial(None, tuple(calls))


def _string_prefix(text: str, start: int) -> tuple[str, int | None]:
    """The decoded JSON string that starts at `start` (after its opening quote), as far as it is
    written, and the index of its closing quote (None: not written yet)."""
    position, safe = start, start  # safe: where the text so far ends on a whole character
    while position < len(text):
        char = text[position]
        if char == '"':
            return json.loads(f'"{text[start:position]}"'), position
        if char == "\\":
            position += 6 if text.startswith("u", position + 1) else 2
            if position > len(text):
                break  # an escape not yet whole
        else:
            position += 1
        safe = position
    decoded = json.loads(f'"{text[start:safe]}"')
    if decoded and "\ud800" <= decoded[-1] <= "\udbff":  # half a surrogate pair: wait for the other half
        decoded = decoded[:-1]
    return decoded, None


def _value_end(text: str, start: int) -> int | None:
    """The index just past the JSON value that starts at `start`, or None when it is not whole yet."""
    depth, in_string, escaped = 0, False, False
    for position in range(start, len(text)):
        char = text[position]
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
                if depth == 0:
                    return position + 1
        elif char == '"':
            in_string = True
        elif char in "{[":
            depth += 1
        elif char in "}],":
            if depth == 0:
                return position  # a bare number or literal, ended by what follows it
            if char != ",":
                depth -= 1
                if depth == 0:
                    return position + 1
    return None


class ReplyStream:
    """One streamed answer: the OpenAI deltas for what each new piece of text completes."""

    def __init__(self) -> None:
        self.text = ""
        self._content_sent = 0
        self._calls_sent: list[int] = []  # per call opened: the arguments characters sent
        self.has_calls = False

    def push(self, text: str) -> list[dict[str, Any]]:
        self.text += text
        partial = read_partial(self.text)
        deltas: list[dict[str, Any]] = []
        if partial.content is not None and len(partial.content) > self._content_sent:
            deltas.append({"content": partial.content[self._content_sent:]})
            self._content_sent = len(partial.content)
        for index, (name, arguments) in enumerate(partial.calls):
            if index == len(self._calls_sent):  # the OpenAI order: id and name first, then the arguments
                self.has_calls = True
                self._calls_sent.append(0)
                deltas.append({"tool_calls": [{"index": index, "id": new_call_id(), "type": "function",
                                               "function": {"name": name, "arguments": ""}}]})
            if len(arguments) > self._calls_sent[index]:
                deltas.append({"tool_calls": [{"index": index,
                                               "function": {"arguments": arguments[self._calls_sent[index]:]}}]})
                self._calls_sent[index] = len(arguments)
        return deltas

    def finish(self) -> list[dict[str, Any]]:
        """At the end: text in neither form, sent as it came."""
        if self._content_sent or self._calls_sent or not self.text or read_partial(self.text).content is not None:
            return []
        return [{"content": self.text}]


def parse_tools(body: dict[str, Any]) -> ToolPlan | None:
    """The plan for `tools`, `tool_choice` and `parallel_tool_calls`; None when no tool is offered."""
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
    functions = tuple(_function(tool, index) for index, tool in enumerate(tools))
    names = [f["name"] for f in functions]
    if len(set(names)) != len(names):
        raise bad_request("each tool must have its own name", "tools")
    if isinstance(choice, dict):
        name = choice.get("function", {}).get("name") if isinstance(choice.get("function"), dict) else None
        if choice.get("type") != "function" or name not in names:
            raise bad_request("'tool_choice' must name one of the tools: {\"type\": \"function\", "
                              "\"function\": {\"name\": ...}}", "tool_choice")
        return ToolPlan(tuple(f for f in functions if f["name"] == name), True, False)
    if choice not in _TOOL_CHOICES:
        raise bad_request("'tool_choice' must be none, auto, required or a named function", "tool_choice")
    if choice == "none":
        return None
    return ToolPlan(functions, choice == "required", parallel)


def _function(tool: Any, index: int) -> dict[str, Any]:
    param = f"tools[{index}]"
    if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(tool.get("function"), dict):
        raise bad_request(f"{param} must be {{\"type\": \"function\", \"function\": {{...}}}}", param)
    function = tool["function"]
    extra = sorted(set(function) - {"name", "description", "parameters", "strict"})
    if extra:
        raise bad_request(f"{param}.function.{extra[0]} is not supported", f"{param}.function.{extra[0]}",
                          "unsupported_parameter")
    name = function.get("name")
    if not isinstance(name, str) or not name:
        raise bad_request(f"{param}.function.name must be a non-empty string", f"{param}.function.name")
    parameters = function.get("parameters")
    if parameters is not None and not isinstance(parameters, dict):
        raise bad_request(f"{param}.function.parameters must be a JSON schema object", f"{param}.function.parameters")
    description = function.get("description")
    if description is not None and not isinstance(description, str):
        raise bad_request(f"{param}.function.description must be a string", f"{param}.function.description")
    return {"name": name, **({"description": description} if description else {}),
            "parameters": parameters or {"type": "object", "properties": {}}}


def assistant_calls_text(tool_calls: Any, param: str) -> str:
    """An assistant turn that called tools, written as the model would have written it."""
    if not isinstance(tool_calls, list) or not tool_calls:
        raise bad_request(f"{param} must be a non-empty array", param, "invalid_type")
    calls = []
    for index, call in enumerate(tool_calls):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise bad_request(f"{param}[{index}] must be a function call with a name", f"{param}[{index}]")
        arguments = function.get("arguments", "{}")
        try:
            arguments = json.loads(arguments) if isinstance(arguments, str) else arguments
        except ValueError:
            pass  # the model's own text, as it came: shown back as a string
        calls.append({"id": call.get("id"), "name": function["name"], "arguments": arguments})
    return json.dumps({"tool_calls": calls}, ensure_ascii=False)


def tool_result_text(message: dict[str, Any], content: str, names: dict[str, str]) -> str:
    """A `tool` message as the user turn that brings the result back."""
    call_id = message.get("tool_call_id")
    result = {"tool_call_id": call_id, "name": names.get(call_id), "content": content}
    return json.dumps({"tool_response": {k: v for k, v in result.items() if v is not None}}, ensure_ascii=False)


def with_tools_prompt(messages: list[dict[str, str]], plan: ToolPlan) -> list[dict[str, str]]:
    """`messages` with the tools described at the end of the system prompt (a new one when there is none)."""
    prompt = plan.system_prompt()
    if messages and messages[0]["role"] == "system":
        return [{"role": "system", "content": f"{messages[0]['content']}\n\n{prompt}"}, *messages[1:]]
    return [{"role": "system", "content": prompt}, *messages]
