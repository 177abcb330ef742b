"""`/v1/responses`: create (plain or streamed), read and delete."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from contextlib import aclosing

from aiohttp import web

from broker.protocol import Done
from frontends.client import BusError, Overloaded
from frontends.openai_api.access import key_name, with_priority
from frontends.openai_api.context import BUS, RECORDER, RESPONSES, cors_headers, json_body
from frontends.openai_api.errors import ApiError
from frontends.openai_api.responses_api.objects import Event, ResponseBuilder, deletion
from frontends.openai_api.responses_api.request import FIELD_NAMES, ResponsesCall, not_found, parse_create
from frontends.openai_api.responses_api.store import StoredResponse
from frontends.streams import Outcome, outcomes

log = logging.getLogger(__name__)

INPUT_PARAM = "input"  # the field an error about a too-long prompt names


async def create_response(request: web.Request) -> web.StreamResponse:
    call = parse_create(await json_body(request), request.app[RESPONSES], key_name(request))
    recorder = request[RECORDER]
    try:
        stream = await request.app[BUS].generate(with_priority(request, call.request))
    except BusError as error:  # not sent at all: no broker, or a message too large for the bus
        raise _api_error(request, call, error) from None
    try:
        async with aclosing(outcomes(stream)) as items:
            first = await anext(items)
            if isinstance(first, BusError):  # before any event: a plain HTTP error
                raise _api_error(request, call, first)
            recorder.served(call.model)  # a worker answered: a served model, fit to be a metrics label
            builder = ResponseBuilder(call.echo)
            if call.stream:
                return await _stream(request, call, builder, first, items)
            async for _ in _events(request, call, builder, first, items):
                pass  # a plain answer sends only the finished object
            return web.json_response(builder.response())
    finally:
        await stream.cancel()  # a no-op for a finished stream; stops the rest (client gone, error)
        recorder.stream_ended(call.model, stream)


async def get_response(request: web.Request) -> web.Response:
    response_id = request.match_info["response_id"]
    stored = request.app[RESPONSES].get(response_id, key_name(request))
    if stored is None:
        raise not_found(response_id)
    return web.json_response(stored.body)


async def delete_response(request: web.Request) -> web.Response:
    response_id = request.match_info["response_id"]
    if not request.app[RESPONSES].remove(response_id, key_name(request)):
        raise not_found(response_id)
    return web.json_response(deletion(response_id))


async def _events(request: web.Request, call: ResponsesCall, builder: ResponseBuilder, item: Outcome,
                  items: AsyncIterator[Outcome]) -> AsyncIterator[Event]:
    """Every event from the opening to the end of the response, which is then stored if asked."""
    for event in builder.opening():
        yield event
    while not isinstance(item, Done):
        if isinstance(item, BusError):
            raise _api_error(request, call, item)
        for event in builder.delta(item):
            yield event
        item = await anext(items)
    closing = builder.finish(item)
    request[RECORDER].tokens(item.prompt_tokens, item.completion_tokens, item.cached_tokens)
    if call.store:  # before the last event goes out, so a client that read it can continue at once
        conversation = (*call.conversation, *builder.conversation())
        request.app[RESPONSES].add(StoredResponse(builder.response(), conversation, key_name(request)))
    for event in closing:
        yield event


async def _stream(request: web.Request, call: ResponsesCall, builder: ResponseBuilder, first: Outcome,
                  items: AsyncIterator[Outcome]) -> web.StreamResponse:
    """Server-sent events, each named by its type. Once the status line is sent, an error travels
    as an `error` event followed by `response.failed`."""
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                           **cors_headers(request)})
    await response.prepare(request)
    try:
        async with aclosing(_events(request, call, builder, first, items)) as events:
            async for event in events:
                await _send(response, event)
    except (asyncio.CancelledError, ConnectionResetError):
        raise  # the client left: nobody to tell
    except Exception as exc:
        if isinstance(exc, ApiError):
            error = exc
        else:
            log.exception("a Responses stream failed after its first event")
            error = ApiError(500, f"internal server error: {exc}", type="server_error")
        for event in builder.fail(error):
            await _send(response, event)
    return response


def _api_error(request: web.Request, call: ResponsesCall, error: BusError) -> ApiError:
    """The API error for a bus error, counted as an overload where it is one (only a served model is)."""
    if isinstance(error, Overloaded):  # a queue timeout too
        request[RECORDER].overloaded(call.model)
    return ApiError.from_bus(error, INPUT_PARAM, FIELD_NAMES)


async def _send(response: web.StreamResponse, event: Event) -> None:
    data = json.dumps(event, ensure_ascii=False)
    await response.write(f"event: {event['type']}\ndata: {data}\n\n".encode())
