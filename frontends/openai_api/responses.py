"""The one place that builds OpenAI JSON from bus results."""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time
import uuid
from typing import Any

import numpy as np

from broker.protocol import Done, Embeddings, ModelInfo, TokenDelta, TokenLogprob
from frontends.client import Completion
from frontends.openai_api.errors import ApiError
from frontends.openai_api.tools import call_delta, whole_calls


def error_body(error: ApiError) -> dict[str, Any]:
    return {"error": {"message": error.message, "type": error.type, "param": error.param, "code": error.code}}


def model_object(info: ModelInfo, created: int) -> dict[str, Any]:
    return {"id": info.name, "object": "model", "created": created, "owned_by": "tokenbus"}


def model_list(infos: list[ModelInfo], created: int) -> dict[str, Any]:
    return {"object": "list", "data": [model_object(info, created) for info in infos]}


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict[str, Any]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


# A worker id is its host name and process id, and guessable from them; keyed with a secret of this
# process, the fingerprint tells clients which worker answered but nothing about where it runs.
_FINGERPRINT_KEY = secrets.token_bytes(32)


def fingerprint(worker_id: str) -> str:
    """OpenAI's `system_fingerprint` names the backend that answered: here, the worker, opaquely."""
    return "fp_" + hmac.new(_FINGERPRINT_KEY, worker_id.encode(), hashlib.sha256).hexdigest()[:10]


def _fingerprint(worker_id: str) -> dict[str, str]:
    return {"system_fingerprint": fingerprint(worker_id)} if worker_id else {}


def _finish_reason(reason: str) -> str:
    """OpenAI's name for how a choice ended (a cancelled one is not seen by its caller); one whose
    `timeout` ran out was cut short, as by `max_tokens`."""
    return {"length": "length", "tool_calls": "tool_calls", "deadline": "length"}.get(reason, "stop")


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


class Responses:
    """What every object of one response shares: its id, creation time and model. The chat and the
    text-completion shapes are the two subclasses."""

    id_prefix = ""
    object_name = ""
    chunk_object_name = ""

    def __init__(self, model: str, *, include_usage: bool = False) -> None:
        self.model = model
        self.id = f"{self.id_prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.include_usage = include_usage  # chunks then carry "usage": null, all but the last

    def response(self, completions: list[Completion], n: int) -> dict[str, Any]:
        """The whole answer: `completions` holds n choices per prompt, and each prompt is counted
        once in the usage."""
        prompt_tokens = sum(c.prompt_tokens for c in completions[::n])
        cached_tokens = sum(c.cached_tokens for c in completions[::n])
        body_usage = usage(prompt_tokens, sum(c.completion_tokens for c in completions), cached_tokens)
        choices = [self._choice(index, completion) for index, completion in enumerate(completions)]
        return {**self._head(self.object_name), "choices": choices, "usage": body_usage,
                **_fingerprint(completions[0].worker_id)}

    def opening_chunks(self, num_choices: int) -> list[dict[str, Any]]:
        """Chunks sent before the first token."""
        return []

    def delta_chunk(self, index: int, delta: TokenDelta) -> dict[str, Any]:
        raise NotImplementedError

    def delta_chunks(self, index: int, delta: TokenDelta) -> list[dict[str, Any]]:
        return [self.delta_chunk(index, delta)]

    def finish_chunk(self, index: int, done: Done) -> dict[str, Any]:
        raise NotImplementedError

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0,
                    worker_id: str = "") -> dict[str, Any]:
        return {**self._chunk(None), "usage": usage(prompt_tokens, completion_tokens, cached_tokens),
                **_fingerprint(worker_id)}

    def _choice(self, index: int, completion: Completion) -> dict[str, Any]:
        raise NotImplementedError

    def _head(self, object_name: str) -> dict[str, Any]:
        return {"id": self.id, "object": object_name, "created": self.created, "model": self.model}

    def _chunk(self, choice: dict[str, Any] | None) -> dict[str, Any]:
        chunk = {**self._head(self.chunk_object_name), "choices": [choice] if choice is not None else []}
        if self.include_usage:
            chunk["usage"] = None
        return chunk


class ChatResponses(Responses):
    """`/v1/chat/completions` objects."""

    id_prefix = "chatcmpl"
    object_name = "chat.completion"
    chunk_object_name = "chat.completion.chunk"

    def opening_chunks(self, num_choices: int) -> list[dict[str, Any]]:
        """A chat stream's first chunk for each choice: the role alone."""
        return [self._chunk({"index": index, "delta": {"role": "assistant", "content": ""}, "finish_reason": None,
                             "logprobs": None}) for index in range(num_choices)]

    def delta_chunk(self, index: int, delta: TokenDelta) -> dict[str, Any]:
        logprobs = _chat_logprobs(delta.logprobs) if delta.logprobs is not None else None
        return self._chunk({"index": index, "delta": {"content": delta.text}, "finish_reason": None,
                            "logprobs": logprobs})

    def delta_chunks(self, index: int, delta: TokenDelta) -> list[dict[str, Any]]:
        """The chunks a frame brings: its text, then each piece of a tool call on its own, as OpenAI sends them."""
        chunks = [self.delta_chunk(index, delta)] if delta.text or delta.logprobs or not delta.tool_calls else []
        return chunks + [self._chunk({"index": index, "delta": {"tool_calls": [call_delta(piece)]},
                                      "finish_reason": None, "logprobs": None}) for piece in delta.tool_calls]

    def finish_chunk(self, index: int, done: Done) -> dict[str, Any]:
        return self._chunk({"index": index, "delta": {}, "logprobs": None,
                            "finish_reason": _finish_reason(done.finish_reason.value)})

    def _choice(self, index: int, completion: Completion) -> dict[str, Any]:
        logprobs = _chat_logprobs(completion.logprobs) if completion.logprobs is not None else None
        calls = whole_calls(list(completion.tool_calls))
        # With calls, text that says nothing (the blank line before them) is no reply.
        content = None if calls and not completion.text.strip() else completion.text
        message: dict[str, Any] = {"role": "assistant", "content": content, "refusal": None}
        if calls:
            message["tool_calls"] = calls
        return {"index": index, "finish_reason": _finish_reason(completion.finish_reason), "message": message,
                "logprobs": logprobs}


class CompletionResponses(Responses):
    """`/v1/completions` objects. Legacy logprobs give each token's offset in the text, counted from
    the end of the prompt, so a stream keeps each choice's offset here."""

    id_prefix = "cmpl"
    object_name = "text_completion"
    chunk_object_name = "text_completion"

    def __init__(self, model: str, prompts: list[str], *, include_usage: bool = False) -> None:
        super().__init__(model, include_usage=include_usage)
        self.prompts = prompts  # one per choice
        self._offsets = [len(prompt) for prompt in prompts]

    def delta_chunk(self, index: int, delta: TokenDelta) -> dict[str, Any]:
        logprobs = None
        if delta.logprobs is not None:
            logprobs = _legacy_logprobs(delta.logprobs, self._offsets[index])
            self._offsets[index] += sum(len(entry.token) for entry in delta.logprobs)
        return self._chunk({"index": index, "text": delta.text, "finish_reason": None, "logprobs": logprobs})

    def finish_chunk(self, index: int, done: Done) -> dict[str, Any]:
        return self._chunk({"index": index, "text": "", "finish_reason": _finish_reason(done.finish_reason.value),
                            "logprobs": None})

    def _choice(self, index: int, completion: Completion) -> dict[str, Any]:
        logprobs = None
        if completion.logprobs is not None:
            logprobs = _legacy_logprobs(completion.logprobs, len(self.prompts[index]))
        return {"index": index, "text": completion.text, "finish_reason": _finish_reason(completion.finish_reason),
                "logprobs": logprobs}


def embedding_list(model: str, answers: list[Embeddings], encoding_format: str) -> dict[str, Any]:
    """`/v1/embeddings`: the vectors of every answer, in input order. base64 is the little-endian
    float32 bytes, as OpenAI sends them (and as they travel on the bus)."""
    vectors = [vector for answer in answers for vector in answer.vectors]
    if encoding_format == "base64":
        encoded: list[Any] = [base64.b64encode(vector).decode("ascii") for vector in vectors]
    else:
        encoded = [np.frombuffer(vector, "<f4").tolist() for vector in vectors]
    prompt_tokens = sum(answer.prompt_tokens for answer in answers)
    return {"object": "list", "model": model,
            "data": [{"object": "embedding", "index": index, "embedding": embedding}
                     for index, embedding in enumerate(encoded)],
            "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}}
