"""The `/v1/messages` handlers: a body to one bus request, its answer as a Message or as events."""

from __future__ import annotations

import asyncio
import logging
from contextlib import aclosing

from aiohttp import web

from broker.protocol import Done
from frontends.client import BusError, Overloaded, Stream
from frontends.openai_api.access import with_priority
from frontends.openai_api.anthropic.errors import error_object, error_status
from frontends.openai_api.anthropic.requests import FIELD_NAMES, parse_count_request, parse_message_request
from frontends.openai_api.anthropic.responses import Event, MessageEvents, message, message_id, sse, token_count
from frontends.openai_api.context import BUS, RECORDER, cors_headers, json_body
from frontends.openai_api.errors import ApiError
from frontends.streams import outcomes

log = logging.getLogger(__name__)



async def create_message(request: web.Request) -> web.StreamResponse:
    call = parse_message_request(await json_body(request))
    model = call.request.model
    recorder = request[RECORDER]
    try:
        stream = await request.app[BUS].generate(with_priority(request, call.request))
    except BusError as error:  # not sent at all: no broker, or a message too large for the bus
        raise _api_error(request, error, model) from None
    try:
        if call.stream:
            return await _stream(request, stream, model)
        try:
            completion = await stream.collect()
        except BusError as error:
            raise _api_error(request, error, model) from None
        recorder.served(model)  # a worker answered: a served model, fit to be a metrics label
        recorder.tokens(completion.prompt_tokens, completion.completion_tokens, completion.cached_tokens)
        return web.json_response(message(message_id(), model, completion))
    finally:
        await stream.cancel()  # a no-op for a finished stream; stops it when the client left or it failed
        recorder.stream_ended(model, stream)


async def count_tokens(request: web.Request) -> web.Response:
    """The prompt's size as the worker counts it: under the chat template, with the tools it shows."""
    generation = parse_count_request(await json_body(request))
    assert generation.messages is not None
    tools = None if generation.tools is None else generation.tools.to_fields()
    try:
        tokens = await request.app[BUS].tokenize(generation.model, tools=tools,
                                                 messages=[m.to_fields() for m in generation.messages])
    except BusError as error:
        raise _api_error(request, error, generation.model) from None
    request[RECORDER].served(generation.model)
    return web.json_response(token_count(tokens.count))


async def _stream(request: web.Request, stream: Stream, model: str) -> web.StreamResponse:
    """Anthropic's events. An error before the first token is an HTTP error; after it, an `error`
    event, which Anthropic's clients raise."""
    async with aclosing(outcomes(stream)) as items:
        item = await anext(items)
        if isinstance(item, BusError):
            raise _api_error(request, item, model)
        request[RECORDER].served(model)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                               **cors_headers(request)})
        await response.prepare(request)
        events = MessageEvents(model, may_call=stream.request.tools is not None)
        try:
            await _send(response, events.opening())
            while not isinstance(item, Done):
                if isinstance(item, BusError):
                    raise _api_error(request, item, model)
                await _send(response, events.delta(item))
                item = await anext(items)
            request[RECORDER].tokens(item.prompt_tokens, item.completion_tokens, item.cached_tokens)
            await _send(response, events.closing(item))
        except (asyncio.CancelledError, ConnectionResetError):
            raise  # the client left: nobody to tell
        except Exception as exc:  # the status line is sent: the error must travel as an event
            if not isinstance(exc, ApiError):
                log.exception("a messages stream failed after its first event")
                exc = ApiError(500, f"internal server error: {exc}", type="server_error")
            await _send(response, [("error", error_object(exc))])
        return response


async def _send(response: web.StreamResponse, events: list[Event]) -> None:
    if events:
        await response.write(b"".join(sse(event) for event in events))


def _api_error(request: web.Request, error: BusError, model: str) -> ApiError:
    if isinstance(error, Overloaded):  # a queue timeout too; only a served model is: fit to be a metrics label
        request[RECORDER].overloaded(model)
    return ApiError.from_bus(error, "messages", FIELD_NAMES)


def error_response(error: ApiError) -> web.Response:
    """Any error of these routes, in Anthropic's shape."""
    return web.json_response(error_object(error), status=error_status(error))


ROUTES = [web.post("/v1/messages", create_message), web.post("/v1/messages/count_tokens", count_tokens)]
ERROR_RESPONSES = {route.path: error_response for route in ROUTES}  # by route: how its errors are answered
