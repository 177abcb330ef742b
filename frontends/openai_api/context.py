"""What every route of the HTTP API shares: the app's state keys and reading a request."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from frontends.client import BusClient
from frontends.openai_api.config import ApiSettings
from frontends.openai_api.errors import bad_request
from frontends.openai_api.keys import KeyRing
from frontends.openai_api.metrics import ApiMetrics, RequestMetrics
from frontends.openai_api.quotas import KeyPolicy, QuotaLimiter
from frontends.openai_api.responses_api.store import ResponseStore

SETTINGS = web.AppKey("settings", ApiSettings)
BUS = web.AppKey("bus", BusClient)
METRICS = web.AppKey("metrics", ApiMetrics)
STARTED = web.AppKey("started", int)
RESPONSES = web.AppKey("responses", ResponseStore)  # finished Responses API responses
KEYS = web.AppKey("keys", KeyRing)
QUOTAS = web.AppKey("quotas", QuotaLimiter)
RECORDER = web.RequestKey("recorder", RequestMetrics)
KEY = web.RequestKey("key", KeyPolicy)  # the key a request came with, when the API has keys


async def json_body(request: web.Request) -> Any:
    # JSON between systems is UTF-8 and application/json has no charset parameter (RFC 8259), so a
    # charset in the header is not looked up: an unknown one would be a LookupError.
    body = await request.read()
    try:
        return json.loads(body)
    except (ValueError, RecursionError) as exc:  # not JSON, not UTF-8, a number too long, or nested too deep
        raise bad_request(f"the request body is not valid JSON: {exc}", None, "invalid_json") from None


TIMEOUT_HEADER = "X-Request-Timeout"


def with_timeout_header(request: web.Request, body: Any) -> Any:
    """The body, given the `X-Request-Timeout` header's seconds as its `timeout` when it has none."""
    given = request.headers.get(TIMEOUT_HEADER)
    if given is None or not isinstance(body, dict) or body.get("timeout") is not None:
        return body
    try:
        return {**body, "timeout": float(given)}
    except ValueError:
        raise bad_request(f"the {TIMEOUT_HEADER} header must be a number of seconds", TIMEOUT_HEADER) from None


def cors_headers(request: web.Request) -> dict[str, str]:
    origins = request.app[SETTINGS].cors_origins
    origin = request.headers.get("Origin")
    if origin and ("*" in origins or origin in origins):
        return {"Access-Control-Allow-Origin": origin, "Vary": "Origin"}
    return {}
