"""The bus client every frontend uses: asyncio first, with a small synchronous wrapper.

    async with BusClient("tcp://127.0.0.1:5555") as bus:
        stream = await bus.chat("SmolLM2-135M-Instruct", [{"role": "user", "content": "Hi"}])
        async for delta in stream:
            print(delta.text, end="")
        print(stream.done.finish_reason)

Errors from the bus surface as subclasses of `BusError`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import zmq
import zmq.asyncio

from broker import protocol, sockets
from broker.protocol import Command, ErrorCode, GenerationRequest, Message

log = logging.getLogger(__name__)


class BusError(Exception):
    """An explicit error from the bus; `code` is the protocol's error code."""

    code: ErrorCode = ErrorCode.INTERNAL

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field


class BadRequest(BusError):
    code = ErrorCode.BAD_REQUEST


class UnknownModel(BusError):
    code = ErrorCode.UNKNOWN_MODEL


class NoWorker(BusError):
    code = ErrorCode.NO_WORKER


class Overloaded(BusError):
    code = ErrorCode.OVERLOADED


class QueueTimeout(Overloaded):
    code = ErrorCode.QUEUE_TIMEOUT


class ContextLengthExceeded(BusError):
    code = ErrorCode.CONTEXT_LENGTH_EXCEEDED


class WorkerLost(BusError):
    code = ErrorCode.WORKER_LOST


class BrokerUnreachable(BusError):
    """The broker did not answer, or restarted and forgot the request."""

    code = ErrorCode.UNKNOWN_REQUEST


class Cancelled(BusError):
    """Reading from a stream that this client cancelled."""


_ERRORS = {cls.code: cls for cls in (BadRequest, UnknownModel, NoWorker, Overloaded, QueueTimeout,
                                      ContextLengthExceeded, WorkerLost, BrokerUnreachable)}


def error_from(error: protocol.Error) -> BusError:
    return _ERRORS.get(error.code, BusError)(error.message)


@dataclass(frozen=True, slots=True)
class Completion:
    """A whole answer, as `Stream.collect()` returns it."""

    text: str
    finish_reason: protocol.FinishReason
    prompt_tokens: int
    completion_tokens: int
    logprobs: tuple[protocol.TokenLogprob, ...] | None = None


class Stream:
    """The answer to one request: iterate for `TokenDelta`s; `done` is set at the end."""

    def __init__(self, client: BusClient, request_id: bytes) -> None:
        self._client = client
        self.request_id = request_id
        self._queue: asyncio.Queue[Message | BusError] = asyncio.Queue()
        self.done: protocol.Done | None = None
        self.sent = False  # the REQUEST went out: only then may a heartbeat name it
        self.finished = False
        self.cancelled = False
        self.started_at = time.monotonic()
        self.first_token_at: float | None = None  # when the first TOKEN arrived, for latency metrics

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
        try:
            if item.command is Command.TOKEN:
                if self.first_token_at is None:
                    self.first_token_at = time.monotonic()
                return protocol.TokenDelta.from_fields(item.fields())
            self._finish()
            if item.command is Command.DONE:
                self.done = protocol.Done.from_fields(item.fields())
                raise StopAsyncIteration
            raise error_from(protocol.Error.from_fields(item.fields()))
        except protocol.ProtocolError as exc:  # a malformed answer still ends the stream, loudly
            await self.cancel()
            raise BusError(f"malformed {item.command.value} from the bus: {exc}") from None

    async def collect(self) -> Completion:
        """Read the stream to its end and return the whole answer."""
        texts: list[str] = []
        logprobs: list[protocol.TokenLogprob] | None = None
        async for delta in self:
            texts.append(delta.text)
            if delta.logprobs is not None:
                logprobs = (logprobs or []) + list(delta.logprobs)
        assert self.done is not None
        return Completion("".join(texts), self.done.finish_reason, self.done.prompt_tokens,
                          self.done.completion_tokens, None if logprobs is None else tuple(logprobs))

    async def cancel(self) -> None:
        """Stop the request on the bus; the worker frees its slot at its next step.

        Reading the stream afterwards (or while it is cancelled, from another task) raises `Cancelled`.
        """
        if not self.finished:
            self._finish()
            self.cancelled = True
            self._queue.put_nowait(Cancelled("the request was cancelled"))
            try:
                await self._client._send(Command.CANCEL, self.request_id, wait=False)
            except BrokerUnreachable:
                pass  # nothing to stop: a broker that lost this client forgets its requests

    aclose = cancel

    def _deliver(self, item: Message | BusError) -> None:
        self._queue.put_nowait(item)

    def _finish(self) -> None:
        self.finished = True
        self._client._streams.pop(self.request_id, None)


def _request(fields: dict[str, Any]) -> GenerationRequest:
    """Checked here already, so a bad parameter fails like every other bus error."""
    try:
        return GenerationRequest.from_fields(fields)
    except protocol.ProtocolError as exc:
        raise BadRequest(str(exc), exc.field) from None


class BusClient:
    """An asyncio DEALER connection to the broker."""

    def __init__(self, address: str, *, heartbeat_interval: float = protocol.HEARTBEAT_INTERVAL) -> None:
        self.address = address
        self._interval = heartbeat_interval
        self._context = zmq.asyncio.Context.instance()
        self._socket: zmq.asyncio.Socket | None = None
        self._streams: dict[bytes, Stream] = {}
        self._replies: dict[bytes, asyncio.Future[Message]] = {}
        self._tasks: list[asyncio.Task] = []
        self._last_heard = time.monotonic()

    async def __aenter__(self) -> BusClient:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> None:
        self._socket = sockets.dealer(self._context, self.address, immediate=True)
        self._tasks = [asyncio.create_task(self._receive_loop()), asyncio.create_task(self._heartbeat_loop())]

    async def close(self) -> None:
        for stream in list(self._streams.values()):
            await stream.cancel()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._socket is not None:
            self._socket.close(linger=0)
            self._socket = None

    # -- requests

    async def generate(self, request: GenerationRequest) -> Stream:
        """Send one request; the returned stream yields its tokens."""
        request_id = uuid.uuid4().bytes
        try:
            frames = protocol.encode(Command.REQUEST, request_id, request.to_fields())
        except protocol.ProtocolError as exc:
            raise BadRequest(str(exc)) from None
        stream = Stream(self, request_id)
        if not self._streams and not self._replies:
            self._last_heard = time.monotonic()
        self._streams[request_id] = stream
        try:
            await self._send_frames(frames)
        except BaseException:  # unreachable, or the caller cancelled while it waited to send
            stream._finish()
            raise
        stream.sent = True
        return stream

    async def chat(self, model: str, messages: list[dict[str, str]], **params: Any) -> Stream:
        return await self.generate(_request({"model": model, "messages": messages, **params}))

    async def complete(self, model: str, prompt: str, **params: Any) -> Stream:
        return await self.generate(_request({"model": model, "prompt": prompt, **params}))

    async def models(self) -> list[protocol.ModelInfo]:
        """The models served now, with their live workers."""
        reply = await self._ask(Command.LIST_MODELS)
        return _parsed(protocol.parse_model_list, reply)

    async def workers(self) -> list[protocol.WorkerInfo]:
        reply = await self._ask(Command.LIST_WORKERS)
        return _parsed(protocol.parse_worker_list, reply)

    async def _ask(self, command: Command) -> Message:
        request_id = uuid.uuid4().bytes
        future: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        self._replies[request_id] = future
        try:
            await self._send(command, request_id)
            timeout = self._interval * protocol.HEARTBEAT_LIVENESS
            return await asyncio.wait_for(future, timeout)
        except TimeoutError:
            raise BrokerUnreachable(f"the broker at {self.address} did not answer") from None
        finally:
            self._replies.pop(request_id, None)

    async def _send(self, command: Command, request_id: bytes = b"", body: dict | None = None, *,
                    wait: bool = True) -> None:
        await self._send_frames(protocol.encode(command, request_id, body), wait=wait)

    async def _send_frames(self, frames: list[bytes], *, wait: bool = True) -> None:
        """Send, waiting at most the broker's liveness for room (or not at all: `wait` False)."""
        if self._socket is None:
            raise BrokerUnreachable("the bus client is closed")
        # Never a blocking send: a pending one would hold up every later send, NOBLOCK ones too.
        timeout_ms = int(self._interval * protocol.HEARTBEAT_LIVENESS * 1000) if wait else 0
        try:
            if await self._socket.poll(timeout_ms, zmq.POLLOUT):
                await self._socket.send_multipart(frames, zmq.NOBLOCK)
                return
        except zmq.Again:
            pass
        raise BrokerUnreachable(f"the broker at {self.address} is not connected")

    # -- background loops

    async def _receive_loop(self) -> None:
        assert self._socket is not None
        while True:
            frames = await self._socket.recv_multipart()
            self._last_heard = time.monotonic()
            try:
                message = protocol.decode(frames)
            except protocol.ProtocolError as exc:
                log.warning("dropping malformed message from the broker: %s", exc)
                continue
            if message.command in (Command.TOKEN, Command.DONE, Command.ERROR):
                stream = self._streams.get(message.request_id)
                if stream is not None:
                    stream._deliver(message)
            elif message.command in (Command.MODELS, Command.WORKERS):
                future = self._replies.get(message.request_id)
                if future is not None and not future.done():
                    future.set_result(message)

    async def _heartbeat_loop(self) -> None:
        """While requests are open, tell the broker which, and notice when it is gone."""
        while True:
            await asyncio.sleep(self._interval)
            if not self._streams:
                continue
            silent = time.monotonic() - self._last_heard
            if silent > self._interval * protocol.HEARTBEAT_LIVENESS:
                error = BrokerUnreachable(f"the broker at {self.address} stopped answering")
                for stream in self._streams.values():
                    stream._deliver(error)
                self._streams.clear()
                continue
            # A stream still waiting to send is unknown to the broker, which would fail it.
            sent = tuple(request_id for request_id, stream in self._streams.items() if stream.sent)
            heartbeat = protocol.ClientHeartbeat(sent)
            try:
                await self._send(Command.HEARTBEAT, b"", heartbeat.to_fields(), wait=False)
            except (zmq.ZMQError, BusError) as exc:  # the silence check above still ends the streams in time
                log.warning("heartbeat not sent: %s", exc)


class SyncBusClient:
    """A blocking wrapper: the asyncio client runs on a private event loop thread."""

    def __init__(self, address: str, *, heartbeat_interval: float = protocol.HEARTBEAT_INTERVAL) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="bus-client", daemon=True)
        self._thread.start()
        self._closed = False
        self._client = BusClient(address, heartbeat_interval=heartbeat_interval)
        self._call(self._client.start())

    def _submit(self, coroutine: Any) -> concurrent.futures.Future:
        if self._closed:  # the loop is stopped: the coroutine would never run
            coroutine.close()
            raise BrokerUnreachable("the bus client is closed")
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop)

    def _call(self, coroutine: Any) -> Any:
        future = self._submit(coroutine)
        try:
            return future.result()
        except KeyboardInterrupt:
            future.cancel()  # stop it on the loop too, or a request sent after the Ctrl-C runs for nobody
            raise

    def models(self) -> list[protocol.ModelInfo]:
        return self._call(self._client.models())

    def workers(self) -> list[protocol.WorkerInfo]:
        return self._call(self._client.workers())

    def chat(self, model: str, messages: list[dict[str, str]], **params: Any) -> SyncStream:
        return SyncStream(self, self._call(self._client.chat(model, messages, **params)))

    def complete(self, model: str, prompt: str, **params: Any) -> SyncStream:
        return SyncStream(self, self._call(self._client.complete(model, prompt, **params)))

    def close(self) -> None:
        """Cancel open streams and stop the loop thread; closing again does nothing, other calls raise."""
        if self._closed:
            return
        try:
            self._call(self._client.close())
        finally:
            self._closed = True
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=5)

    def __enter__(self) -> SyncBusClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SyncStream:
    """Blocking iteration over a `Stream`; `cancel()` may be called from the reading thread."""

    def __init__(self, owner: SyncBusClient, stream: Stream) -> None:
        self._owner = owner
        self.stream = stream
        self._waiting: concurrent.futures.Future | None = None

    def __iter__(self) -> Iterator[protocol.TokenDelta]:
        while True:
            self._waiting = self._owner._submit(self.stream.__anext__())
            while True:
                try:
                    # Short waits, so a KeyboardInterrupt is raised here promptly whatever the platform.
                    delta = self._waiting.result(timeout=0.2)
                    break
                except concurrent.futures.TimeoutError:
                    continue
                except (StopAsyncIteration, concurrent.futures.CancelledError, Cancelled):
                    return
            yield delta

    @property
    def done(self) -> protocol.Done | None:
        return self.stream.done

    def collect(self) -> Completion:
        return self._owner._call(self.stream.collect())

    def cancel(self) -> None:
        """Cancel on the bus; safe from a KeyboardInterrupt handler while iterating."""
        if self._waiting is not None:
            self._waiting.cancel()
        self._owner._call(self.stream.cancel())


def _parsed(parse: Any, reply: Message) -> Any:
    try:
        return parse(reply.fields())
    except protocol.ProtocolError as exc:
        raise BusError(f"malformed {reply.command.value} from the broker: {exc}") from None
