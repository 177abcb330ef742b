"""One request's answer as it arrives: the stream of its tokens, and the whole answer it adds up to."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol

from broker import protocol
from broker.protocol import Command, EmbeddingRequest, GenerationRequest, Message, TokenizeRequest
from frontends.client.errors import BusError, Cancelled, NoWorker, error_from

BusRequest = GenerationRequest | EmbeddingRequest | TokenizeRequest


@dataclass(frozen=True, slots=True)
class Completion:
    """A whole answer, as `Stream.collect()` returns it."""

    text: str
    finish_reason: protocol.FinishReason
    prompt_tokens: int
    completion_tokens: int
    logprobs: tuple[protocol.TokenLogprob, ...] | None = None
    cached_tokens: int = 0  # prompt tokens the worker took from its prefix cache
    worker_id: str = ""  # the worker that served it
    tool_calls: tuple[protocol.ToolCallDelta, ...] = ()  # the pieces of its tool calls, in order
    stop: str | None = None  # the request's stop string that ended it, when one did


class StreamOwner(Protocol):
    """What a `Stream` needs from the client that carries it."""

    async def cancel_request(self, request_id: bytes) -> None:
        """Tell the broker to stop a request; nothing happens when the broker is unreachable."""

    def release(self, stream: Stream) -> None:
        """The stream ended: its request is no longer waited for (nor named in heartbeats)."""


class Stream:
    """The answer to one request: iterate for `TokenDelta`s; `done` is set at the end.

    `request_id` is the request's id on the bus now: a request sent again (see `BusClient`) gets a
    fresh one, and `request` then carries the tokens already delivered (`resume_ids`).
    """

    def __init__(self, owner: StreamOwner, request: BusRequest, request_id: bytes, body: bytes | None = None) -> None:
        self._owner = owner
        self._request = request
        self._body = body  # `request` packed, once: None until asked for
        self.request_id = request_id
        self._queue: asyncio.Queue[Message | BusError] = asyncio.Queue()
        self.done: protocol.Done | None = None
        self.embeddings: protocol.Embeddings | None = None  # the answer to an EMBED, which has no TOKENs
        self.tokens: protocol.Tokens | None = None  # the answer to a TOKENIZE, likewise
        self.sent_at: float | None = None  # when the REQUEST last went out: only then may a heartbeat name it
        self.num_sends = 0
        self.finished = False
        self.cancelled = False
        self.started_at = time.monotonic()
        timeout = request.timeout if isinstance(request, GenerationRequest) else None
        self.deadline = None if timeout is None else self.started_at + timeout  # across resends
        self.first_token_at: float | None = None  # when the first TOKEN arrived: from then on it is only resumed
        self.last_token_at: float | None = None  # and the last one, so far
        self.delivered_ids: list[int] = []  # the answer's tokens that reached this client, from the TOKENs' ids
        self.num_delivered = 0  # and their count, from `num_tokens`: an older worker sends no ids
        self.num_resumes = 0
        self.num_workers_lost = 0
        self.fault: BusError | None = None  # what cut it last, when it was resumed
        self.fault_at: float | None = None

    @property
    def request(self) -> BusRequest:
        return self._request

    @request.setter
    def request(self, request: BusRequest) -> None:  # sent again, changed: a resume, the time left
        self._request, self._body = request, None

    @property
    def body(self) -> bytes:
        """The request as its message's body, packed once for every time it is sent."""
        if self._body is None:
            self._body = protocol.pack_body(self._request.to_fields())
        return self._body

    def __aiter__(self) -> AsyncIterator[protocol.TokenDelta]:
        return self

    async def __anext__(self) -> protocol.TokenDelta:
        if self.cancelled:
            raise Cancelled("the request was cancelled")
        if self.finished:
            raise StopAsyncIteration
        item = await self._queue.get()
        if isinstance(item, BusError):
            self._finish()
            raise item
        if isinstance(item, protocol.TokenDelta):
            return item
        try:
            if item.command is Command.TOKEN:  # one that `deliver` could not read
                return protocol.TokenDelta.from_fields(item.fields())
            self._finish()
            if item.command is Command.DONE:
                self.done = protocol.Done.from_fields(item.fields())
                raise StopAsyncIteration
            if item.command is Command.EMBEDDINGS:
                self.embeddings = protocol.Embeddings.from_fields(item.fields())
                raise StopAsyncIteration
            if item.command is Command.TOKENS:
                self.tokens = protocol.Tokens.from_fields(item.fields())
                raise StopAsyncIteration
            raise self._ending(error_from(protocol.Error.from_fields(item.fields())))
        except protocol.ProtocolError as exc:  # a malformed answer still ends the stream, loudly
            await self.cancel()
            raise BusError(f"malformed {item.command.value} from the bus: {exc}") from None

    def _ending(self, error: BusError) -> BusError:
        """A resumed request that finds no worker left ends with the fault that cut it, as an uncut one would."""
        if self.fault is not None and isinstance(error, NoWorker):
            return type(self.fault)(f"{self.fault.message}; no worker was left to resume it on: {error.message}")
        return error

    async def collect(self) -> Completion:
        """Read the stream to its end and return the whole answer."""
        texts: list[str] = []
        logprobs: list[protocol.TokenLogprob] | None = None
        calls: list[protocol.ToolCallDelta] = []
        async for delta in self:
            texts.append(delta.text)
            calls += delta.tool_calls
            if delta.logprobs is not None:
                logprobs = (logprobs or []) + list(delta.logprobs)
        assert self.done is not None
        return Completion("".join(texts), self.done.finish_reason, self.done.prompt_tokens,
                          self.done.completion_tokens, None if logprobs is None else tuple(logprobs),
                          self.done.cached_tokens, self.done.worker_id, tuple(calls), self.done.stop)

    async def cancel(self) -> None:
        """Stop the request on the bus; the worker frees its slot at its next step.

        Reading the stream afterwards (or while it is cancelled, from another task) raises `Cancelled`.
        """
        if not self.finished:
            self._finish()
            self.cancelled = True
            self._queue.put_nowait(Cancelled("the request was cancelled"))
            await self._owner.cancel_request(self.request_id)

    aclose = cancel

    def deliver(self, item: Message | BusError) -> None:
        """An answer from the bus (or the client's own verdict on the request), in arrival order."""
        if isinstance(item, Message) and item.command is Command.TOKEN:
            self.last_token_at = time.monotonic()
            if self.first_token_at is None:
                self.first_token_at = self.last_token_at
            try:
                delta = protocol.TokenDelta.from_fields(item.fields())
            except protocol.ProtocolError:
                self.num_delivered = -1  # its tokens are unknown: never resumed
            else:
                self.delivered_ids += delta.token_ids
                self.num_delivered += delta.num_tokens
                self._queue.put_nowait(delta)
                return
        self._queue.put_nowait(item)

    @property
    def resumable(self) -> bool:
        """A generation whose delivered tokens are all known (each TOKEN named its ids)."""
        return isinstance(self.request, GenerationRequest) and len(self.delivered_ids) == self.num_delivered

    def _finish(self) -> None:
        self.finished = True
        self._owner.release(self)
