"""The worker's sockets: a DEALER to the broker, and an inproc pair to the engine thread.

The socket thread never runs the model, so heartbeats keep flowing while a long prefill runs;
the engine thread never touches the broker's socket (ZeroMQ sockets are not thread-safe). This
module is where REQUEST bodies become typed requests and the engine's events become frames.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import threading
import time
import uuid

import zmq

from broker import protocol, sockets
from broker.auth import CurveKeys
from broker.protocol import (
    REQUEST_BODIES,
    TASK_OF_COMMAND,
    Command,
    ErrorCode,
    FinishReason,
    Message,
    ProtocolError,
)
from worker.engine_api import DoneEvent, EmbeddingsEvent, ErrorEvent, Event, TokenEvent, TokensEvent, WorkerEngine

log = logging.getLogger(__name__)

# The broker has forgotten this worker, so its requests have no client left: the socket thread sends
# _DROP_ALL down the engine pipe, drops the engine's events until _DROPPED comes back, then announces.
_DROP_ALL = [b"drop-all"]
_DROPPED = [b"dropped"]
# A handshake the broker refused: this worker's key is not in its allowlist, or it has none and the broker needs one.
_REFUSED_HANDSHAKES = zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
_REFUSAL_LOG_INTERVAL = 10.0  # seconds between repeated errors about the same refusal
# The engine's last message for a request (frame 1: the command): the request is no longer held.
_ENDINGS = frozenset(c.value.encode() for c in (Command.DONE, Command.ERROR, Command.EMBEDDINGS, Command.TOKENS))


class WorkerServer:
    """Announces the engine's models to the broker and shuttles requests and events."""

    def __init__(self, engine: WorkerEngine, ready: protocol.Ready, broker: str,
                 heartbeat_interval: float = protocol.HEARTBEAT_INTERVAL, context: zmq.Context | None = None,
                 curve: CurveKeys | None = None, drain_timeout: float = 0.0) -> None:
        self.engine = engine
        self.curve = curve
        self.ready = ready
        self.broker = broker
        self.interval = heartbeat_interval
        self._context = context or zmq.Context.instance()
        self._pipe_address = f"inproc://engine-{uuid.uuid4().hex}"
        # One routing identity for every socket this worker opens: after a reconnect the broker sees
        # the same peer, whose new READY replaces its old entry, so a READY still queued in the old
        # socket cannot leave a second, stale entry behind.
        self.identity = b"w" + os.urandom(15)  # ZeroMQ reserves ids that start with a zero byte
        self._dropping = False  # a _DROP_ALL is on its way through the engine
        self._announced_at = -float("inf")
        self._last_refusal_log = -float("inf")
        self.stopping = threading.Event()
        self.drain_timeout = drain_timeout
        self._drain_started: float | None = None  # when `stop` was first asked: draining since
        self._drain_sent_at: float | None = None  # when the broker was last told
        self._drain_acked = False  # the broker answered that DRAIN: every request it sent has arrived
        self._held: set[bytes] = set()  # requests passed to the engine and not yet ended by it

    @staticmethod
    def make_worker_id() -> str:
        return f"{socket.gethostname()}-{os.getpid()}"

    def stop(self) -> None:
        """Leave gracefully: tell the broker to send nothing new, finish what is held (at most
        `drain_timeout` seconds), then leave. Asked again, leave at once."""
        if self._drain_started is None and self.drain_timeout > 0:
            self._drain_started = time.monotonic()
        else:
            self.stopping.set()

    def run(self) -> None:
        """Serve until `stopping` is set; then tell the broker goodbye."""
        pipe = self._context.socket(zmq.PAIR)
        pipe.bind(self._pipe_address)
        engine_thread = threading.Thread(target=self._engine_loop, name="engine", daemon=True)
        engine_thread.start()
        dealer = self._connect()
        monitor = self._monitor(dealer)
        self._announce(dealer)
        poller = zmq.Poller()
        poller.register(pipe, zmq.POLLIN)
        poller.register(dealer, zmq.POLLIN)
        poller.register(monitor, zmq.POLLIN)
        last_heard = next_heartbeat = time.monotonic()
        while not self.stopping.is_set():
            events = dict(poller.poll(self.interval * 250))
            if pipe in events:
                while pipe.poll(0):
                    self._from_engine(dealer, pipe.recv_multipart())
            if dealer in events:
                last_heard = time.monotonic()
                while dealer.poll(0):
                    self._from_broker(pipe, dealer.recv_multipart())
            if monitor in events:
                self._log_refused_handshakes(monitor)
            now = time.monotonic()
            if now - last_heard > self.interval * protocol.HEARTBEAT_LIVENESS:
                log.warning("broker silent for %.1fs; reconnecting", now - last_heard)
                poller.unregister(dealer)
                poller.unregister(monitor)
                self._close(dealer, monitor, linger=0)
                dealer = self._connect()
                monitor = self._monitor(dealer)
                self._drop_all(pipe)
                poller.register(dealer, zmq.POLLIN)
                poller.register(monitor, zmq.POLLIN)
                last_heard = now
            if now >= next_heartbeat:
                self._forward(dealer, protocol.encode(Command.HEARTBEAT, b"", {"worker_id": self.ready.worker_id}))
                next_heartbeat = now + self.interval
            if self._drain_started is not None:
                self._drain(dealer, now)
        self._forward(dealer, protocol.encode(Command.DISCONNECT))
        self._close(dealer, monitor, linger=500)
        pipe.close(linger=0)

    @staticmethod
    def _forward(dealer: zmq.Socket, frames: list[bytes]) -> None:
        try:
            dealer.send_multipart(frames, zmq.NOBLOCK)
        except zmq.Again:  # only with a broker gone for long (the queue is deep): nobody waits for it any more
            log.debug("dropped a message for an unreachable broker")

    def _connect(self) -> zmq.Socket:
        return sockets.dealer(self._context, self.broker, identity=self.identity, curve=self.curve)

    @staticmethod
    def _monitor(dealer: zmq.Socket) -> zmq.Socket:
        """Refused handshakes, which libzmq otherwise retries in silence."""
        return dealer.get_monitor_socket(_REFUSED_HANDSHAKES)

    @staticmethod
    def _close(dealer: zmq.Socket, monitor: zmq.Socket, linger: int) -> None:
        dealer.disable_monitor()
        monitor.close(linger=0)
        dealer.close(linger=linger)

    def _log_refused_handshakes(self, monitor: zmq.Socket) -> None:
        while monitor.poll(0):
            monitor.recv_multipart()
            if self.curve is None:
                self._log_refusal("the broker refused this worker's connection: it requires CURVE keys "
                                  "(--curve-key and --broker-key)")
            else:
                self._log_refusal("the broker refused this worker's CURVE key: is its public half in the broker's "
                                  "workers/ key folder, and --broker-key the broker's own public key?")

    def _log_refusal(self, text: str) -> None:
        now = time.monotonic()
        if now - self._last_refusal_log >= _REFUSAL_LOG_INTERVAL:
            log.error(text)
            self._last_refusal_log = now

    def _drop_all(self, pipe: zmq.Socket) -> None:
        """Start afresh: the engine drops every request, then (in `_from_engine`) the worker announces."""
        if not self._dropping:
            self._dropping = True
            pipe.send_multipart(_DROP_ALL)

    def _drain(self, dealer: zmq.Socket, now: float) -> None:
        """While draining: DRAIN to the broker (again after each READY), and leave once the engine
        holds nothing and the broker has answered the DRAIN (every request it sent before arrived
        first; a heartbeat interval stands in for a broker that does not answer), or when the drain
        timeout runs out."""
        if self._drain_sent_at is None or self._drain_sent_at < self._announced_at:
            log.info("draining: no new requests; finishing those held (at most %.0fs)", self.drain_timeout)
            self._forward(dealer, protocol.encode(Command.DRAIN))
            self._drain_sent_at, self._drain_acked = now, False
        settled = self._drain_acked or now - self._drain_sent_at >= self.interval
        idle = not self._held and settled
        assert self._drain_started is not None
        if idle or now - self._drain_started >= self.drain_timeout:
            if not idle:
                log.warning("drain timeout: leaving with requests still running (their clients resume them elsewhere)")
            self.stopping.set()

    def _announce(self, dealer: zmq.Socket) -> None:
        self._forward(dealer, protocol.encode(Command.READY, b"", self.ready.to_fields()))
        self._announced_at = time.monotonic()
        log.info("announced %s (capacity %d) to %s", list(self.ready.models), self.ready.capacity, self.broker)

    def _from_broker(self, pipe: zmq.Socket, frames: list[bytes]) -> None:
        try:
            message = protocol.decode(frames)
        except protocol.ProtocolError as exc:
            log.warning("dropping malformed message from the broker: %s", exc)
            return
        if message.command in (*REQUEST_BODIES, Command.CANCEL):
            if message.command in REQUEST_BODIES:
                self._held.add(message.request_id)
            pipe.send_multipart(frames)
        elif message.command is Command.DRAIN:
            self._drain_acked = True
        elif message.command is Command.REANNOUNCE:
            # Messages sent before our last READY reached the broker may still ask for another one.
            if time.monotonic() - self._announced_at >= self.interval:
                self._drop_all(pipe)
        elif message.command is Command.ERROR and message.fields().get("code") == ErrorCode.FORBIDDEN.value:
            self._log_refusal(f"the broker refused this worker: {message.fields().get('message')} (its key must be in "
                              "the broker's workers/ folder, not clients/); it will receive no requests")
        elif message.command is not Command.HEARTBEAT:
            log.warning("unexpected %s from the broker", message.command.value)

    def _from_engine(self, dealer: zmq.Socket, frames: list[bytes]) -> None:
        if frames == _DROPPED:
            self._dropping = False
            self._held.clear()
            self._announce(dealer)
        elif not self._dropping:
            if frames[1] in _ENDINGS:
                self._held.discard(frames[2])
            self._forward(dealer, frames)
        # else: an event of a dropped request, which no broker knows any more

    # -- engine thread

    def _engine_loop(self) -> None:
        pipe = self._context.socket(zmq.PAIR)
        pipe.connect(self._pipe_address)
        try:
            while not self.stopping.is_set():
                # Idle: wait for work. Busy: only pick up what arrived since the last step.
                timeout = 0 if self.engine.has_work else 100
                while pipe.poll(timeout):
                    frames = pipe.recv_multipart()
                    if frames == _DROP_ALL:
                        self.engine.drop_all()
                        pipe.send_multipart(_DROPPED)
                    else:
                        self._send(pipe, self.on_command(protocol.decode(frames)))
                    timeout = 0
                if self.engine.has_work:
                    self._send(pipe, self.engine.step())
        except Exception:
            # A worker without an engine must not keep heartbeating: leave, so the broker fails its requests.
            log.exception("the engine thread failed; stopping the worker")
            self.stopping.set()
        finally:
            pipe.close(linger=0)

    def on_command(self, message: Message) -> list[Event]:
        if message.command is Command.CANCEL:
            deadline = message.fields().get("reason") == "deadline"
            # nothing, for a request that already ended
            return self.engine.cancel(message.request_id, FinishReason.DEADLINE if deadline else FinishReason.CANCELLED)
        task = TASK_OF_COMMAND[message.command]
        if task not in self.ready.tasks:  # the broker routes by task: only a confused peer gets here
            return [ErrorEvent(message.request_id, protocol.Error(
                ErrorCode.BAD_REQUEST, f"this worker does not serve '{task.value}' requests"))]
        try:
            request = REQUEST_BODIES[message.command].from_fields(message.fields())
        except ProtocolError as exc:
            return [ErrorEvent(message.request_id, protocol.Error(ErrorCode.BAD_REQUEST, str(exc), exc.field))]
        try:
            return self.engine.add(message.request_id, request)
        except Exception as exc:  # e.g. a chat template that raises on these messages
            log.exception("could not admit request %s", message.request_id.hex())
            return [ErrorEvent(message.request_id,
                               protocol.Error(ErrorCode.INTERNAL, f"could not admit the request: {exc}"))]

    def _send(self, pipe: zmq.Socket, events: list[Event]) -> None:
        for event in events:
            if isinstance(event, DoneEvent):  # signed, so that a client can tell which worker served it
                event = DoneEvent(event.request_id, dataclasses.replace(event.done, worker_id=self.ready.worker_id))
            pipe.send_multipart(event_frames(event))


def event_frames(event: Event) -> list[bytes]:
    """The message an engine event becomes on the bus."""
    match event:
        case TokenEvent(request_id, delta):
            return protocol.encode(Command.TOKEN, request_id, delta.to_fields())
        case DoneEvent(request_id, done):
            return protocol.encode(Command.DONE, request_id, done.to_fields())
        case TokensEvent(request_id, tokens):
            return protocol.encode(Command.TOKENS, request_id, tokens.to_fields())
        case EmbeddingsEvent(request_id, embeddings):
            return protocol.encode(Command.EMBEDDINGS, request_id, embeddings.to_fields())
        case ErrorEvent(request_id, error):
            return protocol.encode(Command.ERROR, request_id, error.to_fields())
    raise TypeError(f"not an engine event: {event!r}")
