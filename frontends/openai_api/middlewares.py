"""The API's middlewares, outermost first in `create_app`: CORS, metrics per request, errors in each
route's API shape (key checks and drain are in `access` and `drain`)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from aiohttp import web

from frontends.openai_api.anthropic import routes as anthropic_routes
from frontends.openai_api.context import METRICS, RECORDER, cors_headers
from frontends.openai_api.errors import ApiError
from frontends.openai_api.responses import error_body

log = logging.getLogger(__name__)

CLIENT_GONE = "499"  # the status metrics record for a client that left before the answer was complete

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def metrics_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every request counted by endpoint, model and final status, with its latency."""
    resource = request.match_info.route.resource
    recorder = request[RECORDER] = request.app[METRICS].track(
        resource.canonical if resource is not None else "unmatched")
    status = CLIENT_GONE
    try:
        response = await handler(request)
        status = str(response.status)
        return response
    finally:
        recorder.finish(status)


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every error leaves as the error object of the route's API: OpenAI's, unless the route says otherwise."""
    try:
        return await handler(request)
    except ApiError as error:
        return _error_response(request, error)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        kind = "invalid_request_error" if exc.status < 500 else "server_error"
        return _error_response(request, ApiError(exc.status, exc.reason, type=kind, code=None))
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception:
        log.exception("unexpected error answering %s %s", request.method, request.path)
        return _error_response(request, ApiError(500, "internal server error", type="server_error"))


def _error_response(request: web.Request, error: ApiError) -> web.Response:
    resource = request.match_info.route.resource  # none for a route asked with the wrong method: its path, then
    respond = _ERROR_RESPONSES.get(resource.canonical if resource is not None else request.path, _openai_error)
    response = respond(error)
    if error.retry_after is not None:
        response.headers["Retry-After"] = str(error.retry_after)
    return response


def _openai_error(error: ApiError) -> web.Response:
    return web.json_response(error_body(error), status=error.status)


_ERROR_RESPONSES = {**anthropic_routes.ERROR_RESPONSES}  # route -> its errors' shape, when not OpenAI's


@web.middleware
async def cors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    headers = cors_headers(request)
    if request.method == "OPTIONS" and headers:
        return web.Response(status=204, headers={
            **headers, "Access-Control-Allow-Methods": "GET, POST, DELETE, OPTIONS",
            "Access-Control-Allow-Headers": request.headers.get("Access-Control-Request-Headers", "*"),
            "Access-Control-Max-Age": "600"})
    response = await handler(request)
    if not response.prepared:  # a stream set its own headers before the first byte
        response.headers.update(headers)
    return response
