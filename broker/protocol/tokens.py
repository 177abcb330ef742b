"""TOKENIZE and its answer, TOKENS."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from broker.protocol.frames import ProtocolError
from broker.protocol.fields import _get, _reject_unknown, is_token_id
from broker.protocol.tools import Tools
from broker.protocol.generation import ChatMessage, _chat_message


@dataclass(frozen=True, slots=True)
class TokenizeRequest:
    """Body of TOKENIZE: a prompt, or chat messages (with tools) under the model's chat template,
    to encode exactly as a REQUEST would; or `tokens` to decode back to text."""

    model: str
    prompt: str | None = None
    messages: tuple[ChatMessage, ...] | None = None
    tools: Tools | None = None
    tokens: tuple[int, ...] | None = None
    add_special_tokens: bool = True  # for a prompt: the tokenizer's BOS and the like, as a REQUEST adds them

    def __post_init__(self) -> None:
        if not self.model:
            raise ProtocolError.about("model", "must be a non-empty string")
        if sum(x is not None for x in (self.prompt, self.messages, self.tokens)) != 1:
            raise ProtocolError("exactly one of 'prompt', 'messages' or 'tokens' is required", "prompt")
        if self.messages is not None and not self.messages:
            raise ProtocolError.about("messages", "must not be empty")
        if self.tools is not None and self.messages is None:
            raise ProtocolError.about("tools", "needs 'messages'")
        if self.tokens is not None and not all(map(is_token_id, self.tokens)):
            raise ProtocolError.about("tokens", "must be an array of token ids (integers 0 to 2^31-1)")

    @classmethod
    def from_fields(cls, fields: dict[str, Any]) -> TokenizeRequest:
        _reject_unknown(fields, cls.__slots__)
        messages = _get(fields, "messages", list)
        tokens = _get(fields, "tokens", list)
        return cls(
            model=_get(fields, "model", str, required=True),
            prompt=_get(fields, "prompt", str),
            messages=None if messages is None else tuple(_chat_message(i, m) for i, m in enumerate(messages)),
            tools=Tools.read(fields.get("tools")),
            tokens=None if tokens is None else tuple(tokens),
            add_special_tokens=_get(fields, "add_special_tokens", bool, True),
        )

    def to_fields(self) -> dict[str, Any]:
        fields: dict[str, Any] = {"model": self.model, "add_special_tokens": self.add_special_tokens}
        if self.prompt is not None:
            fields["prompt"] = self.prompt
        if self.messages is not None:
            fields["messages"] = [m.to_fields() for m in self.messages]
        if self.tools is not None:
            fields["tools"] = self.tools.to_fields()
        if self.tokens is not None:
            fields["tokens"] = list(self.tokens)
        return fields


@dataclass(frozen=True, slots=True)
class Tokens:
    """Body of TOKENS: the token ids (given, or encoded), their text (given, or decoded) and the
    model's context length."""

    tokens: tuple[int, ...]
    text: str
    max_model_len: int

    @property
    def count(self) -> int:
        return len(self.tokens)

    def to_fields(self) -> dict[str, Any]:
        return {"tokens": list(self.tokens), "text": self.text, "max_model_len": self.max_model_len}

    @classmethod
    def from_fields(cls, fields: dict[str, Any]) -> Tokens:
        tokens = _get(fields, "tokens", list, required=True)
        if not all(map(is_token_id, tokens)):
            raise ProtocolError.about("tokens", "must be an array of token ids")
        return cls(tuple(tokens), _get(fields, "text", str, ""), _get(fields, "max_model_len", int, required=True))
