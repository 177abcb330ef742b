"""The response object and its stream events, built from bus results as they arrive.

One builder serves both ways of answering: a stream sends each event as it is made, a plain
answer drops them and sends the finished object, so the two cannot disagree."""

from __future__ import annotations

import copy
import time
import uuid
from typing import Any

from broker.protocol import Done, FinishReason, TokenDelta, ToolCallDelta
from frontends.openai_api.errors import ApiError

Event = dict[str, Any]


def deletion(response_id: str) -> dict[str, Any]:
    """What `DELETE /v1/responses/{id}` answers (OpenAI's spec gives it no schema; this is its API's shape)."""
    return {"id": response_id, "object": "response", "deleted": True}


def _new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


class ResponseBuilder:
    """One response: its output items as the bus delivers them, the events that stream them (each
    with the next `sequence_number`), and the object at any point of its life."""

    def __init__(self, echo: dict[str, Any]) -> None:
        self.id = _new_id("resp")
        self.created_at = int(time.time())
        self.echo = echo
        self.status = "in_progress"
        self.output: list[dict[str, Any]] = []
        self.usage: dict[str, Any] | None = None
        self.error: dict[str, str] | None = None
        self.completed_at: int | None = None
        self._sequence = 0
        self._open: list[int] = []  # output indexes of the items still being written
        self._message: int | None = None  # the message item text goes to, while it is open
        self._calls: dict[int, int] = {}  # the bus's call index -> output index
        self._held = ""  # blank text not shown yet: before calls it is no reply, and is dropped

    def response(self) -> dict[str, Any]:
        """The response object as it stands."""
        reason = "max_output_tokens" if self.status == "incomplete" else None
        body = {
            "id": self.id, "object": "response", "created_at": self.created_at, "status": self.status,
            "completed_at": self.completed_at, "error": self.error,
            "incomplete_details": {"reason": reason} if reason else None, "output": copy.deepcopy(self.output),
            "reasoning": None, **self.echo,
        }
        if self.usage is not None:  # known at the end; the spec has no null usage
            body["usage"] = self.usage
        return body

    def conversation(self) -> list[dict[str, Any]]:
        """The output as bus chat messages, to follow the input in a stored conversation."""
        text = "".join(part["text"] for item in self.output if item["type"] == "message" for part in item["content"])
        calls = [{"id": item["call_id"], "name": item["name"], "arguments": item["arguments"]}
                 for item in self.output if item["type"] == "function_call"]
        message: dict[str, Any] = {"role": "assistant", "content": text}
        if calls:
            message["tool_calls"] = calls
        return [message]

    # -- events

    def opening(self) -> list[Event]:
        return [self._event("response.created", response=self.response()),
                self._event("response.in_progress", response=self.response())]

    def delta(self, delta: TokenDelta) -> list[Event]:
        events = self._text(delta.text) if delta.text else []
        for piece in delta.tool_calls:
            events += self._call_piece(piece)
        return events

    def finish(self, done: Done) -> list[Event]:
        """The closing events; the last one carries the whole response."""
        events: list[Event] = []
        if not self.output:  # an answer with nothing else in it is a message, blank or empty
            events = self._text_now(self._held) if self._held else self._open_message()
        cut = done.finish_reason in (FinishReason.LENGTH, FinishReason.DEADLINE)
        events += self._close_all("incomplete" if cut else "completed")
        self.status = "incomplete" if cut else "completed"
        if not cut:
            self.completed_at = int(time.time())
        self.usage = {"input_tokens": done.prompt_tokens, "output_tokens": done.completion_tokens,
                      "total_tokens": done.prompt_tokens + done.completion_tokens,
                      "input_tokens_details": {"cached_tokens": done.cached_tokens, "cache_write_tokens": 0},
                      "output_tokens_details": {"reasoning_tokens": 0}}
        return events + [self._event(f"response.{self.status}", response=self.response())]

    def fail(self, error: ApiError) -> list[Event]:
        """After the stream began: an error event, then the failed response (its items left as they were)."""
        code = "rate_limit_exceeded" if error.status == 429 else "server_error"
        self.status, self.error = "failed", {"code": code, "message": error.message}
        return [self._event("error", code=error.code or code, message=error.message, param=error.param),
                self._event("response.failed", response=self.response())]

    def _text(self, text: str) -> list[Event]:
        if self._message is None and not (self._held + text).strip():
            self._held += text  # shown once real text follows it
            return []
        text, self._held = self._held + text, ""
        return self._text_now(text)

    def _text_now(self, text: str) -> list[Event]:
        events = self._open_message() if self._message is None else []
        index = self._message
        assert index is not None
        self.output[index]["content"][0]["text"] += text
        return events + [self._event("response.output_text.delta", item_id=self.output[index]["id"],
                                     output_index=index, content_index=0, delta=text, logprobs=[])]

    def _open_message(self) -> list[Event]:
        events = self._close_all("completed")
        part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        item = {"id": _new_id("msg"), "type": "message", "status": "in_progress", "role": "assistant", "content": []}
        index = self._add(item)
        self._message = index
        events.append(self._event("response.output_item.added", output_index=index, item=copy.deepcopy(item)))
        item["content"].append(part)
        events.append(self._event("response.content_part.added", item_id=item["id"], output_index=index,
                                  content_index=0, part=copy.deepcopy(part)))
        return events

    def _call_piece(self, piece: ToolCallDelta) -> list[Event]:
        events: list[Event] = []
        if piece.id is not None:  # a new call: whatever was being written is finished
            self._held = ""
            events += self._close_all("completed")
            item = {"id": _new_id("fc"), "type": "function_call", "status": "in_progress", "call_id": piece.id,
                    "name": piece.name or "", "arguments": ""}
            self._calls[piece.index] = self._add(item)
            events.append(self._event("response.output_item.added", output_index=self._calls[piece.index],
                                      item=copy.deepcopy(item)))
        index = self._calls[piece.index]
        if piece.arguments:
            self.output[index]["arguments"] += piece.arguments
            events.append(self._event("response.function_call_arguments.delta", item_id=self.output[index]["id"],
                                      output_index=index, delta=piece.arguments))
        return events

    def _add(self, item: dict[str, Any]) -> int:
        self.output.append(item)
        self._open.append(len(self.output) - 1)
        return len(self.output) - 1

    def _close_all(self, status: str) -> list[Event]:
        events: list[Event] = []
        for index in self._open:
            item = self.output[index]
            item["status"] = status
            if item["type"] == "message":
                part = item["content"][0]
                events += [self._event("response.output_text.done", item_id=item["id"], output_index=index,
                                       content_index=0, text=part["text"], logprobs=[]),
                           self._event("response.content_part.done", item_id=item["id"], output_index=index,
                                       content_index=0, part=copy.deepcopy(part))]
            else:
                events.append(self._event("response.function_call_arguments.done", item_id=item["id"],
                                          output_index=index, name=item["name"], arguments=item["arguments"]))
            events.append(self._event("response.output_item.done", output_index=index, item=copy.deepcopy(item)))
        self._open, self._message = [], None
        return events

    def _event(self, kind: str, **fields: Any) -> Event:
        event = {"type": kind, "sequence_number": self._sequence, **fields}
        self._sequence += 1
        return event
