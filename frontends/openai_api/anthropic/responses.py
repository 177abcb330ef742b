"""The one place that builds Anthropic Message JSON and stream events from bus results."""

from __future__ import annotations

import json
import uuid
from typing import Any

from broker.protocol import Done, FinishReason, TokenDelta, ToolCallDelta
from frontends.client import Completion
from frontends.openai_api.tools import whole_calls

Event = tuple[str, dict[str, Any]]  # an SSE event's name and its data


def message_id() -> str:
    return f"msg_{uuid.uuid4().hex}"


def stop_reason(reason: FinishReason | str, stop: str | None) -> dict[str, Any]:
    """`stop_reason` and `stop_sequence`: how an answer ended, in Anthropic's words."""
    if stop is not None:
        return {"stop_reason": "stop_sequence", "stop_sequence": stop}
    kind = {"length": "max_tokens", "deadline": "max_tokens", "tool_calls": "tool_use"}.get(FinishReason(reason).value,
                                                                                           "end_turn")
    return {"stop_reason": kind, "stop_sequence": None}


def usage(input_tokens: int, output_tokens: int) -> dict[str, int]:
    return {"input_tokens": input_tokens, "output_tokens": output_tokens}


def token_count(input_tokens: int) -> dict[str, int]:
    """`/v1/messages/count_tokens`'s answer."""
    return {"input_tokens": input_tokens}


def tool_input(arguments: str) -> dict[str, Any]:
    """A call's arguments as the object Anthropic sends; `{}` for arguments cut short by `max_tokens`."""
    try:
        value = json.loads(arguments)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def message(message_id: str, model: str, completion: Completion) -> dict[str, Any]:
    """The whole answer as an Anthropic Message."""
    content: list[dict[str, Any]] = []
    calls = whole_calls(list(completion.tool_calls))
    if completion.text and not (calls and not completion.text.strip()):  # the blank line before calls says nothing
        content.append({"type": "text", "text": completion.text})
    content += [{"type": "tool_use", "id": call["id"], "name": call["function"]["name"],
                 "input": tool_input(call["function"]["arguments"])} for call in calls]
    return {"id": message_id, "type": "message", "role": "assistant", "model": model, "content": content,
            **stop_reason(completion.finish_reason, completion.stop),
            "usage": usage(completion.prompt_tokens, completion.completion_tokens)}


class MessageEvents:
    """The events of one streamed answer. Blocks open as their first piece arrives: text, then each
    tool call, each block closed before the next opens."""

    def __init__(self, model: str, *, may_call: bool) -> None:
        self.id = message_id()
        self.model = model
        self._may_call = may_call  # tools are offered: blank text may be what comes before a call
        self._index = -1  # the open block's index in the message's content
        self._open: str | int | None = None  # "text", a call's index among the answer's calls, or none
        self._held = ""  # blank text before any block: a reply's if text follows, dropped if a call does

    def opening(self) -> list[Event]:
        # The prompt's size is known only at the end (the bus counts it): message_delta carries it.
        head = {"id": self.id, "type": "message", "role": "assistant", "model": self.model, "content": [],
                "stop_reason": None, "stop_sequence": None, "usage": usage(0, 0)}
        return [("message_start", {"type": "message_start", "message": head}), ("ping", {"type": "ping"})]

    def delta(self, delta: TokenDelta) -> list[Event]:
        events: list[Event] = []
        text = delta.text
        if self._may_call and self._index < 0 and not (self._held + text).strip():
            self._held += text
            text = ""
        if text:
            if self._open != "text":
                text = self._held + text
                events += self._start("text", {"type": "text", "text": ""})
            events.append(self._delta({"type": "text_delta", "text": text}))
        for piece in delta.tool_calls:
            events += self._call_piece(piece)
        return events

    def closing(self, done: Done) -> list[Event]:
        events: list[Event] = []
        if self._held and self._index < 0:  # a reply of blank text only
            held = self._held
            events += [*self._start("text", {"type": "text", "text": ""}),
                       self._delta({"type": "text_delta", "text": held})]
        data = {"type": "message_delta",
                "delta": stop_reason(done.finish_reason, done.stop),
                "usage": usage(done.prompt_tokens, done.completion_tokens)}
        return [*events, *self._stop(), ("message_delta", data), ("message_stop", {"type": "message_stop"})]

    def _call_piece(self, piece: ToolCallDelta) -> list[Event]:
        events: list[Event] = []
        if piece.id is not None:  # a call's first piece: its id and name
            events += self._start(piece.index, {"type": "tool_use", "id": piece.id, "name": piece.name, "input": {}})
        if piece.arguments:
            events.append(self._delta({"type": "input_json_delta", "partial_json": piece.arguments}))
        return events

    def _start(self, block: str | int, content_block: dict[str, Any]) -> list[Event]:
        events = self._stop()
        self._index += 1
        self._open = block
        self._held = ""
        return [*events, ("content_block_start",
                          {"type": "content_block_start", "index": self._index, "content_block": content_block})]

    def _delta(self, delta: dict[str, Any]) -> Event:
        return "content_block_delta", {"type": "content_block_delta", "index": self._index, "delta": delta}

    def _stop(self) -> list[Event]:
        if self._open is None:
            return []
        self._open = None
        return [("content_block_stop", {"type": "content_block_stop", "index": self._index})]


def sse(event: Event) -> bytes:
    name, data = event
    return f"event: {name}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n".encode()
