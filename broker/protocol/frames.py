"""Frames and commands: the four frames of every message, the command and error names, and the
only code that turns messages into frames and back."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

import msgpack


PROTOCOL_SIGNATURE = b"TBUS1"
REQUEST_ID_SIZE = 16
MAX_MESSAGE_SIZE = 1 << 20  # bytes of a body; sockets drop peers that send a frame over twice this
HEARTBEAT_INTERVAL = 1.0  # seconds
HEARTBEAT_LIVENESS = 3  # intervals of silence after which a peer is dead
CLIENT_TIMEOUT = 10.0  # seconds of silence after which a heartbeating client is gone (lenient: a busy
                       # frontend's event loop may lag, and a false alarm would cancel its requests)
MAX_ERROR_MESSAGE = 2000  # characters of an ERROR's message; longer ones are cut


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
    """A message or field that breaks the protocol. `field` names the offending field.

    An error about one field is built from its name (`about`), so that a frontend which spells the
    field otherwise names it its own way (`renamed`) and never edits the text."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field
        self.problem: str | None = None  # set by `about`: the message after the field's name

    @classmethod
    def about(cls, field: str, problem: str) -> ProtocolError:
        """The error of one field, its name first: ``'top_p' must be greater than 0``."""
        error = cls(f"'{field}' {problem}", field)
        error.problem = problem
        return error

    def renamed(self, field: str) -> ProtocolError:
        """The same error about `field`, named so in the message too where the message was built from the name."""
        if self.problem is None:
            return ProtocolError(str(self), field)
        return ProtocolError.about(field, self.problem)


@dataclass(frozen=True, slots=True)
class Message:
    """One protocol message. `body` is a msgpack map kept packed until read."""

    command: Command
    request_id: bytes = b""
    body: bytes = b"\x80"  # msgpack for {}

    def fields(self) -> dict[str, Any]:
        return unpack_body(self.body)


def pack_body(body: dict[str, Any]) -> bytes:
    """A message body as it goes on the wire (for a body sent more than once, packed once)."""
    return _within_limit(msgpack.packb(body, use_bin_type=True))


def _within_limit(packed: bytes) -> bytes:
    if len(packed) > MAX_MESSAGE_SIZE:  # checked here too: sent, it would cost the sender its connection
        raise ProtocolError(f"body too large: {len(packed)} bytes packed, the limit is {MAX_MESSAGE_SIZE}")
    return packed


def encode(command: Command, request_id: bytes = b"", body: dict[str, Any] | bytes | None = None) -> list[bytes]:
    """Frames for one message; `body` may already be packed (forwarded verbatim)."""
    if body is None:
        packed = b"\x80"
    elif isinstance(body, bytes):
        packed = _within_limit(body)
    else:
        packed = pack_body(body)
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
