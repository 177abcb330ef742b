"""Tool calling as a model family writes it: how the chat reaches the template, the grammar an
answer must follow, and how an answer is read, as it streams, into reply text and call pieces.

A chat template that takes `tools` and writes calls in a format known here gets the tools, the
earlier calls and the tool results natively:

- hermes (Qwen 2.5 and 3, Hermes, SmolLM3, ...): each call is
  `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`, after optional text;
- llama3 (Llama 3.1 to 3.3): the whole answer is one `{"name": ..., "parameters": {...}}`.

Any other template gets the generic format (see `GenericFormat`): the tools described in the
system prompt and the answer a JSON object, either a reply or calls.
"""

from __future__ import annotations

import json
import logging
import re
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import jinja2
import jinja2.meta

from broker.protocol import ChatMessage, Function, ToolCallDelta, Tools
from worker.json_schema import JSON_STYLE, closed_objects
from worker.streamed_json import NAME_START, CallsReader, StringReader

log = logging.getLogger(__name__)


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


class AnswerReader(ABC):
    """Reads one answer as it streams: each piece of text gives the reply text and the call pieces
    it completes. A call's id and name come with its first piece, then its arguments as written."""

    def __init__(self) -> None:
        self.text = ""
        self._content_sent = 0
        self._arguments_sent: list[int] = []  # per call opened: the arguments characters sent

    @property
    def made_calls(self) -> bool:
        return bool(self._arguments_sent)

    def push(self, text: str) -> tuple[str, tuple[ToolCallDelta, ...]]:
        self.text += text
        content, calls = self._read(final=False)
        return self._new_content(content), self._new_calls(calls)

    def finish(self) -> tuple[str, tuple[ToolCallDelta, ...]]:
        """At the end of the answer: what was held back."""
        content, calls = self._read(final=True)
        return self._new_content(content), self._new_calls(calls)

    @abstractmethod
    def _read(self, final: bool) -> tuple[str, list[tuple[str, str]]]:
        """The reply text so far and the calls opened so far, each as (name, arguments so far)."""

    def _new_content(self, content: str) -> str:
        new = content[self._content_sent:]
        self._content_sent = max(self._content_sent, len(content))
        return new

    def _new_calls(self, calls: list[tuple[str, str]]) -> tuple[ToolCallDelta, ...]:
        deltas = []
        for index, (name, arguments) in enumerate(calls):
            if index == len(self._arguments_sent):
                self._arguments_sent.append(0)
                deltas.append(ToolCallDelta(index, "", new_call_id(), name))
            sent = self._arguments_sent[index]
            if len(arguments) > sent:
                deltas.append(ToolCallDelta(index, arguments[sent:]))
                self._arguments_sent[index] = len(arguments)
        return tuple(deltas)


class ToolFormat(ABC):
    """One way of offering tools to a model and reading its calls back."""

    name: str

    @abstractmethod
    def template_input(self, messages: tuple[ChatMessage, ...], tools: Tools | None
                       ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """The conversation as the chat template takes it, and extra template arguments."""

    @abstractmethod
    def grammar(self, tools: Tools) -> str:
        """The llguidance grammar (Lark) every answer to a request offering `tools` follows."""

    @abstractmethod
    def reader(self) -> AnswerReader:
        """A reader for one answer."""


# -- the generic format


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
        calls = [_call_schema(function, "arguments", f"{index}_", definitions)
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
        return f"start: {_json_lexeme(schema)}\n"

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
        calls = [{"id": c.id, "name": c.name, "arguments": _arguments_value(c.arguments)} for c in message.tool_calls]
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


# -- native formats


@dataclass(frozen=True, slots=True)
class _CallSyntax:
    """How a family writes its calls: `opener` + `{"name": ..., "<arguments_key>": {...}}` + `closer`,
    calls after the first preceded by `between`; calls only at the start of an answer, or after text."""

    opener: str
    closer: str
    between: str
    arguments_key: str
    after_text: bool  # text may come before the first call
    parallel: bool  # more than one call per answer


class NativeFormat(ToolFormat):
    """A template that takes `tools` itself; its calls follow `syntax`."""

    def __init__(self, name: str, syntax: _CallSyntax) -> None:
        self.name = name
        self.syntax = syntax

    def template_input(self, messages: tuple[ChatMessage, ...], tools: Tools | None
                       ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        chat = [_native_message(message) for message in messages]
        if tools is None:
            return chat, {}
        return chat, {"tools": [{"type": "function", "function": f.to_fields()} for f in tools.functions]}

    def grammar(self, tools: Tools) -> str:
        syntax = self.syntax
        definitions: dict[str, Any] = {}
        calls = [_call_schema(f, syntax.arguments_key, f"{i}_", definitions) for i, f in enumerate(tools.callable)]
        body = {"anyOf": calls} if len(calls) > 1 else calls[0]
        if definitions:
            body = {**body, "$defs": definitions}
        marker = syntax.opener.strip()  # what starts a call: the opener without its whitespace
        more = f" ({_text(syntax.between)} call)*" if syntax.parallel and tools.parallel else ""
        rules = ["%llguidance {}",
                 f"body: {_json_lexeme(body)}",
                 f"tail: {_text(syntax.opener[len(marker):])} body {_text(syntax.closer)}",
                 f"call: {_text(marker)} tail"]
        if tools.calls_required:
            rules.append(f"start: call{more}")
        elif syntax.after_text:
            # Text that never holds the marker; or text up to the marker (lazily: it ends there), then calls.
            rules += [f"TEXT: /(.|\\n)*/ & ~/(.|\\n)*{_regex(marker)}(.|\\n)*/",
                      f"lead[lazy]: /(.|\\n)*/ {_text(marker)}",
                      f"start: TEXT | lead tail{more}"]
        else:
            # Text that does not start like a call; or calls.
            rules += ["TEXT: /(.|\\n)*/ & ~/[ \\t\\n]*\\{(.|\\n)*/", f"start: TEXT | call{more}"]
        return "\n".join(rules) + "\n"

    def reader(self) -> AnswerReader:
        return _NativeReader(self.syntax)


class _NativeReader(AnswerReader):
    def __init__(self, syntax: _CallSyntax) -> None:
        super().__init__()
        self.syntax = syntax
        self._trigger = syntax.opener + NAME_START  # what starts a call, as the grammar writes it
        self._calls: CallsReader | None = None
        self._content = ""  # the text before the calls, once they start
        self._searched = 0  # the trigger does not start before this
        self._plain = False  # calls may come only first, and this answer started otherwise

    def _read(self, final: bool) -> tuple[str, list[tuple[str, str]]]:
        text = self.text
        if self._calls is None:
            start = self._calls_start()
            if start is None:  # text so far; what may begin a call waits
                return (text if final else text[:len(text) - self._held()]), []
            self._content = text[:start]
            self._calls = CallsReader(start + len(self.syntax.opener), self.syntax.arguments_key,
                                      between="}" + self.syntax.closer + self.syntax.between + self.syntax.opener)
        calls = self._calls.read(text)
        if final and not calls:
            return text, []  # cut before a call's name was whole: the text as it came
        return self._content, calls

    def _calls_start(self) -> int | None:
        text = self.text
        if self.syntax.after_text:
            start = text.find(self._trigger, self._searched)
            if start < 0:
                self._searched = max(0, len(text) - len(self._trigger) + 1)
                return None
            return start
        if self._plain:
            return None
        lead = text.lstrip(_BLANKS)
        if lead.startswith(NAME_START):
            return len(text) - len(lead)
        self._plain = not NAME_START.startswith(lead)
        return None

    def _held(self) -> int:
        """How much of the end of the text may be the start of a call."""
        text = self.text
        if not self.syntax.after_text:
            return 0 if self._plain else len(text)
        return max((size for size in range(1, min(len(self._trigger), len(text)) + 1)
                    if text.endswith(self._trigger[:size])), default=0)


_BLANKS = " \t\n"  # what may come before a call that starts an answer (as the grammar allows it)


HERMES = NativeFormat("hermes", _CallSyntax(opener="<tool_call>\n", closer="\n</tool_call>", between="\n",
                                            arguments_key="arguments", after_text=True, parallel=True))
LLAMA3 = NativeFormat("llama3", _CallSyntax(opener="", closer="", between="", arguments_key="parameters",
                                            after_text=False, parallel=False))
GENERIC = GenericFormat()


def format_for(template: str | None) -> ToolFormat:
    """The format for a chat template: a native one when the template takes `tools` and writes calls
    in a format known here, else the generic one."""
    if not template or not _takes_tools(template):
        return GENERIC
    if "<tool_call>" in template:
        return HERMES
    if "<|python_tag|>" in template or "ipython" in template:
        return LLAMA3
    log.warning("the chat template takes tools, but writes calls in a format not known here: tools are "
                "offered in the generic format instead")
    return GENERIC


def _takes_tools(template: str) -> bool:
    environment = jinja2.Environment(extensions=["jinja2.ext.loopcontrols"])
    try:
        return "tools" in jinja2.meta.find_undeclared_variables(environment.parse(template))
    except jinja2.TemplateSyntaxError:  # a tag of transformers' own, e.g. {% generation %}
        return re.search(r"\btools\b", template) is not None


# -- shared pieces


def _native_message(message: ChatMessage) -> dict[str, Any]:
    """A message as templates with tools take it (the shape transformers documents)."""
    fields: dict[str, Any] = {"role": message.role, "content": message.content}
    if message.name is not None:
        fields["name"] = message.name
    if message.tool_calls:
        fields["tool_calls"] = [{"id": c.id, "type": "function",
                                 "function": {"name": c.name, "arguments": _arguments_value(c.arguments)}}
                                for c in message.tool_calls]
    if message.tool_call_id is not None:
        fields["tool_call_id"] = message.tool_call_id
    return fields


def _arguments_value(arguments: str) -> Any:
    """A call's arguments as a value, as templates write them back; text that is not JSON stays text."""
    try:
        return json.loads(arguments)
    except ValueError:
        return arguments


def _call_schema(function: Function, arguments_key: str, prefix: str, definitions: dict[str, Any]) -> dict[str, Any]:
    parameters = _hoist_definitions(closed_objects(function.parameters), prefix, definitions)
    return {"type": "object", "additionalProperties": False, "required": ["name", arguments_key],
            "properties": {"name": {"const": function.name}, arguments_key: parameters}}


def _hoist_definitions(parameters: dict[str, Any], prefix: str, definitions: dict[str, Any]) -> dict[str, Any]:
    """`parameters` without its own `$defs` (or `definitions`), which move to `definitions` under
    `prefix`ed names, its `$ref`s rewritten to match: nested deep in the answer's schema, a reference
    like `#/$defs/Address` (as pydantic writes them) must still resolve from the root."""
    moved = {**parameters.get("$defs", {}), **parameters.get("definitions", {})}
    if not moved:
        return parameters

    def rewrite(node: Any) -> Any:
        if isinstance(node, dict):
            rewritten = {key: rewrite(value) for key, value in node.items()}
            ref = node.get("$ref")
            if isinstance(ref, str):
                for root in ("#/$defs/", "#/definitions/"):
                    if ref.startswith(root):
                        rewritten["$ref"] = "#/$defs/" + prefix + ref.removeprefix(root)
            return rewritten
        if isinstance(node, list):
            return [rewrite(item) for item in node]
        return node

    def without_definitions(schema: dict[str, Any]) -> dict[str, Any]:
        """Only a schema's own `$defs` go: a property may well be called `definitions`."""
        return {key: value for key, value in schema.items() if key not in ("$defs", "definitions")}

    for name, definition in moved.items():
        definitions[prefix + name] = rewrite(without_definitions(definition) if isinstance(definition, dict)
                                             else definition)
    return rewrite(without_definitions(parameters))


def _json_lexeme(schema: dict[str, Any]) -> str:
    return "%json " + json.dumps({**schema, "x-guidance": JSON_STYLE})


def _text(literal: str) -> str:
    return json.dumps(literal) if literal else ""


def _regex(literal: str) -> str:
    return "".join("\\" + c if c in _REGEX_SPECIAL else c for c in literal)


_REGEX_SPECIAL = set("\\.^$*+?()[]{}|/")
