"""REQUEST: what to generate and how (the chat, sampling, constraints, tools, resume, priority, timeout)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from broker.protocol.frames import ProtocolError
from broker.protocol.fields import MAX_COUNT, _canonical_json, _check_range, _get, _number, _quote, _reject_unknown, is_token_id
from broker.protocol.tools import ToolCall, Tools


MAX_STOP_STRINGS = 4
MAX_STOP_TOKEN_IDS = 64
MAX_TIMEOUT = 86400.0  # seconds: the longest `timeout` a request may ask for
MAX_TOP_LOGPROBS = 20
TEMPERATURE_RANGE = (0.0, 2.0)  # 0: greedy
SEED_RANGE = (-(2**63), 2**63 - 1)  # a signed 64-bit integer
CONSTRAINT_TYPES = ("json_object", "json_schema")
CHAT_ROLES = ("system", "user", "assistant", "tool")


@dataclass(frozen=True, slots=True)
class ChatMessage:
    role: str  # system, user, assistant or tool
    content: str
    name: str | None = None  # the participant's name, for chat templates that show it
    tool_calls: tuple[ToolCall, ...] = ()  # an assistant's calls
    tool_call_id: str | None = None  # a tool message: the call it answers

    def to_fields(self) -> dict[str, Any]:
        """The entry as the wire carries it: optional fields only when set."""
        fields: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.name is not None:
            fields["name"] = self.name
        if self.tool_calls:
            fields["tool_calls"] = [call.to_fields() for call in self.tool_calls]
        if self.tool_call_id is not None:
            fields["tool_call_id"] = self.tool_call_id
        return fields


@dataclass(frozen=True, slots=True)
class Constraint:
    """What a constrained output must be: any JSON object, or JSON valid against `schema`.

    Its fields are plain msgpack values, so a schema reaches the worker as sent."""

    type: str
    schema: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.type not in CONSTRAINT_TYPES:
            raise ProtocolError.about("constraint.type", f"must be one of {', '.join(CONSTRAINT_TYPES)}, "
                                      f"got {_quote(self.type)}")
        if (self.type == "json_schema") != (self.schema is not None):
            raise ProtocolError.about("constraint.schema", "is required with type json_schema, and only then")
        _canonical_json(self.schema, "constraint.schema")  # a schema that is not JSON is refused here, at the broker

    @property
    def key(self) -> str:
        """The same constraint always has the same key (compiled grammars are cached by it)."""
        return self.type + ":" + _canonical_json(self.schema, "constraint.schema")

    def to_fields(self) -> dict[str, Any]:
        return {"type": self.type} if self.schema is None else {"type": self.type, "schema": self.schema}

    @classmethod
    def from_fields(cls, value: Any) -> Constraint:
        if not isinstance(value, dict):
            raise ProtocolError.about("constraint", "must be a map")
        _reject_unknown(value, ("type", "schema"), "constraint")
        try:
            return cls(_get(value, "type", str, required=True), _get(value, "schema", dict))
        except ProtocolError as exc:
            if exc.field not in ("type", "schema"):
                raise
            raise exc.renamed(f"constraint.{exc.field}") from None  # the name as the caller knows it


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    """Body of REQUEST: what to generate and how. Exactly one of `messages` or `prompt`."""

    model: str
    messages: tuple[ChatMessage, ...] | None = None
    prompt: str | None = None
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: bool = False
    top_logprobs: int = 0
    constraint: Constraint | None = None
    tools: Tools | None = None
    # vLLM's extra sampling fields, which benchmark and eval tools send; left off the wire at their defaults
    min_p: float = 0.0
    min_tokens: int = 0  # no end of turn, stop token or stop string before this many tokens
    ignore_eos: bool = False  # the end of turn is a token like any other: only max_tokens (or a stop) ends it
    stop_token_ids: tuple[int, ...] = ()
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    # A request cut by a fault, sent again: the answer's tokens already delivered, to continue after
    resume_ids: tuple[int, ...] = ()
    priority: int = 0  # lower first in its model's queue (vLLM's meaning); ties keep arrival order
    timeout: float | None = None  # seconds the broker gives it, queue wait and generation together

    def __post_init__(self) -> None:
        if not self.model:
            raise ProtocolError.about("model", "must be a non-empty string")
        if (self.messages is None) == (self.prompt is None):
            raise ProtocolError("exactly one of 'messages' or 'prompt' is required", "messages")
        if self.messages is not None and not self.messages:
            raise ProtocolError.about("messages", "must not be empty")
        if self.max_tokens is not None:
            _check_range("max_tokens", self.max_tokens, 1, MAX_COUNT)
        _check_range("temperature", self.temperature, *TEMPERATURE_RANGE)
        _check_range("top_p", self.top_p, 0.0, 1.0)
        if self.top_p == 0.0:
            raise ProtocolError.about("top_p", "must be greater than 0")
        _check_range("top_k", self.top_k, 0, MAX_COUNT)  # 0: off
        if self.seed is not None:
            _check_range("seed", self.seed, *SEED_RANGE)
        if len(self.stop) > MAX_STOP_STRINGS or any(not s for s in self.stop):
            raise ProtocolError.about("stop", f"takes at most {MAX_STOP_STRINGS} non-empty strings")
        _check_range("repetition_penalty", self.repetition_penalty, 0.01, 10.0)
        _check_range("presence_penalty", self.presence_penalty, -2.0, 2.0)
        _check_range("frequency_penalty", self.frequency_penalty, -2.0, 2.0)
        _check_range("top_logprobs", self.top_logprobs, 0, MAX_TOP_LOGPROBS)
        _check_range("min_p", self.min_p, 0.0, 1.0)
        _check_range("min_tokens", self.min_tokens, 0, MAX_COUNT)
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ProtocolError.about("min_tokens",
                                      f"({self.min_tokens}) must not exceed 'max_tokens' ({self.max_tokens})")
        if len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS or not all(map(is_token_id, self.stop_token_ids)):
            raise ProtocolError.about("stop_token_ids", f"takes at most {MAX_STOP_TOKEN_IDS} token ids "
                                      "(integers 0 to 2^31-1)")
        _check_range("priority", self.priority, -MAX_COUNT - 1, MAX_COUNT)
        if self.timeout is not None and not 0 < self.timeout <= MAX_TIMEOUT:
            raise ProtocolError.about("timeout", f"must be a number of seconds above 0 and at most {MAX_TIMEOUT:.0f}")
        if not all(map(is_token_id, self.resume_ids)):
            raise ProtocolError.about("resume_ids", "must be an array of token ids (integers 0 to 2^31-1)")
        if self.max_tokens is not None and len(self.resume_ids) > self.max_tokens:
            raise ProtocolError.about("resume_ids", "must not be longer than 'max_tokens'")
        if self.stop and (self.constraint is not None or self.tools is not None):  # it could cut them short of valid
            raise ProtocolError.about("stop", "cannot be combined with a response format or tools")
        if self.tools is not None:
            if self.messages is None:
                raise ProtocolError.about("tools", "needs 'messages'")
            if self.constraint is not None:
                raise ProtocolError.about("constraint", "cannot be combined with tools")

    @classmethod
    def from_fields(cls, fields: dict[str, Any]) -> GenerationRequest:
        _reject_unknown(fields, cls.__slots__)
        messages = _get(fields, "messages", list)
        if messages is not None:
            messages = tuple(_chat_message(index, m) for index, m in enumerate(messages))
        stop = _get(fields, "stop", list, [])
        if not all(isinstance(s, str) for s in stop):
            raise ProtocolError.about("stop", "must be an array of strings")
        return cls(
            model=_get(fields, "model", str, required=True),
            messages=messages,
            prompt=_get(fields, "prompt", str),
            max_tokens=_get(fields, "max_tokens", int),
            temperature=_number(fields, "temperature", 1.0),
            top_p=_number(fields, "top_p", 1.0),
            top_k=_top_k(_get(fields, "top_k", int, 0)),
            stop=tuple(stop),
            seed=_get(fields, "seed", int),
            repetition_penalty=_number(fields, "repetition_penalty", 1.0),
            presence_penalty=_number(fields, "presence_penalty", 0.0),
            frequency_penalty=_number(fields, "frequency_penalty", 0.0),
            logprobs=_get(fields, "logprobs", bool, False),
            top_logprobs=_get(fields, "top_logprobs", int, 0),
            constraint=None if fields.get("constraint") is None else Constraint.from_fields(fields["constraint"]),
            tools=Tools.read(fields.get("tools")),
            min_p=_number(fields, "min_p", 0.0),
            min_tokens=_get(fields, "min_tokens", int, 0),
            ignore_eos=_get(fields, "ignore_eos", bool, False),
            stop_token_ids=tuple(_get(fields, "stop_token_ids", list, [])),
            include_stop_str_in_output=_get(fields, "include_stop_str_in_output", bool, False),
            skip_special_tokens=_get(fields, "skip_special_tokens", bool, True),
            spaces_between_special_tokens=_get(fields, "spaces_between_special_tokens", bool, True),
            resume_ids=tuple(_get(fields, "resume_ids", list, [])),
            priority=_get(fields, "priority", int, 0),
            timeout=None if fields.get("timeout") is None else _number(fields, "timeout", 0.0),
        )

    def to_fields(self) -> dict[str, Any]:
        fields = asdict(self)
        if self.messages is not None:
            fields["messages"] = [m.to_fields() for m in self.messages]
        fields["stop"] = list(self.stop)
        fields["stop_token_ids"] = list(self.stop_token_ids)
        fields["resume_ids"] = list(self.resume_ids)
        if self.constraint is not None:
            fields["constraint"] = self.constraint.to_fields()
        if self.tools is not None:
            fields["tools"] = self.tools.to_fields()
        return {k: v for k, v in fields.items() if v is not None and not _default_extra(k, v)}


_EXTRA_DEFAULTS = {"min_p": 0.0, "min_tokens": 0, "ignore_eos": False, "stop_token_ids": [],
                   "include_stop_str_in_output": False, "skip_special_tokens": True,
                   "spaces_between_special_tokens": True, "resume_ids": [], "priority": 0}


def _default_extra(name: str, value: Any) -> bool:
    """One of the extra sampling fields at its default: not sent."""
    return name in _EXTRA_DEFAULTS and value == _EXTRA_DEFAULTS[name] and type(value) is type(_EXTRA_DEFAULTS[name])


def _chat_message(index: int, value: Any) -> ChatMessage:
    name = f"messages[{index}]"
    if not isinstance(value, dict):
        raise ProtocolError.about(name, "must be a map with 'role' and 'content'")
    role, content = value.get("role"), value.get("content")
    if role not in CHAT_ROLES:
        raise ProtocolError.about(f"{name}.role", f"must be one of {', '.join(CHAT_ROLES)}, got {_quote(role)}")
    if not isinstance(content, str):
        raise ProtocolError.about(f"{name}.content", "must be a string")
    for key in ("name", "tool_call_id"):
        if value.get(key) is not None and not isinstance(value[key], str):
            raise ProtocolError.about(f"{name}.{key}", "must be a string")
    calls = value.get("tool_calls") or []
    if not isinstance(calls, list) or (calls and role != "assistant"):
        raise ProtocolError.about(f"{name}.tool_calls", "must be an array, in an assistant message")
    tool_calls = tuple(ToolCall.from_fields(call, f"{name}.tool_calls[{i}]") for i, call in enumerate(calls))
    return ChatMessage(role, content, value.get("name"), tool_calls, value.get("tool_call_id"))


def _top_k(value: int) -> int:
    return 0 if value == -1 else value  # -1: off, as vLLM spells it
