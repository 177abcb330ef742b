"""The tokenbus wire protocol: the only code that turns messages into frames and back.

Every message a DEALER peer (client or worker) sends or receives is four frames:

    [signature, command, request_id, body]

`signature` is ``PROTOCOL_SIGNATURE``, `command` an ASCII command name, `request_id`
empty or 16 bytes, `body` a msgpack map. The broker's ROUTER socket sees one more
frame in front: the peer's routing identity. docs/protocol.md describes every command.
"""

from __future__ import annotations

from broker.protocol.frames import (
    CLIENT_TIMEOUT,
    Command,
    ErrorCode,
    FinishReason,
    HEARTBEAT_INTERVAL,
    HEARTBEAT_LIVENESS,
    MAX_ERROR_MESSAGE,
    MAX_MESSAGE_SIZE,
    Message,
    PROTOCOL_SIGNATURE,
    ProtocolError,
    REQUEST_ID_SIZE,
    TASK_OF_COMMAND,
    Task,
    decode,
    encode,
    pack_body,
    unpack_body,
)
from broker.protocol.fields import (
    MAX_COUNT,
    is_token_id,
)
from broker.protocol.tools import (
    Function,
    MAX_TOOLS,
    TOOL_CHOICES,
    ToolCall,
    Tools,
)
from broker.protocol.generation import (
    CHAT_ROLES,
    CONSTRAINT_TYPES,
    ChatMessage,
    Constraint,
    GenerationRequest,
    MAX_STOP_STRINGS,
    MAX_STOP_TOKEN_IDS,
    MAX_TIMEOUT,
    MAX_TOP_LOGPROBS,
    TEMPERATURE_RANGE,
    SEED_RANGE,
)
from broker.protocol.stream import (
    Done,
    Error,
    TokenDelta,
    TokenLogprob,
    ToolCallDelta,
)
from broker.protocol.status import (
    ClientHeartbeat,
    ModelInfo,
    Ready,
    WorkerInfo,
    model_list_fields,
    parse_model_list,
    parse_worker_list,
    worker_list_fields,
)
from broker.protocol.embeddings import (
    EmbeddingRequest,
    Embeddings,
    MAX_EMBED_INPUTS,
)
from broker.protocol.tokens import (
    TokenizeRequest,
    Tokens,
)

# the body of each request kind
REQUEST_BODIES = {Command.REQUEST: GenerationRequest, Command.EMBED: EmbeddingRequest,
                  Command.TOKENIZE: TokenizeRequest}

__all__ = [
    "CHAT_ROLES", "CLIENT_TIMEOUT", "CONSTRAINT_TYPES", "ChatMessage", "ClientHeartbeat", "Command",
    "Constraint", "Done", "EmbeddingRequest", "Embeddings", "Error", "ErrorCode", "FinishReason", "Function",
    "GenerationRequest", "HEARTBEAT_INTERVAL", "HEARTBEAT_LIVENESS", "MAX_COUNT", "MAX_EMBED_INPUTS",
    "MAX_ERROR_MESSAGE", "MAX_MESSAGE_SIZE", "MAX_STOP_STRINGS", "MAX_STOP_TOKEN_IDS", "MAX_TIMEOUT",
    "MAX_TOOLS", "MAX_TOP_LOGPROBS", "TEMPERATURE_RANGE", "Message", "ModelInfo", "PROTOCOL_SIGNATURE", "ProtocolError",
    "REQUEST_BODIES", "REQUEST_ID_SIZE", "Ready", "SEED_RANGE", "TASK_OF_COMMAND", "TOOL_CHOICES", "Task",
    "TokenDelta", "TokenLogprob", "TokenizeRequest", "Tokens", "ToolCall", "ToolCallDelta", "Tools",
    "WorkerInfo", "decode", "encode", "is_token_id", "model_list_fields", "pack_body", "parse_model_list",
    "parse_worker_list", "unpack_body", "worker_list_fields",
]
