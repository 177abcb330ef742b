"""The asyncio bus client: requests out, their streams in, and the faults it rides out."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import uuid
from collections.abc import Callable
from typing import Any

import zmq
import zmq.asyncio

from broker import protocol, sockets
from broker.auth import CurveKeys
from broker.protocol import Command, EmbeddingRequest, ErrorCode, GenerationRequest, Message, TokenizeRequest
from frontends.client.errors import BadRequest, BrokerUnreachable, BusError, WorkerLost
from frontends.client.stream import BusRequest, Stream

log = logging.getLogger(__name__)

# Seconds a request keeps being sent (again) while the broker is unreachable: a restarted broker and
# its workers are back well within it.
RECONNECT_TIMEOUT = 10.0
MAX_RESUMES = 3  # times one stream is resumed after faults before it fails with the fault's error


def _request(fields: dict[str, Any]) -> GenerationRequest:
    """Checked here already, so a bad parameter fails like every other bus error."""
    try:
        return GenerationRequest.from_fields(fields)
    except protocol.ProtocolError as exc:
        raise BadRequest(str(exc), exc.field) from None


class BusClient:
    """An asyncio DEALER connection to the broker.

    A request cut by a fault is sent again rather than failed, under a fresh request id (cancelling
    the old one): when its send finds no broker connected, when the broker answers a heartbeat with
    `unknown_request` (it restarted and forgot the request), when the broker falls silent for its
    liveness (3 heartbeat intervals), and when the broker reports its worker lost (`worker_lost`).
    A request that has produced tokens is resumed: sent with the ids of the tokens delivered
    (`resume_ids`), so that a worker continues the answer where it was cut, and the stream reads on
    as if nothing happened. It keeps trying while the broker has been unreachable for less than
    `reconnect_timeout` seconds; a stream is resumed at most `max_resumes` times, and never after a
    second lost worker; otherwise it fails with the fault's error (`BrokerUnreachable`, `WorkerLost`).
    """

    def __init__(self, address: str, *, heartbeat_interval: float = protocol.HEARTBEAT_INTERVAL,
                 reconnect_timeout: float = RECONNECT_TIMEOUT, max_resumes: int = MAX_RESUMES,
                 curve: CurveKeys | None = None) -> None:
        self.address = address
        self.max_resumes = max_resumes
        self.curve = curve  # this client's keys and the broker's, for a broker that requires CURVE
        self.reconnect_timeout = reconnect_timeout
        self._interval = heartbeat_interval
        self._liveness = heartbeat_interval * protocol.HEARTBEAT_LIVENESS
        self._context = zmq.asyncio.Context.instance()
        self._socket: zmq.asyncio.Socket | None = None
        self._streams: dict[bytes, Stream] = {}
        self._replies: dict[bytes, asyncio.Future[Message]] = {}
        self._tasks: list[asyncio.Task] = []
        self._resends: set[asyncio.Task] = set()
        self._last_heard = time.monotonic()

    async def __aenter__(self) -> BusClient:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> None:
        self._socket = sockets.dealer(self._context, self.address, immediate=True, curve=self.curve)
        self._tasks = [asyncio.create_task(self._receive_loop()), asyncio.create_task(self._heartbeat_loop())]

    async def close(self) -> None:
        for stream in list(self._streams.values()):
            await stream.cancel()
        for task in [*self._tasks, *self._resends]:
            task.cancel()
        await asyncio.gather(*self._tasks, *self._resends, return_exceptions=True)
        if self._socket is not None:
            self._socket.close(linger=0)
            self._socket = None

    @property
    def open_streams(self) -> tuple[Stream, ...]:
        """The streams whose requests are still waited for."""
        return tuple(self._streams.values())

    # -- requests

    async def generate(self, request: BusRequest) -> Stream:
        """Send one request; the returned stream yields its tokens (an EMBED's or a TOKENIZE's stream
        yields none and holds its answer in `embeddings` or `tokens` once read to the end)."""
        request_id = uuid.uuid4().bytes
        try:
            body = protocol.pack_body(request.to_fields())
        except protocol.ProtocolError as exc:
            raise BadRequest(str(exc)) from None
        stream = Stream(self, request, request_id, body)
        if not self._streams and not self._replies:
            self._last_heard = time.monotonic()
        self._streams[request_id] = stream
        try:
            await self._send_request(stream)
        except BaseException:  # unreachable, or the caller cancelled while it waited to send
            self._streams.pop(stream.request_id, None)
            raise
        return stream

    async def chat(self, model: str, messages: list[dict[str, str]], **params: Any) -> Stream:
        return await self.generate(_request({"model": model, "messages": messages, **params}))

    async def complete(self, model: str, prompt: str, **params: Any) -> Stream:
        return await self.generate(_request({"model": model, "prompt": prompt, **params}))

    async def embed(self, model: str, inputs: list[str] | list[list[int]],
                    dimensions: int | None = None) -> protocol.Embeddings:
        """Vectors for texts (or token-id lists), in one answer."""
        try:
            request = EmbeddingRequest.from_fields({"model": model, "input": inputs, "dimensions": dimensions})
        except protocol.ProtocolError as exc:
            raise BadRequest(str(exc), exc.field) from None
        stream = await self._answer(request)
        assert stream.embeddings is not None
        return stream.embeddings

    async def tokenize(self, model: str, *, prompt: str | None = None, messages: list[dict[str, Any]] | None = None,
                       tools: dict[str, Any] | None = None, add_special_tokens: bool = True) -> protocol.Tokens:
        """The token ids a REQUEST with this prompt, or these messages (and tools, as `GenerationRequest`
        carries them), would start from: encoded by a worker of `model`, with its chat template."""
        return await self._tokens({"model": model, "prompt": prompt, "messages": messages, "tools": tools,
                                   "add_special_tokens": add_special_tokens})

    async def detokenize(self, model: str, tokens: list[int]) -> str:
        """The text of token ids, special tokens included, decoded by a worker of `model`."""
        return (await self._tokens({"model": model, "tokens": tokens})).text

    async def _tokens(self, fields: dict[str, Any]) -> protocol.Tokens:
        try:
            request = TokenizeRequest.from_fields({k: v for k, v in fields.items() if v is not None})
        except protocol.ProtocolError as exc:
            raise BadRequest(str(exc), exc.field) from None
        stream = await self._answer(request)
        assert stream.tokens is not None
        return stream.tokens

    async def _answer(self, request: EmbeddingRequest | TokenizeRequest) -> Stream:
        """Send a request answered in one message, and wait for that answer. Like a request that has
        produced no token yet, it is always safe to send again after a broker restart."""
        stream = await self.generate(request)
        try:
            async for _ in stream:
                pass
        finally:
            await stream.cancel()  # a no-op once answered; stops it when the caller gives up waiting
        return stream

    async def models(self) -> list[protocol.ModelInfo]:
        """The models served now, with their live workers."""
        reply = await self._ask(Command.LIST_MODELS)
        return _parsed(protocol.parse_model_list, reply)

    async def workers(self) -> list[protocol.WorkerInfo]:
        reply = await self._ask(Command.LIST_WORKERS)
        return _parsed(protocol.parse_worker_list, reply)

    # -- what streams ask of their client

    async def cancel_request(self, request_id: bytes) -> None:
        try:
            await self._send(Command.CANCEL, request_id, wait=False)
        except BrokerUnreachable:
            pass  # nothing to stop: a broker that lost this client forgets its requests

    def release(self, stream: Stream) -> None:
        if self._streams.get(stream.request_id) is stream:
            del self._streams[stream.request_id]

    # -- sending

    async def _ask(self, command: Command) -> Message:
        request_id = uuid.uuid4().bytes
        future: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        self._replies[request_id] = future
        try:
            await self._send(command, request_id)
            return await asyncio.wait_for(future, self._liveness)
        except TimeoutError:
            raise BrokerUnreachable(f"the broker at {self.address} did not answer") from None
        finally:
            self._replies.pop(request_id, None)

    async def _send(self, command: Command, request_id: bytes = b"", body: dict | None = None, *,
                    wait: bool = True) -> None:
        """Send, waiting at most the broker's liveness for it to be connected (or not at all: `wait` False)."""
        if not await self._send_frames(protocol.encode(command, request_id, body), self._liveness if wait else 0):
            raise BrokerUnreachable(f"the broker at {self.address} is not connected")

    async def _send_request(self, stream: Stream) -> None:
        """Send a stream's request, waiting for a broker while one has been heard from within
        `reconnect_timeout` (and at least the broker's liveness)."""
        frames = protocol.encode(_command(stream.request), stream.request_id, stream.body)
        wait = max(self._last_heard + self.reconnect_timeout - time.monotonic(), self._liveness)
        if not await self._send_frames(frames, wait, unless=lambda: stream.finished):
            raise BrokerUnreachable(f"the broker at {self.address} is not connected")
        stream.sent_at = time.monotonic()
        stream.num_sends += 1

    async def _send_frames(self, frames: list[bytes], wait: float, unless: Callable[[], bool] = lambda: False) -> bool:
        """Send once the broker is connected, waiting at most `wait` seconds; False if it never was.
        `unless` is asked just before sending: True skips the send (and counts as sent)."""
        if self._socket is None:
            raise BrokerUnreachable("the bus client is closed")
        deadline = time.monotonic() + wait
        while True:
            # Never a blocking send: a pending one would hold up every later send, NOBLOCK ones too.
            # With ZMQ_IMMEDIATE the socket is writable only while a broker is connected.
            remaining_ms = max(0, int((deadline - time.monotonic()) * 1000))
            try:
                if await self._socket.poll(remaining_ms, zmq.POLLOUT):
                    if not unless():
                        await self._socket.send_multipart(frames, zmq.NOBLOCK)
                    return True
            except zmq.Again:  # the broker went away between the poll and the send
                pass
            if time.monotonic() >= deadline:
                return False

    # -- sending again

    def _retry(self, stream: Stream, cause: BusError) -> None:
        """Send a request again: from the start if it has produced no token, else resumed after the
        tokens delivered; or fail its stream with `cause` when it may not be."""
        if stream.finished:
            return
        if stream.first_token_at is not None and not self._resume(stream, cause):
            self._fail(stream, cause)
            return
        self._send_again(stream, cause)

    def _send_again(self, stream: Stream, cause: BusError, delay: float = 0.0) -> None:
        """Send a stream's request again under a fresh id (after `delay` seconds), with the time it has left."""
        if not _time_left(stream):
            self._fail(stream, cause)
            return
        old_id = stream.request_id
        self._streams.pop(old_id, None)
        stream.request_id, stream.sent_at = uuid.uuid4().bytes, None  # unsent: no heartbeat names it
        self._streams[stream.request_id] = stream
        task = asyncio.create_task(self._resend(stream, old_id, cause, delay))
        self._resends.add(task)
        task.add_done_callback(self._resends.discard)

    def _awaits_a_worker(self, stream: Stream, message: Message) -> bool:
        """A resumed request that finds no worker of its model waits for one to come back (a restarted
        worker, say), as long as a request waits for a restarted broker."""
        if stream.fault_at is None or time.monotonic() - stream.fault_at >= self.reconnect_timeout:
            return False
        try:
            return protocol.Error.from_fields(message.fields()).code is ErrorCode.NO_WORKER
        except protocol.ProtocolError:
            return False

    def _resume(self, stream: Stream, cause: BusError) -> bool:
        """Make a started stream's request continue after its delivered tokens, if it may: its tokens
        are known, it has resumes left, and it has not lost a worker before (a request that kills
        every worker it reaches must not go round the fleet)."""
        lost = isinstance(cause, WorkerLost)
        if not stream.resumable or stream.num_resumes >= self.max_resumes or (lost and stream.num_workers_lost):
            return False
        assert isinstance(stream.request, GenerationRequest)
        try:
            stream.request = dataclasses.replace(stream.request, resume_ids=tuple(stream.delivered_ids))
        except protocol.ProtocolError:  # more tokens than the request allows: nothing sane to continue
            return False
        stream.num_resumes += 1
        stream.num_workers_lost += lost
        stream.fault, stream.fault_at = cause, time.monotonic()
        return True

    async def _resend(self, stream: Stream, old_id: bytes, cause: BusError, delay: float = 0.0) -> None:
        log.info("sending request %s again as %s (%s)", old_id.hex(), stream.request_id.hex(), cause.message)
        await self.cancel_request(old_id)  # a broker that was only slow must not run it twice
        await asyncio.sleep(delay)
        try:
            await self._send_request(stream)
        except (BusError, protocol.ProtocolError):  # no broker, or the request grew past the size limit
            self._fail(stream, cause)

    def _fail(self, stream: Stream, error: BusError) -> None:
        self._streams.pop(stream.request_id, None)
        stream.deliver(error)

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
            if message.command in (Command.TOKEN, Command.DONE, Command.EMBEDDINGS, Command.TOKENS, Command.ERROR):
                stream = self._streams.get(message.request_id)
                if stream is None:
                    continue
                fault = _fault(message)
                if fault is not None:
                    self._retry(stream, fault)
                elif self._awaits_a_worker(stream, message):
                    self._send_again(stream, stream.fault, delay=self._interval)
                else:
                    stream.deliver(message)
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
            now = time.monotonic()
            for stream in list(self._streams.values()):
                # A stream still being sent has its own deadline; a sent one is judged by the broker's
                # silence since it went out.
                if stream.sent_at is not None and now - max(self._last_heard, stream.sent_at) > self._liveness:
                    error = BrokerUnreachable(f"the broker at {self.address} stopped answering")
                    if now - self._last_heard < self.reconnect_timeout:
                        self._retry(stream, error)
                    else:
                        self._fail(stream, error)
            # A stream still waiting to send is unknown to the broker, which would fail it.
            sent = tuple(request_id for request_id, stream in self._streams.items() if stream.sent_at is not None)
            heartbeat = protocol.ClientHeartbeat(sent)
            try:
                await self._send(Command.HEARTBEAT, b"", heartbeat.to_fields(), wait=False)
            except (zmq.ZMQError, BusError) as exc:  # the silence check above still ends the streams in time
                log.debug("heartbeat not sent: %s", exc)


_COMMANDS = {GenerationRequest: Command.REQUEST, EmbeddingRequest: Command.EMBED, TokenizeRequest: Command.TOKENIZE}


def _command(request: BusRequest) -> Command:
    return _COMMANDS[type(request)]


def _time_left(stream: Stream) -> bool:
    """A request with a `timeout` is sent again with what is left of it, if anything is."""
    if stream.deadline is None:
        return True
    left = stream.deadline - time.monotonic()
    if left <= 0:
        return False
    assert isinstance(stream.request, GenerationRequest)
    stream.request = dataclasses.replace(stream.request, timeout=left)
    return True


def _fault(message: Message) -> BrokerUnreachable | WorkerLost | None:
    """An ERROR that a fault, not the request, caused: `unknown_request` (the broker restarted and lost
    the request) or `worker_lost`; as the error the stream ends with when it is not sent again."""
    if message.command is not Command.ERROR:
        return None
    try:
        error = protocol.Error.from_fields(message.fields())
    except protocol.ProtocolError:
        return None  # the stream reports it
    if error.code is ErrorCode.UNKNOWN_REQUEST:
        return BrokerUnreachable(error.message)
    if error.code is ErrorCode.WORKER_LOST:
        return WorkerLost(error.message)
    return None


def _parsed(parse: Any, reply: Message) -> Any:
    try:
        return parse(reply.fields())
    except protocol.ProtocolError as exc:
        raise BusError(f"malformed {reply.command.value} from the broker: {exc}") from None
