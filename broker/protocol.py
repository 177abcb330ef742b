"""The tokenbus wire protocol: the only code that turns messages into frames and back.

Every message a DEALER peer (client or worker) sends or receives is four frames:

    [signature, command, request_id, body]

`signature` is ``PROTOCOL_SIGNATURE``, `command` an ASCII command name, `request_id`
empty or 16 bytes, `body` a msgpack map. The broker's ROUTER socket sees one more
frame in front: the peer's routing identity. docs/protocol.md describes every command.
"""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass, field
from typing import Any

import msgpack

PROTOCOL_SIGNATURE = b"TBUS1"
REQUEST_ID_SIZE = 16
MAX_MESSAGE_SIZE = 1 << 20  # bytes of a body; sockets drop peers that send a frame over twice this
HEARTBEAT_INTERVAL = 1.0  # seconds
HEARTBEAT_LIVENESS = 3  # intervals of silence after which a peer is dead
CLIENT_TIMEOUT = 10.0  # seconds of silence after which a heartbeating client is gone (lenient: a busy
                       # frontend's event loop may lag, and a false alarm would cancel its requests)
MAX_STOP_STRINGS = 4
MAX_STOP_TOKEN_IDS = 64
MAX_TIMEOUT = 86400.0  # seconds: the longest `timeout` a request may ask for
MAX_TOP_LOGPROBS = 20
MAX_COUNT = 2**31 - 1  # largest max_tokens and top_k
MAX_ERROR_MESSAGE = 2000  # characters of an ERROR's message; longer ones are cut
SEED_RANGE = (-(2**63), 2**63 - 1)  # a signed 64-bit integer
MAX_EMBED_INPUTS = 128  # inputs of one EMBED; its answer (inputs x dimensions x 4 bytes) must fit in a body
CONSTRAINT_TYPES = ("json_object", "json_schema")
TOOL_CHOICES = ("auto", "required")  # auto: a reply or calls; required: calls only
MAX_TOOLS = 128
CHAT_ROLES = ("system", "user", "assistant", "tool")


class Command(str, enum.Enum):
    """Command names, the second frame of every message."""

    # client -> broker
    REQUEST = "REQUEST"
    EMBED = "EMBED"
    TOKENIZE = "TOKENIZE"
    CANCEL = "CANCEL"
    LIST_MODELS = "LIST_MODELS"
    LIST_WORKERS = "LIST_WORKERS"
    # broker -> client
    TOKEN = "TOKEN"
    DONE = "DONE"
    EMBEDDINGS = "EMBEDDINGS"
    TOKENS = "TOKENS"
    ERROR = "ERROR"
    MODELS = "MODELS"
    WORKERS = "WORKERS"
    # worker <-> broker
    READY = "READY"
    REANNOUNCE = "REANNOUNCE"
    DRAIN = "DRAIN"  # the worker is stopping: no new requests; it finishes those it holds, then DISCONNECTs
    DISCONNECT = "DISCONNECT"
    # everyone
    HEARTBEAT = "HEARTBEAT"


class ErrorCode(str, enum.Enum):
    """Codes carried by ERROR messages."""

    BAD_REQUEST = "bad_request"
    UNKNOWN_MODEL = "unknown_model"
    NO_WORKER = "no_worker"
    OVERLOADED = "overloaded"
    QUEUE_TIMEOUT = "queue_timeout"
    CONTEXT_LENGTH_EXCEEDED = "context_length_exceeded"
    WORKER_LOST = "worker_lost"
    UNKNOWN_REQUEST = "unknown_request"
    DUPLICATE_REQUEST = "duplicate_request"
    FORBIDDEN = "forbidden"
    INTERNAL = "internal_error"
    DEADLINE_EXCEEDED = "deadline_exceeded"


class Task(str, enum.Enum):
    """What a worker's model does: the request kind it serves."""

    GENERATE = "generate"  # REQUEST: text, streamed as TOKENs
    EMBED = "embed"  # EMBED: vectors, in one EMBEDDINGS


# TOKENIZE goes to a generating worker: it holds the tokenizer and chat template that a REQUEST would use.
TASK_OF_COMMAND = {Command.REQUEST: Task.GENERATE, Command.EMBED: Task.EMBED, Command.TOKENIZE: Task.GENERATE}


class FinishReason(str, enum.Enum):
    STOP = "stop"
    LENGTH = "length"
    CANCELLED = "cancelled"
    TOOL_CALLS = "tool_calls"  # the answer ended with tool calls
    DEADLINE = "deadline"  # its `timeout` ran out while it was generating: the answer so far


class ProtocolError(ValueError):
    """A message or field that breaks the protocol. `field` names the offending field."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


# ---------------------------------------------------------------------------
# Frames


@dataclass(frozen=True, slots=True)
class Message:
    """One protocol message. `body` is a msgpack map kept packed until read."""

    command: Command
    request_id: bytes = b""
    body: bytes = b"\x80"  # msgpack for {}

    def fields(self) -> dict[str, Any]:
        return unpack_body(self.body)


def encode(command: Command, request_id: bytes = b"", body: dict[str, Any] | bytes | None = None) -> list[bytes]:
    """Frames for one message; `body` may already be packed (forwarded verbatim)."""
    if body is None:
        packed = b"\x80"
    elif isinstance(body, bytes):
        packed = body
    else:
        packed = msgpack.packb(body, use_bin_type=True)
    if len(packed) > MAX_MESSAGE_SIZE:  # checked here too: sent, it would cost the sender its connection
        raise ProtocolError(f"body too large: {len(packed)} bytes packed, the limit is {MAX_MESSAGE_SIZE}")
    return [PROTOCOL_SIGNATURE, command.value.encode(), request_id, packed]


def decode(frames: list[bytes]) -> Message:
    """Parse the four frames of a message; raises ProtocolError on anything malformed."""
    if len(frames) != 4:
        raise ProtocolError(f"expected 4 frames, got {len(frames)}")
    signature, command, request_id, body = frames
    if signature != PROTOCOL_SIGNATURE:
        raise ProtocolError(f"unsupported protocol signature {signature[:16]!r}")
    try:
        cmd = Command(command.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        raise ProtocolError(f"unknown command {command[:32]!r}") from None
    if len(request_id) not in (0, REQUEST_ID_SIZE):
        raise ProtocolError(f"request id must be empty or {REQUEST_ID_SIZE} bytes")
    if len(body) > MAX_MESSAGE_SIZE:
        raise ProtocolError("body too large")
    return Message(cmd, request_id, body)


def unpack_body(body: bytes) -> dict[str, Any]:
    try:
        value = msgpack.unpackb(body, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types on garbage
        raise ProtocolError(f"body is not valid msgpack: {exc}") from None
    if not isinstance(value, dict):
        raise ProtocolError("body must be a msgpack map")
    return value


# ---------------------------------------------------------------------------
# Field checks, shared by every typed body below


def _get(fields: dict, name: str, kind: type | tuple, default: Any = None, required: bool = False) -> Any:
    value = fields.get(name, default)
    if value is None:
        if required:
            raise ProtocolError(f"'{name}' is required", name)
        return default
    kinds = kind if isinstance(kind, tuple) else (kind,)
    # bool is an int in Python; never accept it where a number is meant
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        raise ProtocolError(f"'{name}' must be {_kind_name(kinds)}", name)
    return value


def _kind_name(kinds: tuple) -> str:
    names = {int: "an integer", float: "a number", str: "a string", bool: "a boolean", list: "an array", dict: "a map"}
    return " or ".join(dict.fromkeys(names.get(k, k.__name__) for k in kinds))


def _number(fields: dict, name: str, default: float) -> float:
    try:
        return float(_get(fields, name, (int, float), default))
    except OverflowError:  # an integer too large for a float
        raise ProtocolError(f"'{name}' is out of range", name) from None


def _quote(value: Any) -> str:
    """A caller's value inside an error message, cut short: an answer must never outgrow its question."""
    text = repr(value)
    return text if len(text) <= 64 else text[:60] + "..."


def _check_range(name: str, value: float, low: float, high: float) -> None:
    if not low <= value <= high:  # also rejects NaN
        raise ProtocolError(f"'{name}' must be between {low} and {high}, got {value}", name)


# ---------------------------------------------------------------------------
# Typed bodies


@dataclass(frozen=True, slots=True)
class ToolCall:
    """A call an assistant made: its id, the function's name and the arguments as JSON text."""

    id: str
    name: str
    arguments: str

    def to_fields(self) -> dict[str, str]:
        return {"id": self.id, "name": self.name, "arguments": self.arguments}

    @classmethod
    def from_fields(cls, value: Any, name: str) -> ToolCall:
        if not isinstance(value, dict):
            raise ProtocolError(f"'{name}' must be a map with 'id', 'name' and 'arguments'", name)
        fields = []
        for key in ("id", "name", "arguments"):
            if not isinstance(value.get(key), str):
                raise ProtocolError(f"'{name}.{key}' must be a string", f"{name}.{key}")
            fields.append(value[key])
        return cls(*fields)


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
class Function:
    """A tool the model may call: its name, what it does, and a JSON schema of its arguments."""

    name: str
    parameters: dict[str, Any]
    description: str | None = None

    def to_fields(self) -> dict[str, Any]:
        fields: dict[str, Any] = {"name": self.name, "parameters": self.parameters}
        if self.description is not None:
            fields["description"] = self.description
        return fields


@dataclass(frozen=True, slots=True)
class Tools:
    """The tools a request offers, and how the answer may use them.

    `choice` auto: a text reply or calls; required: calls only. `function` names the one function
    every call must be (it implies required). `parallel`: more than one call in an answer."""

    functions: tuple[Function, ...]
    choice: str = "auto"
    function: str | None = None
    parallel: bool = True

    def __post_init__(self) -> None:
        if not self.functions or len(self.functions) > MAX_TOOLS:
            raise ProtocolError(f"'tools.functions' takes 1 to {MAX_TOOLS} functions", "tools.functions")
        names = [f.name for f in self.functions]
        if len(set(names)) != len(names):
            raise ProtocolError("each of 'tools.functions' must have its own name", "tools.functions")
        if self.choice not in TOOL_CHOICES:
            raise ProtocolError(f"'tools.choice' must be one of {', '.join(TOOL_CHOICES)}, got {_quote(self.choice)}",
                                "tools.choice")
        if self.function is not None and self.function not in names:
            raise ProtocolError(f"'tools.function' names no function: {_quote(self.function)}", "tools.function")
        for function in self.functions:
            _canonical_json(function.parameters, "tools.functions")

    @property
    def calls_required(self) -> bool:
        return self.choice == "required" or self.function is not None

    @property
    def callable(self) -> tuple[Function, ...]:
        """The functions an answer may call."""
        return tuple(f for f in self.functions if self.function in (None, f.name))

    @property
    def key(self) -> str:
        """Equal tools give equal keys (compiled grammars are cached by it)."""
        return _canonical_json(self.to_fields(), "tools")

    def to_fields(self) -> dict[str, Any]:
        fields: dict[str, Any] = {"functions": [f.to_fields() for f in self.functions], "choice": self.choice,
                                  "parallel": self.parallel}
        if self.function is not None:
            fields["function"] = self.function
        return fields

    @classmethod
    def from_fields(cls, value: Any) -> Tools:
        if not isinstance(value, dict):
            raise ProtocolError("'tools' must be a map", "tools")
        unknown = sorted(map(str, set(value) - {"functions", "choice", "function", "parallel"}))
        if unknown:
            raise ProtocolError(f"unknown field 'tools.{unknown[0][:64]}'", "tools")
        functions = value.get("functions")
        if not isinstance(functions, list):
            raise ProtocolError("'tools.functions' must be an array", "tools.functions")
        choice, function, parallel = value.get("choice", "auto"), value.get("function"), value.get("parallel", True)
        if not isinstance(choice, str):
            raise ProtocolError("'tools.choice' must be a string", "tools.choice")
        if function is not None and not isinstance(function, str):
            raise ProtocolError("'tools.function' must be a string", "tools.function")
        if not isinstance(parallel, bool):
            raise ProtocolError("'tools.parallel' must be a boolean", "tools.parallel")
        return cls(tuple(_function(index, f) for index, f in enumerate(functions)), choice, function, parallel)


def _function(index: int, value: Any) -> Function:
    name = f"tools.functions[{index}]"
    if not isinstance(value, dict):
        raise ProtocolError(f"'{name}' must be a map with 'name' and 'parameters'", name)
    unknown = sorted(map(str, set(value) - {"name", "parameters", "description"}))
    if unknown:
        raise ProtocolError(f"unknown field '{name}.{unknown[0][:64]}'", name)
    if not isinstance(value.get("name"), str) or not value["name"]:
        raise ProtocolError(f"'{name}.name' must be a non-empty string", f"{name}.name")
    if not isinstance(value.get("parameters"), dict):
        raise ProtocolError(f"'{name}.parameters' must be a JSON schema map", f"{name}.parameters")
    description = value.get("description")
    if description is not None and not isinstance(description, str):
        raise ProtocolError(f"'{name}.description' must be a string", f"{name}.description")
    return Function(value["name"], value["parameters"], description)


@dataclass(frozen=True, slots=True)
class Constraint:
    """What a constrained output must be: any JSON object, or JSON valid against `schema`.

    Its fields are plain msgpack values, so a schema reaches the worker as sent."""

    type: str
    schema: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.type not in CONSTRAINT_TYPES:
            raise ProtocolError(f"'constraint.type' must be one of {', '.join(CONSTRAINT_TYPES)}, got "
                                f"{_quote(self.type)}", "constraint.type")
        if (self.type == "json_schema") != (self.schema is not None):
            raise ProtocolError("'constraint.schema' is required with type json_schema, and only then",
                                "constraint.schema")
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
            raise ProtocolError("'constraint' must be a map", "constraint")
        unknown = sorted(map(str, set(value) - {"type", "schema"}))
        if unknown:
            raise ProtocolError(f"unknown field 'constraint.{unknown[0][:64]}'", "constraint")
        try:
            return cls(_get(value, "type", str, required=True), _get(value, "schema", dict))
        except ProtocolError as exc:
            if exc.field not in ("type", "schema"):
                raise
            name = f"constraint.{exc.field}"  # the name as the caller knows it
            raise ProtocolError(str(exc).replace(f"'{exc.field}'", f"'{name}'"), name) from None


def _canonical_json(value: Any, field: str) -> str:
    import json  # only for keys; the wire stays msgpack

    try:
        return json.dumps(value, sort_keys=True, separators=(",", ":"))
    except (TypeError, ValueError) as exc:  # bin values or non-string keys: no JSON schema has them
        raise ProtocolError(f"'{field}' is not JSON: {exc}", field) from None


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
            raise ProtocolError("'model' must be a non-empty string", "model")
        if (self.messages is None) == (self.prompt is None):
            raise ProtocolError("exactly one of 'messages' or 'prompt' is required", "messages")
        if self.messages is not None and not self.messages:
            raise ProtocolError("'messages' must not be empty", "messages")
        if self.max_tokens is not None:
            _check_range("max_tokens", self.max_tokens, 1, MAX_COUNT)
        _check_range("temperature", self.temperature, 0.0, 2.0)
        _check_range("top_p", self.top_p, 0.0, 1.0)
        if self.top_p == 0.0:
            raise ProtocolError("'top_p' must be greater than 0", "top_p")
        _check_range("top_k", self.top_k, 0, MAX_COUNT)  # 0: off
        if self.seed is not None:
            _check_range("seed", self.seed, *SEED_RANGE)
        if len(self.stop) > MAX_STOP_STRINGS or any(not s for s in self.stop):
            raise ProtocolError(f"'stop' takes at most {MAX_STOP_STRINGS} non-empty strings", "stop")
        _check_range("repetition_penalty", self.repetition_penalty, 0.01, 10.0)
        _check_range("presence_penalty", self.presence_penalty, -2.0, 2.0)
        _check_range("frequency_penalty", self.frequency_penalty, -2.0, 2.0)
        _check_range("top_logprobs", self.top_logprobs, 0, MAX_TOP_LOGPROBS)
        _check_range("min_p", self.min_p, 0.0, 1.0)
        _check_range("min_tokens", self.min_tokens, 0, MAX_COUNT)
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ProtocolError(f"'min_tokens' ({self.min_tokens}) must not exceed 'max_tokens' ({self.max_tokens})",
                                "min_tokens")
        if len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS or not all(map(is_token_id, self.stop_token_ids)):
            raise ProtocolError(f"'stop_token_ids' takes at most {MAX_STOP_TOKEN_IDS} token ids (integers 0 to "
                                "2^31-1)", "stop_token_ids")
        _check_range("priority", self.priority, -MAX_COUNT - 1, MAX_COUNT)
        if self.timeout is not None and not 0 < self.timeout <= MAX_TIMEOUT:
            raise ProtocolError(f"'timeout' must be a number of seconds above 0 and at most {MAX_TIMEOUT:.0f}",
                                "timeout")
        if not all(map(is_token_id, self.resume_ids)):
            raise ProtocolError("'resume_ids' must be an array of token ids (integers 0 to 2^31-1)", "resume_ids")
        if self.max_tokens is not None and len(self.resume_ids) > self.max_tokens:
            raise ProtocolError("'resume_ids' must not be longer than 'max_tokens'", "resume_ids")
        if self.constraint is not None and self.stop:  # a stop string could cut the output short of valid
            raise ProtocolError("'stop' cannot be combined with 'constraint'", "stop")
        if self.tools is not None:
            if self.messages is None:
                raise ProtocolError("'tools' needs 'messages'", "tools")
            if self.constraint is not None:
                raise ProtocolError("'tools' cannot be combined with 'constraint'", "tools")
            if self.stop:
                raise ProtocolError("'stop' cannot be combined with 'tools'", "stop")

    @classmethod
    def from_fields(cls, fields: dict[str, Any]) -> GenerationRequest:
        unknown = sorted(map(str, set(fields) - set(cls.__slots__)))
        if unknown:
            raise ProtocolError(f"unknown field {_quote(unknown[0])}", unknown[0][:64])
        messages = _get(fields, "messages", list)
        if messages is not None:
            messages = tuple(_chat_message(index, m) for index, m in enumerate(messages))
        stop = _get(fields, "stop", list, [])
        if not all(isinstance(s, str) for s in stop):
            raise ProtocolError("'stop' must be an array of strings", "stop")
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
            tools=None if fields.get("tools") is None else Tools.from_fields(fields["tools"]),
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
        raise ProtocolError(f"'{name}' must be a map with 'role' and 'content'", name)
    role, content = value.get("role"), value.get("content")
    if role not in CHAT_ROLES:
        raise ProtocolError(f"'{name}.role' must be one of {', '.join(CHAT_ROLES)}, got {_quote(role)}",
                            f"{name}.role")
    if not isinstance(content, str):
        raise ProtocolError(f"'{name}.content' must be a string", f"{name}.content")
    for key in ("name", "tool_call_id"):
        if value.get(key) is not None and not isinstance(value[key], str):
            raise ProtocolError(f"'{name}.{key}' must be a string", f"{name}.{key}")
    calls = value.get("tool_calls") or []
    if not isinstance(calls, list) or (calls and role != "assistant"):
        raise ProtocolError(f"'{name}.tool_calls' must be an array, in an assistant message", f"{name}.tool_calls")
    tool_calls = tuple(ToolCall.from_fields(call, f"{name}.tool_calls[{i}]") for i, call in enumerate(calls))
    return ChatMessage(role, content, value.get("name"), tool_calls, value.get("tool_call_id"))


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
            raise ProtocolError("'token_ids' must be an array of token ids", "token_ids")
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

    def to_fields(self) -> dict[str, Any]:
        return {"code": self.code.value, "message": self.message[:MAX_ERROR_MESSAGE]}

    @classmethod
    def from_fields(cls, fields: dict[str, Any]) -> Error:
        raw = _get(fields, "code", str, ErrorCode.INTERNAL.value)
        try:
            code = ErrorCode(raw)
        except ValueError:
            code = ErrorCode.INTERNAL
        return cls(code, _get(fields, "message", str, raw))


def _top_k(value: int) -> int:
    return 0 if value == -1 else value  # -1: off, as vLLM spells it


@dataclass(frozen=True, slots=True)
class Ready:
    """Body of READY: a worker's announcement."""

    worker_id: str
    models: tuple[str, ...]
    capacity: int
    context_length: int = 0
    cache_tokens: int = 0  # the KV cache budget: rows x their longest prompt + max_tokens (0: unknown)
    prefix_cache_tokens: int = 0  # tokens of finished requests' KV it keeps for prompts that start alike (0: none)
    tasks: tuple[Task, ...] = (Task.GENERATE,)  # a worker that does not say generates

    def __post_init__(self) -> None:
        if not self.models or not all(isinstance(m, str) and m for m in self.models):
            raise ProtocolError("'models' must be a non-empty array of names", "models")
        if self.capacity < 1:
            raise ProtocolError("'capacity' must be at least 1", "capacity")
        if not self.tasks:
            raise ProtocolError("'tasks' must not be empty", "tasks")

    def to_fields(self) -> dict[str, Any]:
        return {
            "worker_id": self.worker_id,
            "models": list(self.models),
            "capacity": self.capacity,
            "context_length": self.context_length,
            "cache_tokens": self.cache_tokens,
            "prefix_cache_tokens": self.prefix_cache_tokens,
            "tasks": [task.value for task in self.tasks],
        }

    @classmethod
    def from_fields(cls, fields: dict[str, Any]) -> Ready:
        return cls(
            _get(fields, "worker_id", str, required=True),
            tuple(_get(fields, "models", list, required=True)),
            _get(fields, "capacity", int, required=True),
            _get(fields, "context_length", int, 0),
            _get(fields, "cache_tokens", int, 0),
            _get(fields, "prefix_cache_tokens", int, 0),
            _tasks(_get(fields, "tasks", list, [Task.GENERATE.value])),
        )


def _tasks(values: list) -> tuple[Task, ...]:
    try:
        return tuple(dict.fromkeys(Task(v) for v in values))
    except (ValueError, TypeError):
        known = ", ".join(t.value for t in Task)
        raise ProtocolError(f"'tasks' must be an array of task names ({known})", "tasks") from None


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """One entry of MODELS: a model name with the live workers that serve it."""

    name: str
    workers: int
    capacity: int
    in_flight: int
    queued: int
    context_length: int
    tasks: tuple[str, ...] = (Task.GENERATE.value,)  # what the model's workers do, together

    @property
    def can_chat(self) -> bool:
        return Task.GENERATE.value in self.tasks


@dataclass(frozen=True, slots=True)
class WorkerInfo:
    """One entry of WORKERS."""

    worker_id: str
    models: tuple[str, ...]
    capacity: int
    in_flight: int
    idle_seconds: float
    served: int = 0
    cache_tokens: int = 0
    tasks: tuple[str, ...] = (Task.GENERATE.value,)
    draining: bool = False  # it sent DRAIN: it gets no new requests and leaves once its own are done


def model_list_fields(models: list[ModelInfo]) -> dict[str, Any]:
    return {"models": [dict(asdict(m), tasks=list(m.tasks)) for m in models]}


def _known_fields(kind: type, entry: Any) -> dict[str, Any]:
    """The fields of `kind` in a list entry; fields added by a newer broker are ignored."""
    if not isinstance(entry, dict):
        raise ProtocolError(f"each {kind.__name__} entry must be a map")
    return {name: entry[name] for name in kind.__dataclass_fields__ if name in entry}


def parse_model_list(fields: dict[str, Any]) -> list[ModelInfo]:
    try:
        return [ModelInfo(**_with_tasks(_known_fields(ModelInfo, m))) for m in _get(fields, "models", list, [])]
    except TypeError as exc:
        raise ProtocolError(f"malformed MODELS entry: {exc}", "models") from None


def worker_list_fields(workers: list[WorkerInfo]) -> dict[str, Any]:
    return {"workers": [dict(asdict(w), models=list(w.models), tasks=list(w.tasks)) for w in workers]}


def _with_tasks(entry: dict[str, Any]) -> dict[str, Any]:
    """An entry's tasks as a tuple of names (an older broker sends none: it knew only generation)."""
    if "tasks" in entry:
        entry["tasks"] = tuple(map(str, entry["tasks"]))
    return entry


def parse_worker_list(fields: dict[str, Any]) -> list[WorkerInfo]:
    try:
        return [WorkerInfo(**_with_tasks(dict(_known_fields(WorkerInfo, w), models=tuple(w["models"]))))
                for w in _get(fields, "workers", list, [])]
    except (TypeError, KeyError) as exc:
        raise ProtocolError(f"malformed WORKERS entry: {exc}", "workers") from None


@dataclass(frozen=True, slots=True)
class ClientHeartbeat:
    """Body of a client's HEARTBEAT: the requests it still waits on."""

    request_ids: tuple[bytes, ...] = field(default_factory=tuple)

    def to_fields(self) -> dict[str, Any]:
        return {"request_ids": list(self.request_ids)}

    @classmethod
    def from_fields(cls, fields: dict[str, Any]) -> ClientHeartbeat:
        ids = _get(fields, "request_ids", list, [])
        if not all(isinstance(i, bytes) and len(i) == REQUEST_ID_SIZE for i in ids):
            raise ProtocolError("'request_ids' must be an array of 16-byte binaries", "request_ids")
        return cls(tuple(ids))


# ---------------------------------------------------------------------------
# Embeddings: EMBED (client -> broker -> worker), answered by one EMBEDDINGS


@dataclass(frozen=True, slots=True)
class EmbeddingRequest:
    """Body of EMBED: texts, or token-id lists, to turn into vectors in one answer."""

    model: str
    inputs: tuple[str, ...] | tuple[tuple[int, ...], ...]
    dimensions: int | None = None  # shorter vectors, for a model that can give them

    def __post_init__(self) -> None:
        if not self.model:
            raise ProtocolError("'model' must be a non-empty string", "model")
        if not 1 <= len(self.inputs) <= MAX_EMBED_INPUTS:
            raise ProtocolError(f"'input' must hold 1 to {MAX_EMBED_INPUTS} entries", "input")
        for index, item in enumerate(self.inputs):
            if not item:  # an empty text or token list means nothing; OpenAI refuses it too
                raise ProtocolError(f"'input[{index}]' must not be empty", "input")
        if self.dimensions is not None:
            _check_range("dimensions", self.dimensions, 1, MAX_COUNT)

    @property
    def token_input(self) -> bool:
        return not isinstance(self.inputs[0], str)

    @classmethod
    def from_fields(cls, fields: dict[str, Any]) -> EmbeddingRequest:
        unknown = sorted(map(str, set(fields) - {"model", "input", "dimensions"}))
        if unknown:
            raise ProtocolError(f"unknown field {_quote(unknown[0])}", unknown[0][:64])
        raw = _get(fields, "input", list, required=True)
        if all(isinstance(item, str) for item in raw):
            inputs: tuple = tuple(raw)
        elif all(isinstance(item, list) and all(is_token_id(t) for t in item) for item in raw):
            inputs = tuple(tuple(item) for item in raw)
        else:
            raise ProtocolError("'input' must be an array of strings or an array of arrays of token ids "
                                "(integers 0 to 2^31-1)", "input")
        return cls(_get(fields, "model", str, required=True), inputs, _get(fields, "dimensions", int))

    def to_fields(self) -> dict[str, Any]:
        fields: dict[str, Any] = {"model": self.model, "input": [i if isinstance(i, str) else list(i)
                                                                  for i in self.inputs]}
        if self.dimensions is not None:
            fields["dimensions"] = self.dimensions
        return fields


def is_token_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_COUNT


# ---------------------------------------------------------------------------
# Tokens: TOKENIZE (client -> broker -> worker), answered by one TOKENS


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
            raise ProtocolError("'model' must be a non-empty string", "model")
        if sum(x is not None for x in (self.prompt, self.messages, self.tokens)) != 1:
            raise ProtocolError("exactly one of 'prompt', 'messages' or 'tokens' is required", "prompt")
        if self.messages is not None and not self.messages:
            raise ProtocolError("'messages' must not be empty", "messages")
        if self.tools is not None and self.messages is None:
            raise ProtocolError("'tools' needs 'messages'", "tools")
        if self.tokens is not None and not all(map(is_token_id, self.tokens)):
            raise ProtocolError("'tokens' must be an array of token ids (integers 0 to 2^31-1)", "tokens")

    @classmethod
    def from_fields(cls, fields: dict[str, Any]) -> TokenizeRequest:
        unknown = sorted(map(str, set(fields) - set(cls.__slots__)))
        if unknown:
            raise ProtocolError(f"unknown field {_quote(unknown[0])}", unknown[0][:64])
        messages = _get(fields, "messages", list)
        tokens = _get(fields, "tokens", list)
        return cls(
            model=_get(fields, "model", str, required=True),
            prompt=_get(fields, "prompt", str),
            messages=None if messages is None else tuple(_chat_message(i, m) for i, m in enumerate(messages)),
            tools=None if fields.get("tools") is None else Tools.from_fields(fields["tools"]),
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
            raise ProtocolError("'tokens' must be an array of token ids", "tokens")
        return cls(tuple(tokens), _get(fields, "text", str, ""), _get(fields, "max_model_len", int, required=True))


# the body of each request kind
REQUEST_BODIES = {Command.REQUEST: GenerationRequest, Command.EMBED: EmbeddingRequest,
                  Command.TOKENIZE: TokenizeRequest}


@dataclass(frozen=True, slots=True)
class Embeddings:
    """Body of EMBEDDINGS: one vector per input, in order, each `dimensions` little-endian float32
    values packed as msgpack bin, with the tokens each input took."""

    vectors: tuple[bytes, ...]
    dimensions: int
    token_counts: tuple[int, ...]

    @property
    def prompt_tokens(self) -> int:
        return sum(self.token_counts)

    def to_fields(self) -> dict[str, Any]:
        return {"embeddings": list(self.vectors), "dimensions": self.dimensions,
                "token_counts": list(self.token_counts)}

    @classmethod
    def from_fields(cls, fields: dict[str, Any]) -> Embeddings:
        vectors = _get(fields, "embeddings", list, required=True)
        dimensions = _get(fields, "dimensions", int, required=True)
        counts = _get(fields, "token_counts", list, required=True)
        if not all(isinstance(v, bytes) and len(v) == 4 * dimensions for v in vectors):
            raise ProtocolError(f"each embedding must be {dimensions} float32 values as bin", "embeddings")
        if len(counts) != len(vectors) or not all(isinstance(c, int) and not isinstance(c, bool) for c in counts):
            raise ProtocolError("'token_counts' must hold one integer per embedding", "token_counts")
        return cls(tuple(vectors), dimensions, tuple(counts))
