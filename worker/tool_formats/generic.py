"""The generic tool format, for chat templates that take no tools: the tools described in the
system prompt, and the answer one JSON object, either a reply or calls."""

from __future__ import annotations

import json
from typing import Any

from broker.protocol import ChatMessage, Tools
from worker.streamed_json import CallsReader, StringReader
from worker.tool_formats.base import AnswerReader, ToolFormat
from worker.tool_formats.call_json import arguments_value, call_schema, json_lexeme


class GenericFormat(ToolFormat):
    """For templates without tools. The model sees one of two JSON objects, and must write one:

        {"tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}]}
        {"response": "The weather in Paris is sunny."}

    Earlier calls are written back in the first form, with their ids; a `tool` message becomes a
    user turn `{"tool_response": {"tool_call_id": ..., "name": ..., "content": ...}}`.
    """

    name = "generic"

    def template_input(self, messages: tuple[ChatMessage, ...], tools: Tools | None
                       ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        chat = [_generic_message(message) for message in messages]
        if tools is not None:
            prompt = _generic_system_prompt(tools)
            if chat and chat[0]["role"] == "system":
                chat[0] = {**chat[0], "content": f"{chat[0]['content']}\n\n{prompt}"}
            else:
                chat.insert(0, {"role": "system", "content": prompt})
        return chat, {}

    def grammar(self, tools: Tools) -> str:
        definitions: dict[str, Any] = {}
        calls = [call_schema(function, "arguments", f"{index}_", definitions)
                 for index, function in enumerate(tools.callable)]
        call_list: dict[str, Any] = {"type": "array", "items": calls[0] if len(calls) == 1 else {"anyOf": calls},
                                     "minItems": 1}
        if not tools.parallel:
            call_list["maxItems"] = 1
        with_calls = {"type": "object", "additionalProperties": False, "required": ["tool_calls"],
                      "properties": {"tool_calls": call_list}}
        reply = {"type": "object", "additionalProperties": False, "required": ["response"],
                 "properties": {"response": {"type": "string"}}}
        schema: dict[str, Any] = with_calls if tools.calls_required else {"anyOf": [with_calls, reply]}
        if definitions:
            schema = {**schema, "$defs": definitions}
        return f"start: {json_lexeme(schema)}\n"

    def reader(self) -> AnswerReader:
        return _GenericReader()


def _generic_system_prompt(tools: Tools) -> str:
    listed = json.dumps([f.to_fields() for f in tools.functions], ensure_ascii=False)
    reply = "" if tools.calls_required else ', or with {"response": "<your answer>"} to answer the user directly'
    many = "one or more calls" if tools.parallel else "exactly one call"
    only = f" Call {tools.function}." if tools.function is not None else ""
    return (f"You can call these tools (JSON Schema parameters):\n{listed}\n"
            f'Respond with a JSON object: {{"tool_calls": [{{"name": "<tool name>", "arguments": '
            f"{{...}}}}]}} with {many}{reply}.{only}")


def _generic_message(message: ChatMessage) -> dict[str, Any]:
    """A message as the generic format shows it: calls and results as JSON in the content."""
    fields: dict[str, Any] = {"role": message.role, "content": message.content}
    if message.tool_calls:
        calls = [{"id": c.id, "name": c.name, "arguments": arguments_value(c.arguments)} for c in message.tool_calls]
        fields["content"] = json.dumps({"tool_calls": calls}, ensure_ascii=False)
    if message.role == "tool":
        result = {"tool_call_id": message.tool_call_id, "name": message.name, "content": message.content}
        fields = {"role": "user", "content": json.dumps({"tool_response": {k: v for k, v in result.items()
                                                                          if v is not None}}, ensure_ascii=False)}
    elif message.name is not None:
        fields["name"] = message.name
    return fields


# An answer's JSON is written in JSON_STYLE, its keys in the schema's order, so the start of each
# part of it can be recognised as text.
_REPLY_START = '{"response": "'
_CALLS_START = '{"tool_calls": ['


class _GenericReader(AnswerReader):
    def __init__(self) -> None:
        super().__init__()
        self._reply: StringReader | None = None
        self._calls: CallsReader | None = None

    def _read(self, final: bool) -> tuple[str, list[tuple[str, str]]]:
        text = self.text
        if self._reply is None and self._calls is None:
            if text.startswith(_REPLY_START):
                self._reply = StringReader(len(_REPLY_START))
            elif text.startswith(_CALLS_START):
                self._calls = CallsReader(len(_CALLS_START), "arguments", between="}, ")
        if self._reply is not None:
            return self._reply.read(text), []
        calls = self._calls.read(text) if self._calls is not None else []
        if calls:
            return "", calls
        return (text if final else ""), []  # text in neither form (cut short, or unconstrained): as it came


GENERIC = GenericFormat()
