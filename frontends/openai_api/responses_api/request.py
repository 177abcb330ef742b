"""A `POST /v1/responses` body to the bus request, and the fields its response echoes.

Input items become the chat messages the bus carries; sampling ranges are checked by
`GenerationRequest`, tools and output formats by the chat endpoint's own parsers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from broker.protocol import GenerationRequest
from frontends.openai_api.body import object_body
from frontends.openai_api.errors import ApiError, bad_request
from frontends.openai_api.requests import format_constraint, generation_request
from frontends.openai_api.responses_api.store import ResponseStore
from frontends.openai_api.tools import parse_tools

ACCEPTED_FIELDS = frozenset({
    "model", "input", "instructions", "tools", "tool_choice", "parallel_tool_calls", "text", "max_output_tokens",
    "temperature", "top_p", "metadata", "stream", "store", "previous_response_id", "user",
})
# Accepted and dropped: bookkeeping on OpenAI's side, or asks for output this server never makes
# (reasoning: the models served here do not reason apart from their reply; include: the extra data
# it names, such as encrypted reasoning, does not exist here).
IGNORED_FIELDS = frozenset({
    "reasoning", "include", "service_tier", "prompt_cache_key", "prompt_cache_retention", "safety_identifier",
    "stream_options",
})
# Accepted only at the value that asks for nothing; any other value is refused.
HARMLESS_VALUES: dict[str, Any] = {"truncation": "disabled", "background": False, "top_logprobs": 0}
_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
_TEXT_PARTS = ("input_text", "output_text")
MAX_METADATA_KEYS = 16
# bus field -> Responses field, for the errors of the bus request and those a worker finds
FIELD_NAMES = {"constraint": "text.format", "max_tokens": "max_output_tokens", "tools": "tools"}


@dataclass(frozen=True, slots=True)
class ResponsesCall:
    """A parsed request: the bus request, the conversation to store, and the fields the response echoes."""

    request: GenerationRequest
    conversation: tuple[dict[str, Any], ...]  # bus messages without the instructions
    stream: bool
    store: bool
    echo: dict[str, Any]

    @property
    def model(self) -> str:
        return self.request.model


def parse_create(body: Any, store: ResponseStore, owner: str | None = None) -> ResponsesCall:
    """A create request; `store` holds the conversations `previous_response_id` may continue (those
    `owner`, the request's key, made)."""
    body = object_body(body, ACCEPTED_FIELDS, IGNORED_FIELDS, HARMLESS_VALUES)
    model = body.get("model")
    if not isinstance(model, str):
        raise bad_request("'model' is required and must be a string", "model", "missing_required_parameter")
    earlier = _previous(body.get("previous_response_id"), store, owner)
    called = {call["id"]: call["name"] for message in earlier for call in message.get("tool_calls", ())}
    if "input" not in body:
        raise bad_request("'input' is required", "input", "missing_required_parameter")
    conversation = (*earlier, *input_messages(body["input"], called))
    instructions = _optional(body, "instructions", str)
    messages = ([{"role": "system", "content": instructions}] if instructions else []) + list(conversation)
    request = _bus_request(body, model, messages)
    keep = _optional(body, "store", bool) is not False
    stream = bool(_optional(body, "stream", bool))
    return ResponsesCall(request, conversation, stream, keep, _echo(body, request, instructions, keep))


def _bus_request(body: dict[str, Any], model: str, messages: list[dict[str, Any]]) -> GenerationRequest:
    if not body.get("tools") and body.get("tool_choice") in ("auto", "none"):
        body.pop("tool_choice")  # harmless without tools, and some clients always send it
    tools = parse_tools(body, flat=True)
    text = _optional(body, "text", dict) or {}
    if set(text) - {"format", "verbosity"}:  # verbosity: a hint this server has no way to follow
        raise bad_request("'text' takes only 'format' and 'verbosity'", "text", "unsupported_parameter")
    constraint = format_constraint(text.get("format", {"type": "text"}), "text.format", None)
    fields = {"model": model, "messages": messages, "max_tokens": body.get("max_output_tokens"),
              "constraint": constraint, "tools": tools,
              **{key: body[key] for key in ("temperature", "top_p") if key in body}}
    return generation_request(fields, FIELD_NAMES)


def _echo(body: dict[str, Any], request: GenerationRequest, instructions: str | None, keep: bool) -> dict[str, Any]:
    """The request's fields as the response object shows them, defaults filled in."""
    echo = {
        "model": request.model, "instructions": instructions,
        "tools": [_tool_echo(tool) for tool in body.get("tools") or []],
        "tool_choice": body.get("tool_choice", "auto"), "parallel_tool_calls": body.get("parallel_tool_calls", True),
        "text": {"format": (body.get("text") or {}).get("format", {"type": "text"})},
        "temperature": request.temperature, "top_p": request.top_p, "max_output_tokens": request.max_tokens,
        "metadata": _metadata(body.get("metadata")), "previous_response_id": body.get("previous_response_id"),
        "store": keep, "truncation": "disabled",
    }
    if _optional(body, "user", str) is not None:  # the spec has no null user
        echo["user"] = body["user"]
    return echo


def _optional(body: dict[str, Any], name: str, kind: type) -> Any:
    value = body.get(name)
    if value is not None and not isinstance(value, kind):
        raise bad_request(f"'{name}' must be a {kind.__name__ if kind is not dict else 'JSON object'}", name,
                          "invalid_type")
    return value


def _previous(response_id: Any, store: ResponseStore, owner: str | None) -> tuple[dict[str, Any], ...]:
    """The stored conversation `previous_response_id` continues (none without one)."""
    if response_id is None:
        return ()
    if not isinstance(response_id, str):
        raise bad_request("'previous_response_id' must be a string", "previous_response_id", "invalid_type")
    stored = store.get(response_id, owner)
    if stored is None:
        raise not_found(response_id, "previous_response_id")
    return stored.conversation


def not_found(response_id: str, param: str | None = None) -> ApiError:
    return ApiError(404, f"no response with id '{response_id}' is stored here (never stored, deleted, or "
                    "dropped to make room for newer ones)", param=param, code="response_not_found")


def _metadata(value: Any) -> dict[str, str]:
    if value is None:
        return {}
    if (not isinstance(value, dict) or len(value) > MAX_METADATA_KEYS
            or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items())):
        raise bad_request(f"'metadata' must be an object of at most {MAX_METADATA_KEYS} string values", "metadata")
    return value


def _tool_echo(tool: dict[str, Any]) -> dict[str, Any]:
    """A function tool as the response object shows it (checked already by `parse_tools`)."""
    return {"type": "function", "name": tool["name"], "description": tool.get("description"),
            "parameters": tool.get("parameters"), "strict": tool.get("strict")}


def input_messages(value: Any, called: dict[str, str]) -> list[dict[str, Any]]:
    """`input` (a string, or a list of items) as bus chat messages. `called`: call id -> function
    name of the calls made so far, which a `function_call_output` must answer; it grows with the
    input's own calls."""
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if not isinstance(value, list) or not value:
        raise bad_request("'input' must be a string or a non-empty array of items", "input", "invalid_type")
    messages: list[dict[str, Any]] = []
    for index, item in enumerate(value):
        param = f"input[{index}]"
        if not isinstance(item, dict):
            raise bad_request(f"{param} must be an object", param, "invalid_type")
        kind = item.get("type", "message")
        if kind == "message":
            role = _ROLES.get(item.get("role"))
            if role is None:
                raise bad_request(f"{param}.role must be one of user, system, developer, assistant", f"{param}.role")
            messages.append({"role": role, "content": _content(item.get("content"), f"{param}.content")})
        elif kind == "function_call":
            call = {key: _string(item, key, param) for key in ("call_id", "name", "arguments")}
            called[call["call_id"]] = call["name"]
            entry = {"id": call["call_id"], "name": call["name"], "arguments": call["arguments"]}
            if messages and messages[-1]["role"] == "assistant":  # calls after a reply belong to that turn
                messages[-1].setdefault("tool_calls", []).append(entry)
            else:
                messages.append({"role": "assistant", "content": "", "tool_calls": [entry]})
        elif kind == "function_call_output":
            call_id = _string(item, "call_id", param)
            if call_id not in called:
                raise bad_request(f"{param}.call_id '{call_id}' answers no function_call before it", f"{param}.call_id")
            messages.append({"role": "tool", "content": _content(item.get("output"), f"{param}.output"),
                             "tool_call_id": call_id, "name": called[call_id]})
        else:
            raise bad_request(f"{param}.type {kind!r} is not supported: only message, function_call and "
                              "function_call_output items", f"{param}.type", "unsupported_parameter")
    return messages


def _string(item: dict[str, Any], key: str, param: str) -> str:
    if not isinstance(item.get(key), str):
        raise bad_request(f"{param}.{key} must be a string", f"{param}.{key}", "invalid_type")
    return item[key]


def _content(content: Any, param: str) -> str:
    """A string, or a list of text parts joined together."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and content:
        texts = []
        for index, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") not in _TEXT_PARTS or not isinstance(part.get("text"), str):
                raise bad_request(f"{param}[{index}] must be an input_text or output_text part (the only content "
                                  "served)", f"{param}[{index}]", "unsupported_parameter")
            texts.append(part["text"])
        return "".join(texts)
    raise bad_request(f"{param} must be a string or a non-empty list of text parts", param, "invalid_type")
