"""A JSON request body's top-level fields, read the same way by every API (OpenAI's, the Responses
API and Anthropic's); each passes its own field sets, and the error it answers an unknown field with."""

from __future__ import annotations

import json
from collections.abc import Callable, Collection, Mapping
from typing import Any

from frontends.openai_api.errors import ApiError, bad_request


def not_supported(name: str) -> ApiError:
    """OpenAI's answer to a field it does not know."""
    return bad_request(f"'{name}' is not supported by this server", name, "unsupported_parameter")


def object_body(body: Any, accepted: Collection[str], ignored: Collection[str],
                harmless: Mapping[str, Any] | None = None,
                unsupported: Callable[[str], ApiError] = not_supported) -> dict[str, Any]:
    """`body`'s fields, less those that are null (null means "not given"), `ignored`, or at their
    `harmless` value (any other value of a harmless field is refused). A 400 for a body that is not
    an object, and `unsupported(name)` for the first field left that is not `accepted`."""
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object", None, "invalid_json")
    fields = {k: v for k, v in body.items() if v is not None and k not in ignored}
    for name, value in (harmless or {}).items():
        if name in fields:
            if not (type(fields[name]) is type(value) and fields[name] == value):
                raise bad_request(f"'{name}' is supported only as {json.dumps(value)}", name, "unsupported_parameter")
            del fields[name]
    unknown = sorted(set(fields) - set(accepted))
    if unknown:
        raise unsupported(unknown[0])
    return fields
