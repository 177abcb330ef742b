"""What every tool format is: how it offers tools to a model and reads its calls back, and the
reader that turns a streaming answer into reply text and call pieces."""

from __future__ import annotations

import uuid
from abc import ABC, abstractmethod
from typing import Any

from broker.protocol import ChatMessage, ToolCallDelta, Tools


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
