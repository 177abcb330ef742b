"""Who may ask what: the API key a request presents, the models it may use, and its quotas.

The aiohttp side of `keys.KeyRing` and `quotas.QuotaLimiter`; errors are raised as `ApiError`, so each
route answers them in its own API's shape.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from aiohttp import web

from broker.protocol import GenerationRequest
from frontends.openai_api.context import KEY, KEYS, QUOTAS, RECORDER
from frontends.openai_api.drain import PROBE_PATHS
from frontends.openai_api.errors import ApiError

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

R = TypeVar("R", bound=GenerationRequest)


@web.middleware
async def access_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Checks the key (constant-time), then the model it asks for, then its quotas; a request admitted
    is charged its tokens when it ends."""
    keys, quotas = request.app[KEYS], request.app[QUOTAS]
    if keys.refresh():
        quotas.keep_only(keys.names)
    if not keys.required or request.path in PROBE_PATHS or request.method == "OPTIONS":
        return await handler(request)
    policy = keys.match(_presented(request))
    if policy is None:
        raise ApiError(401, "missing or incorrect API key (send 'Authorization: Bearer <key>' or "
                       "'x-api-key: <key>')", code="invalid_api_key")
    request[KEY] = policy
    recorder = request[RECORDER]
    recorder.key = policy.name
    model = None if policy.models is None else await _model_asked(request)
    if model is not None:
        check_model(request, model)
    refusal = quotas.admit(policy, time.monotonic())
    if refusal is not None:
        retry_after = max(1, math.ceil(refusal.retry_after))
        log.info("key '%s' refused: %s", policy.name, refusal.reason)
        raise ApiError(429, f"rate limit reached: {refusal.reason}; retry in {retry_after} s",
                       type="rate_limit_error", code="rate_limit_exceeded", retry_after=retry_after)
    try:
        return await handler(request)
    finally:
        quotas.release(policy, recorder.num_prompt_tokens + recorder.num_completion_tokens, time.monotonic())


def check_model(request: web.Request, model: str) -> None:
    """A 403 when the request's key may not use `model` (for a handler that picks the model itself)."""
    if KEY in request and not request[KEY].may_use(model):
        raise ApiError(403, f"this API key may not use the model '{model}'", type="permission_error",
                       param="model", code="model_not_allowed")


def key_name(request: web.Request) -> str | None:
    """The name of the key the request came with (None when the API has no keys)."""
    return request[KEY].name if KEY in request else None


def priority_of(request: web.Request) -> int:
    """The default priority of the request's key (0 when the API has no keys)."""
    return request[KEY].priority if KEY in request else 0


def with_priority(request: web.Request, generation: R) -> R:
    """The bus request as sent, at its key's priority or later: a body may ask to wait longer (a
    higher number), never to jump ahead of its key's place (0 for a key that sets none). A body's 0
    reads as unset. Without keys, the body's priority stands."""
    if KEY not in request:
        return generation
    floor = priority_of(request)
    wanted = generation.priority if generation.priority else floor
    priority = max(wanted, floor)
    return generation if priority == generation.priority else dataclasses.replace(generation, priority=priority)


def _presented(request: web.Request) -> list[str]:
    # OpenAI's clients send `Authorization: Bearer <key>`, Anthropic's `x-api-key: <key>`
    scheme, _, bearer = request.headers.get("Authorization", "").partition(" ")
    given = [bearer] if scheme.lower() == "bearer" else []
    return given + ([request.headers["x-api-key"]] if "x-api-key" in request.headers else [])


async def _model_asked(request: web.Request) -> str | None:
    """The model a request names: the body's `model`, or a model route's id. The handler reads the body
    again (aiohttp keeps it) and answers a malformed one itself."""
    if "model_id" in request.match_info:
        return request.match_info["model_id"]
    if request.method != "POST" or not request.can_read_body:
        return None
    try:
        body = json.loads(await request.read())
    except (ValueError, RecursionError):
        return None
    model = body.get("model") if isinstance(body, dict) else None
    return model if isinstance(model, str) else None
