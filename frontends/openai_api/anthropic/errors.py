"""API errors as Anthropic's clients expect them: its error object, and its statuses."""

from __future__ import annotations

from typing import Any

from frontends.openai_api.errors import ApiError

# The server's status -> the status and error type Anthropic answers with. Anthropic has no 503:
# a model with no live worker (or no broker) is its 529, overloaded.
_STATUSES: dict[int, tuple[int, str]] = {
    400: (400, "invalid_request_error"),
    401: (401, "authentication_error"),
    403: (403, "permission_error"),
    404: (404, "not_found_error"),
    405: (405, "invalid_request_error"),
    413: (413, "request_too_large"),
    429: (429, "rate_limit_error"),
    503: (529, "overloaded_error"),
}


def error_status(error: ApiError) -> int:
    return _STATUSES.get(error.status, (error.status, ""))[0]


def error_object(error: ApiError) -> dict[str, Any]:
    """`{"type": "error", "error": {...}}`, as a response body or the data of a stream's `error` event."""
    kind = _STATUSES.get(error.status, (0, "api_error" if error.status >= 500 else "invalid_request_error"))[1]
    message = error.message
    if error.param and not message.startswith(f"{error.param}:"):  # Anthropic's messages start with the field
        message = f"{error.param}: {message}"
    return {"type": "error", "error": {"type": kind, "message": message}}
