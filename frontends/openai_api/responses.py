"""The one place that builds OpenAI JSON from bus results."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from broker.protocol import Done, ModelInfo, TokenDelta, TokenLogprob
from frontends.client import Completion
from frontends.openai_api.errors import ApiError


def error_body(error: ApiError) -> dict[str, Any]:
    return {"error": {"message": error.message, "type": error.type, "param": error.param, "code": error.code}}


def model_object(info: ModelInfo, created: int) -> dict[str, Any]:
    return {"id": info.name, "object": "model", "created": created, "owned_by": "tokenbus"}


def model_list(infos: list[ModelInfo], created: int) -> dict[str, Any]:
    return {"object": "list", "data": [model_object(info, created) for info in infos]}


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _finish_reason(reason: str) -> str:
    return "length" if reason == "length" else "stop"


def _chat_logprobs(entries: tuple[TokenLogprob, ...]) -> dict[str, Any]:
    return {"content": [{"token": e.token, "logprob": e.logprob, "bytes": list(e.token_bytes),
                         "top_logprobs": [{"token": t.token, "logprob": t.logprob, "bytes": list(t.token_bytes)}
                                          for t in e.top]}
                        for e in entries], "refusal": None}


def _legacy_logprobs(entries: tuple[TokenLogprob, ...], text_start: int = 0) -> dict[str, Any]:
    offsets, position = [], text_start
    for entry in entries:
        offsets.append(position)
        position += len(entry.token)
    return {"tokens": [e.token for e in entries], "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [{t.token: t.logprob for t in e.top} for e in entries], "text_offset": offsets}


@dataclass(slots=True)
class ResponseIds:
    """What every object of one response shares."""

    model: str
    kind: str  # "chat" or "completion"
    id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))
    include_usage: bool = False  # chunks then carry "usage": null, all but the last

    def __post_init__(self) -> None:
        self.id = self.id or f"{'chatcmpl' if self.kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"

    def _head(self, object_name: str) -> dict[str, Any]:
        return {"id": self.id, "object": object_name, "created": self.created, "model": self.model}

    # -- whole responses

    def response(self, completions: list[Completion], n: int, prompts: list[str | None]) -> dict[str, Any]:
        """`completions` holds n choices per prompt (`prompts`, one per completion); each prompt is
        counted once in the usage."""
        prompt_tokens = sum(c.prompt_tokens for c in completions[::n])
        body_usage = usage(prompt_tokens, sum(c.completion_tokens for c in completions))
        if self.kind == "chat":
            choices = [{"index": i, "finish_reason": _finish_reason(c.finish_reason),
                        "message": {"role": "assistant", "content": c.text, "refusal": None},
                        "logprobs": _chat_logprobs(c.logprobs) if c.logprobs is not None else None}
                       for i, c in enumerate(completions)]
            return {**self._head("chat.completion"), "choices": choices, "usage": body_usage}
        choices = [{"index": i, "text": c.text, "finish_reason": _finish_reason(c.finish_reason),
                    "logprobs": _legacy_logprobs(c.logprobs, len(p or "")) if c.logprobs is not None else None}
                   for i, (c, p) in enumerate(zip(completions, prompts))]
        return {**self._head("text_completion"), "choices": choices, "usage": body_usage}

    # -- stream chunks

    def role_chunk(self, index: int) -> dict[str, Any]:
        """A chat stream's first chunk for a choice: the role alone."""
        return self._chunk({"index": index, "delta": {"role": "assistant", "content": ""}, "finish_reason": None,
                            "logprobs": None})

    def delta_chunk(self, index: int, delta: TokenDelta, text_start: int = 0) -> dict[str, Any]:
        if self.kind == "chat":
            logprobs = _chat_logprobs(delta.logprobs) if delta.logprobs is not None else None
            return self._chunk({"index": index, "delta": {"content": delta.text}, "finish_reason": None,
                                "logprobs": logprobs})
        logprobs = _legacy_logprobs(delta.logprobs, text_start) if delta.logprobs is not None else None
        return self._chunk({"index": index, "text": delta.text, "finish_reason": None, "logprobs": logprobs})

    def finish_chunk(self, index: int, done: Done) -> dict[str, Any]:
        reason = _finish_reason(done.finish_reason.value)
        if self.kind == "chat":
            return self._chunk({"index": index, "delta": {}, "finish_reason": reason, "logprobs": None})
        return self._chunk({"index": index, "text": "", "finish_reason": reason, "logprobs": None})

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
        return {**self._chunk(None), "usage": usage(prompt_tokens, completion_tokens)}

    def _chunk(self, choice: dict[str, Any] | None) -> dict[str, Any]:
        object_name = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        chunk = {**self._head(object_name), "choices": [choice] if choice is not None else []}
        if self.include_usage:
            chunk["usage"] = None
        return chunk
