"""`/tokenize` and `/detokenize` in vLLM's shapes, answered by a worker of the model over the bus."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from frontends.client import BusError
from frontends.openai_api.access import check_model
from frontends.openai_api.context import BUS, json_body
from frontends.openai_api.errors import ApiError, bad_request
from frontends.openai_api.body import object_body
from frontends.openai_api.requests import IGNORED_FIELDS, _messages
from frontends.openai_api.tools import parse_tools

_PROMPT_FIELDS = {"model", "prompt", "add_special_tokens", "return_token_strs"}
_CHAT_FIELDS = {"model", "messages", "add_special_tokens", "return_token_strs", "add_generation_prompt",
                "continue_final_message", "tools", "tool_choice"}
# Accepted at the value that asks for what the worker does anyway; refused at any other.
_FIXED = {"return_token_strs": False, "add_generation_prompt": True, "continue_final_message": False}


async def tokenize(request: web.Request) -> web.Response:
    raw = await json_body(request)
    chat = isinstance(raw, dict) and "messages" in raw
    body = object_body(raw, _CHAT_FIELDS if chat else _PROMPT_FIELDS, IGNORED_FIELDS)
    for name, value in _FIXED.items():
        if name in body and body[name] is not value:
            raise bad_request(f"'{name}' is supported only as {str(value).lower()}", name, "unsupported_parameter")
    add_special = body.get("add_special_tokens", not chat)  # vLLM's defaults: true for a prompt, false for a chat
    if not isinstance(add_special, bool):
        raise bad_request("'add_special_tokens' must be a boolean", "add_special_tokens", "invalid_type")
    if chat and add_special:  # the chat template writes the special tokens a request starts with
        raise bad_request("'add_special_tokens' is supported only as false with 'messages'", "add_special_tokens",
                          "unsupported_parameter")
    if chat:
        if not isinstance(body["messages"], list):
            raise bad_request("'messages' must be an array", "messages", "invalid_type")
        tools = parse_tools(body)
        params: dict[str, Any] = {"messages": _messages(body["messages"]),
                                  "tools": tools}
    else:
        if not isinstance(body.get("prompt"), str):
            raise bad_request("'prompt' (a string) or 'messages' is required", "prompt", "missing_required_parameter")
        params = {"prompt": body["prompt"], "add_special_tokens": add_special}
    model = await _model(request, body)
    try:
        tokens = await request.app[BUS].tokenize(model, **params)
    except BusError as error:
        raise ApiError.from_bus(error, "messages" if chat else "prompt") from None
    return web.json_response({"count": tokens.count, "max_model_len": tokens.max_model_len,
                              "tokens": list(tokens.tokens), "token_strs": None})


async def detokenize(request: web.Request) -> web.Response:
    body = object_body(await json_body(request), {"model", "tokens"}, IGNORED_FIELDS)
    if not isinstance(body.get("tokens"), list):
        raise bad_request("'tokens' (an array of token ids) is required", "tokens", "missing_required_parameter")
    model = await _model(request, body)
    try:
        text = await request.app[BUS].detokenize(model, body["tokens"])
    except BusError as error:
        raise ApiError.from_bus(error, "tokens") from None
    return web.json_response({"prompt": text})


async def _model(request: web.Request, body: dict[str, Any]) -> str:
    """The body's model; left out (as vLLM allows), the one generating model served."""
    if "model" in body:
        if not isinstance(body["model"], str):
            raise bad_request("'model' must be a string", "model", "invalid_type")
        return body["model"]
    try:
        generating = [info.name for info in await request.app[BUS].models() if info.can_chat]
    except BusError as error:
        raise ApiError.from_bus(error) from None
    if len(generating) != 1:
        raise bad_request(f"'model' is required: {len(generating)} models generate here", "model",
                          "missing_required_parameter")
    check_model(request, generating[0])  # a key limited to other models may not reach it unnamed
    return generating[0]
