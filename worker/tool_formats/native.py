"""Native tool formats: templates that take `tools` themselves and write calls in a known syntax
(hermes, llama3), read back as they stream."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from broker.protocol import ChatMessage, Tools
from worker.streamed_json import NAME_START, CallsReader
from worker.tool_formats.base import AnswerReader, ToolFormat
from worker.tool_formats.call_json import arguments_value, call_schema, json_lexeme


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
        calls = [call_schema(f, syntax.arguments_key, f"{i}_", definitions) for i, f in enumerate(tools.callable)]
        body = {"anyOf": calls} if len(calls) > 1 else calls[0]
        if definitions:
            body = {**body, "$defs": definitions}
        marker = syntax.opener.strip()  # what starts a call: the opener without its whitespace
        more = f" ({_text(syntax.between)} call)*" if syntax.parallel and tools.parallel else ""
        rules = ["%llguidance {}",
                 f"body: {json_lexeme(body)}",
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


def _native_message(message: ChatMessage) -> dict[str, Any]:
    """A message as templates with tools take it (the shape transformers documents)."""
    fields: dict[str, Any] = {"role": message.role, "content": message.content}
    if message.name is not None:
        fields["name"] = message.name
    if message.tool_calls:
        fields["tool_calls"] = [{"id": c.id, "type": "function",
                                 "function": {"name": c.name, "arguments": arguments_value(c.arguments)}}
                                for c in message.tool_calls]
    if message.tool_call_id is not None:
        fields["tool_call_id"] = message.tool_call_id
    return fields


def _text(literal: str) -> str:
    return json.dumps(literal) if literal else ""


def _regex(literal: str) -> str:
    return "".join("\\" + c if c in _REGEX_SPECIAL else c for c in literal)


_REGEX_SPECIAL = set("\\.^$*+?()[]{}|/")
