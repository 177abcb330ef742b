"""The OpenAI-compatible HTTP API: an aiohttp app that turns each request into bus requests."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from broker.protocol import Done, EmbeddingRequest, Embeddings
from frontends.client import BusClient, BusError, Completion, Overloaded, Stream
from frontends.openai_api.access import access_middleware, with_priority
from frontends.openai_api.anthropic import routes as anthropic_routes
from frontends.openai_api.config import ApiSettings
from frontends.openai_api.context import (
    BUS,
    KEYS,
    METRICS,
    QUOTAS,
    RECORDER,
    RESPONSES,
    SETTINGS,
    STARTED,
    cors_headers,
    json_body,
    with_timeout_header,
)
from frontends.openai_api.drain import DRAIN, Drain, drain_middleware
from frontends.openai_api.embeddings import parse_embeddings
from frontends.openai_api.errors import ApiError
from frontends.openai_api.keys import KeyRing
from frontends.openai_api.metrics import ApiMetrics
from frontends.openai_api.middlewares import cors_middleware, error_middleware, metrics_middleware
from frontends.openai_api.quotas import QuotaLimiter
from frontends.openai_api.requests import ApiCall, parse_chat, parse_completion
from frontends.openai_api.responses_api.handlers import create_response, delete_response, get_response
from frontends.openai_api.responses_api.store import ResponseStore
from frontends.openai_api.tokens import detokenize, tokenize
from frontends.openai_api.responses import (
    ChatResponses,
    CompletionResponses,
    Responses,
    embedding_list,
    error_body,
    model_list,
    model_object,
)
from frontends.streams import Outcome, merged_outcomes

log = logging.getLogger(__name__)

_MODELS_WAIT = 2.0  # seconds a scrape waits for the broker's LIST_MODELS answer


def create_app(settings: ApiSettings) -> web.Application:
    app = web.Application(client_max_size=settings.max_body_bytes,
                          middlewares=[cors_middleware, metrics_middleware, error_middleware, drain_middleware,
                                       access_middleware])
    app[SETTINGS] = settings
    app[KEYS] = KeyRing(settings.keys_file, settings.api_keys)
    app[QUOTAS] = QuotaLimiter()
    app[METRICS] = ApiMetrics()
    app[STARTED] = int(time.time())
    app[RESPONSES] = ResponseStore(settings.max_stored_responses)
    app[DRAIN] = Drain()
    app.cleanup_ctx.append(bus_client)
    app.add_routes([
        web.get("/v1/models", list_models),
        web.get("/v1/models/{model_id:.+}", get_model),
        web.post("/v1/chat/completions", chat_completions),
        web.post("/v1/completions", completions),
        web.post("/v1/embeddings", embeddings),
        web.post("/v1/responses", create_response),
        web.get("/v1/responses/{response_id}", get_response),
        web.delete("/v1/responses/{response_id}", delete_response),
        web.post("/tokenize", tokenize),
        web.post("/detokenize", detokenize),
        *anthropic_routes.ROUTES,
        web.get("/health", health),
        web.get("/ready", ready),
        web.get("/metrics", metrics),
    ])
    return app


async def bus_client(app: web.Application) -> AsyncIterator[None]:
    async with BusClient(app[SETTINGS].broker, curve=app[SETTINGS].curve()) as client:
        app[BUS] = client
        yield


# -- models and status


async def list_models(request: web.Request) -> web.Response:
    infos = await _models(request)
    return web.json_response(model_list(infos, request.app[STARTED]))


async def get_model(request: web.Request) -> web.Response:
    infos = await _models(request)
    wanted = request.match_info["model_id"]
    for info in infos:
        if info.name == wanted:
            return web.json_response(model_object(info, request.app[STARTED]))
    served = ", ".join(i.name for i in infos) or "none"
    raise ApiError(404, f"model '{wanted}' is not served; models served: {served}", param="model",
                   code="model_not_found")


async def _models(request: web.Request) -> list:
    try:
        return await request.app[BUS].models()
    except BusError as error:
        raise ApiError(503, f"the broker is unreachable: {error.message}", type="service_unavailable",
                       code="broker_unreachable") from None


async def health(request: web.Request) -> web.Response:
    status, body = await _serving(request)
    return web.json_response(body, status=status)


async def ready(request: web.Request) -> web.Response:
    """Whether to send this process new requests: /health, and not draining."""
    if request.app[DRAIN].draining:
        return web.json_response({"status": "draining", "reason": "shutting down: finishing the open requests"},
                                 status=503)
    status, body = await _serving(request)
    return web.json_response(body, status=status)


async def _serving(request: web.Request) -> tuple[int, dict[str, Any]]:
    """200 and the models that a live worker serves, or 503 and why none is."""
    try:
        infos = await request.app[BUS].models()
    except BusError as error:
        return 503, {"status": "unavailable", "reason": f"broker unreachable: {error.message}"}
    live = [info.name for info in infos if info.workers]
    if not live:
        return 503, {"status": "unavailable", "reason": "no worker is live"}
    return 200, {"status": "ok", "models": live}


async def metrics(request: web.Request) -> web.Response:
    try:  # requests running and waiting: the broker's numbers at scrape time
        infos = await asyncio.wait_for(request.app[BUS].models(), _MODELS_WAIT)
    except (BusError, TimeoutError):
        infos = None
    request.app[METRICS].vllm.set_models(infos)
    body = generate_latest(request.app[METRICS].registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


# -- generation


async def chat_completions(request: web.Request) -> web.StreamResponse:
    call = parse_chat(with_timeout_header(request, await json_body(request)), request.app[SETTINGS].max_n)
    return await _generate(request, call, ChatResponses(call.model, include_usage=call.include_usage))


async def completions(request: web.Request) -> web.StreamResponse:
    call = parse_completion(with_timeout_header(request, await json_body(request)), request.app[SETTINGS].max_n)
    prompts = [generation.prompt or "" for generation in call.requests]
    return await _generate(request, call, CompletionResponses(call.model, prompts, include_usage=call.include_usage))


async def _generate(request: web.Request, call: ApiCall, responses: Responses) -> web.StreamResponse:
    recorder = request[RECORDER]
    streams: list[Stream] = []
    try:
        bus = request.app[BUS]
        try:
            for generation in call.requests:
                streams.append(await bus.generate(with_priority(request, generation)))
        except BusError as error:  # not sent at all: no broker, or a message too large for the bus
            raise ApiError.from_bus(error, call.input_param) from None
        if call.stream:
            return await _stream(request, call, streams, responses)
        results = await _collect_all(streams, call.input_param)
        recorder.served(call.model)  # a worker answered: a served model, fit to be a metrics label
        recorder.tokens(sum(r.prompt_tokens for r in results[::call.n]), sum(r.completion_tokens for r in results),
                        sum(r.cached_tokens for r in results[::call.n]))
        return web.json_response(responses.response(results, call.n))
    except ApiError as error:
        if error.status == 429:  # only a served model is overloaded
            recorder.overloaded(call.model)
        raise
    finally:
        for stream in streams:
            await stream.cancel()  # a no-op for finished streams; stops the rest (client gone, error)
            recorder.stream_ended(call.model, stream)


async def embeddings(request: web.Request) -> web.Response:
    call = parse_embeddings(await json_body(request))
    bus = request.app[BUS]
    recorder = request[RECORDER]
    # One EMBED per slice of the inputs, all at once: on several workers they run side by side.
    tasks = [asyncio.ensure_future(_embed_slice(bus, call.model, r, offset))
             for r, offset in zip(call.requests, call.offsets)]
    try:
        answers = await asyncio.gather(*tasks)
    except BusError as error:
        if isinstance(error, Overloaded):  # a queue timeout too
            recorder.overloaded(call.model)
        raise ApiError.from_bus(error, "input") from None
    finally:
        for task in tasks:
            task.cancel()  # the rest, when one failed or the client left; a no-op for those answered
        await asyncio.gather(*tasks, return_exceptions=True)
    recorder.served(call.model)
    recorder.tokens(sum(answer.prompt_tokens for answer in answers), 0)
    return web.json_response(embedding_list(call.model, answers, call.encoding_format))


async def _embed_slice(bus: BusClient, model: str, request: EmbeddingRequest, offset: int) -> Embeddings:
    """One EMBED of a call; an error naming one of its inputs names it as the call counts them."""
    try:
        return await bus.embed(model, request.to_fields()["input"], request.dimensions)
    except BusError as error:
        if offset:
            error.message = re.sub(r"'input\[(\d+)\]'", lambda m: f"'input[{int(m[1]) + offset}]'", error.message)
        raise


async def _collect_all(streams: list[Stream], input_param: str) -> list[Completion]:
    try:
        return list(await asyncio.gather(*(s.collect() for s in streams)))
    except BusError as error:
        raise ApiError.from_bus(error, input_param) from None


async def _stream(request: web.Request, call: ApiCall, streams: list[Stream],
                  responses: Responses) -> web.StreamResponse:
    """Server-sent events: one event per token frame. An error before the first token is an HTTP
    error; after it, an error event that OpenAI clients raise on, and no [DONE]."""
    async with aclosing(merged_outcomes(streams)) as events:
        index, item = await anext(events)
        if isinstance(item, BusError):
            raise ApiError.from_bus(item, call.input_param)
        request[RECORDER].served(call.model)  # a worker answered: a served model, fit to be a metrics label
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                               **cors_headers(request)})
        await response.prepare(request)
        try:
            await _send_events(request, response, call, responses, index, item, events)
        except (asyncio.CancelledError, ConnectionResetError):
            raise  # the client left: nobody to tell
        except Exception as exc:  # the status line is sent: the error must travel as an event
            if isinstance(exc, ApiError):
                error = exc
            else:
                log.exception("stream failed after its first event")
                error = ApiError(500, f"internal server error: {exc}", type="server_error")
            await _send_event(response, error_body(error))
        return response


async def _send_events(request: web.Request, response: web.StreamResponse, call: ApiCall, responses: Responses,
                       index: int, item: Outcome, events: AsyncIterator[tuple[int, Outcome]]) -> None:
    """From the first bus event to the end of the stream."""
    for chunk in responses.opening_chunks(len(call.requests)):
        await _send_event(response, chunk)
    done: list[Done] = []
    while True:
        if isinstance(item, BusError):
            if isinstance(item, Overloaded):  # a queue timeout too
                request[RECORDER].overloaded(call.model)
            raise ApiError.from_bus(item, call.input_param)
        if isinstance(item, Done):
            done.append(item)
            await _send_event(response, responses.finish_chunk(index, item))
            if len(done) == len(call.requests):
                break
        elif item.text or item.logprobs is not None or item.tool_calls:  # a frame that only counts tokens: nothing to show
            for chunk in responses.delta_chunks(index, item):
                await _send_event(response, chunk)
        index, item = await anext(events)
    prompt_tokens = sum(d.prompt_tokens for d in done) // call.n
    cached_tokens = sum(d.cached_tokens for d in done) // call.n
    completion_tokens = sum(d.completion_tokens for d in done)
    request[RECORDER].tokens(prompt_tokens, completion_tokens, cached_tokens)
    if call.include_usage:
        await _send_event(response, responses.usage_chunk(prompt_tokens, completion_tokens, cached_tokens,
                                                          done[0].worker_id))
    await response.write(b"data: [DONE]\n\n")


async def _send_event(response: web.StreamResponse, payload: dict[str, Any]) -> None:
    await response.write(f"data: {json.dumps(payload, ensure_ascii=False)}\n\n".encode())
