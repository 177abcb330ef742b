"""What a REQUEST is answered with: TOKEN frames, then DONE or ERROR."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from broker.protocol.frames import ErrorCode, FinishReason, MAX_ERROR_MESSAGE, ProtocolError
from broker.protocol.fields import _get, is_token_id


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    """A token and its log-probability. `token_bytes` are its own bytes: for a token that holds part
    of a UTF-8 character they are not those of `token`, which then shows U+FFFD."""

    token: str
    logprob: float
    token_bytes: bytes = b""
    top: tuple[TokenLogprob, ...] = ()  # the most likely alternatives (their own `top` is empty)

    def to_fields(self) -> dict[str, Any]:
        fields: dict[str, Any] = {"token": self.token, "bytes": self.token_bytes, "logprob": self.logprob}
        if self.top:
            fields["top"] = [t.to_fields() for t in self.top]
        return fields

    @classmethod
    def from_fields(cls, entry: Any) -> TokenLogprob:
        try:
            top = tuple(cls.from_fields(t) for t in entry.get("top", ()))
            token_bytes = entry.get("bytes", b"")
            if not isinstance(token_bytes, bytes):  # bytes(5) would be five zero bytes
                raise TypeError("'bytes' must be bin")
            return cls(str(entry["token"]), float(entry["logprob"]), token_bytes, top)
        except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as exc:
            raise ProtocolError(f"malformed 'logprobs' entry: {exc}", "logprobs") from None


@dataclass(frozen=True, slots=True)
class ToolCallDelta:
    """A piece of a streamed tool call: `id` and `name` come once, with its first piece; `arguments`
    is the next stretch of its JSON text."""

    index: int  # which call of the answer, from 0
    arguments: str = ""
    id: str | None = None
    name: str | None = None

    def to_fields(self) -> dict[str, Any]:
        fields: dict[str, Any] = {"index": self.index, "arguments": self.arguments}
        if self.id is not None:
            fields["id"], fields["name"] = self.id, self.name
        return fields

    @classmethod
    def from_fields(cls, entry: Any) -> ToolCallDelta:
        if not isinstance(entry, dict):
            raise ProtocolError("each 'tool_calls' entry must be a map", "tool_calls")
        return cls(_get(entry, "index", int, required=True), _get(entry, "arguments", str, ""),
                   _get(entry, "id", str), _get(entry, "name", str))


@dataclass(frozen=True, slots=True)
class TokenDelta:
    """Body of TOKEN: newly generated text (never a split UTF-8 character). With tools, `text` is the
    reply's text and `tool_calls` the pieces of calls the new tokens wrote."""

    text: str
    num_tokens: int = 1
    logprobs: tuple[TokenLogprob, ...] | None = None
    tool_calls: tuple[ToolCallDelta, ...] = ()
    token_ids: tuple[int, ...] = ()  # the `num_tokens` tokens themselves: what a resumed request continues after

    def to_fields(self) -> dict[str, Any]:
        fields: dict[str, Any] = {"text": self.text, "num_tokens": self.num_tokens}
        if self.token_ids:
            fields["token_ids"] = list(self.token_ids)
        if self.logprobs is not None:
            fields["logprobs"] = [lp.to_fields() for lp in self.logprobs]
        if self.tool_calls:
            fields["tool_calls"] = [call.to_fields() for call in self.tool_calls]
        return fields

    @classmethod
    def from_fields(cls, fields: dict[str, Any]) -> TokenDelta:
        raw = _get(fields, "logprobs", list)
        logprobs = None if raw is None else tuple(TokenLogprob.from_fields(e) for e in raw)
        calls = tuple(ToolCallDelta.from_fields(entry) for entry in _get(fields, "tool_calls", list, []))
        token_ids = _get(fields, "token_ids", list, [])
        if not all(map(is_token_id, token_ids)):
            raise ProtocolError.about("token_ids", "must be an array of token ids")
        return cls(_get(fields, "text", str, ""), _get(fields, "num_tokens", int, 1), logprobs, calls,
                   tuple(token_ids))


@dataclass(frozen=True, slots=True)
class Done:
    """Body of DONE, the last message of a successful stream."""

    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0  # prompt tokens whose KV came from the worker's prefix cache
    worker_id: str = ""  # the worker that served it, as it announced itself
    stop: str | None = None  # the request's stop string that ended it, when one did

    def to_fields(self) -> dict[str, Any]:
        fields = {
            "finish_reason": self.finish_reason.value,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
        }
        if self.cached_tokens:  # left out when 0, as before there was a prefix cache
            fields["cached_tokens"] = self.cached_tokens
        if self.worker_id:
            fields["worker_id"] = self.worker_id
        if self.stop is not None:
            fields["stop"] = self.stop
        return fields

    @classmethod
    def from_fields(cls, fields: dict[str, Any]) -> Done:
        try:
            reason = FinishReason(_get(fields, "finish_reason", str, required=True))
        except ValueError:
            raise ProtocolError("unknown finish_reason", "finish_reason") from None
        return cls(reason, _get(fields, "prompt_tokens", int, 0), _get(fields, "completion_tokens", int, 0),
                   _get(fields, "cached_tokens", int, 0), _get(fields, "worker_id", str, ""), _get(fields, "stop", str))


@dataclass(frozen=True, slots=True)
class Error:
    """Body of ERROR, the last message of a failed stream or answer to a bad message."""

    code: ErrorCode
    message: str
    field: str | None = None  # the request field at fault, as a path (`messages[2].content`), when one is

    def to_fields(self) -> dict[str, Any]:
        fields = {"code": self.code.value, "message": self.message[:MAX_ERROR_MESSAGE]}
        if self.field is not None:
            fields["field"] = self.field
        return fields

    @classmethod
    def from_fields(cls, fields: dict[str, Any]) -> Error:
        raw = _get(fields, "code", str, ErrorCode.INTERNAL.value)
        try:
            code = ErrorCode(raw)
        except ValueError:
            code = ErrorCode.INTERNAL
        return cls(code, _get(fields, "message", str, raw), _get(fields, "field", str))
