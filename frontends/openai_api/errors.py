"""API errors: one exception type, and the table from bus errors to HTTP statuses."""

from __future__ import annotations

from collections.abc import Mapping

from broker.protocol import ErrorCode, ProtocolError
from frontends.client import BusError

# Bus fields that OpenAI's chat and completion bodies spell otherwise (errors a worker finds name them);
# the tools' own fields are all `tools` to the API.
CHAT_FIELD_NAMES = {"constraint": "response_format", "tools": "tools"}

# status, OpenAI error type, OpenAI error code
_BUS_ERRORS: dict[ErrorCode, tuple[int, str, str | None]] = {
    ErrorCode.BAD_REQUEST: (400, "invalid_request_error", None),
    ErrorCode.CONTEXT_LENGTH_EXCEEDED: (400, "invalid_request_error", "context_length_exceeded"),
    ErrorCode.UNKNOWN_MODEL: (404, "invalid_request_error", "model_not_found"),
    ErrorCode.OVERLOADED: (429, "rate_limit_error", "overloaded"),
    ErrorCode.QUEUE_TIMEOUT: (429, "rate_limit_error", "queue_timeout"),
    ErrorCode.NO_WORKER: (503, "service_unavailable", "no_worker"),
    ErrorCode.UNKNOWN_REQUEST: (503, "service_unavailable", "broker_unreachable"),
    ErrorCode.WORKER_LOST: (503, "service_unavailable", "worker_lost"),
    ErrorCode.DEADLINE_EXCEEDED: (504, "timeout", "deadline_exceeded"),
    ErrorCode.DUPLICATE_REQUEST: (500, "server_error", None),
    ErrorCode.INTERNAL: (500, "server_error", None),
}


class ApiError(Exception):
    """An error answered as the OpenAI error object."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.retry_after = retry_after  # seconds, sent as the Retry-After header

    @classmethod
    def from_bus(cls, error: BusError, input_param: str | None = None,
                 field_names: Mapping[str, str] = CHAT_FIELD_NAMES) -> ApiError:
        """`input_param`: the body field with the input ("messages" or "prompt"), named when it is too
        long. `field_names`: the API's names for bus fields that it spells otherwise."""
        status, kind, code = _BUS_ERRORS.get(error.code, (500, "server_error", None))
        if error.code in (ErrorCode.UNKNOWN_MODEL, ErrorCode.NO_WORKER):
            param = "model"
        elif error.code is ErrorCode.CONTEXT_LENGTH_EXCEEDED:
            param = input_param
        else:
            param = api_field(error.field, field_names)
        return cls(status, error.message, type=kind, param=param, code=code)


def api_field(path: str | None, names: Mapping[str, str]) -> str | None:
    """A bus field path (`constraint.schema`) as the API names it (`response_format`): its first part
    renamed, the rest dropped where the API's field has another shape."""
    if path is None:
        return None
    head = path.split(".", 1)[0].split("[", 1)[0]
    return names.get(head, path)


def in_api_terms(error: ProtocolError, names: Mapping[str, str]) -> ProtocolError:
    """A bus request's error as the API words it: its field named by `names`, in its message too."""
    return error if error.field is None else error.renamed(api_field(error.field, names))


def bad_request(message: str, param: str | None = None, code: str | None = "invalid_value") -> ApiError:
    return ApiError(400, message, param=param, code=code)
