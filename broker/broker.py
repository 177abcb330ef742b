"""The broker: one ROUTER socket, one loop of poll -> route -> purge dead peers -> heartbeat."""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import zmq

from broker import protocol, sockets
from broker.config import BrokerSettings
from broker.protocol import Command, ErrorCode, Message
from broker.registry import WorkerRecord, WorkerRegistry, choose_worker

log = logging.getLogger(__name__)

_WORKER_REPLIES = (Command.TOKEN, Command.DONE, Command.ERROR)


@dataclass(slots=True)
class PendingRequest:
    """A client's request, queued (`worker is None`) or running on a worker."""

    request_id: bytes
    client: bytes | None  # None once the client cancelled or vanished
    model: str
    body: bytes
    enqueued_at: float
    worker: bytes | None = None
    started: bool = False  # a token has reached the client, so it cannot be retried


@dataclass(slots=True)
class ClientRecord:
    last_seen: float
    requests: set[bytes] = field(default_factory=set)
    heartbeats: bool = False  # only clients that heartbeat can be judged by their silence


class Broker:
    """Routes requests from clients to workers and their token streams back."""

    def __init__(self, settings: BrokerSettings, context: zmq.Context | None = None) -> None:
        self.settings = settings
        self._context = context or zmq.Context.instance()
        self._socket = sockets.router(self._context)
        self.workers = WorkerRegistry()
        self._requests: dict[bytes, PendingRequest] = {}
        self._queues: dict[str, deque[bytes]] = {}
        self._clients: dict[bytes, ClientRecord] = {}
        self._unreachable_clients: set[bytes] = set()  # forgotten in `_purge`, never in the middle of a send
        self._reannounced: dict[bytes, float] = {}  # unknown workers asked to announce, and when
        self._models_seen: set[str] = set()
        # Until then, workers that served this broker's predecessor may still be re-announcing: a
        # request for a model none has announced waits for them instead of failing at once.
        self._announcing_until: float | None = None
        self._next_heartbeat = 0.0
        self._num_malformed = 0
        self._last_malformed_log = 0.0
        self.stopping = threading.Event()

    @property
    def _timeout(self) -> float:
        return self.settings.heartbeat_interval * protocol.HEARTBEAT_LIVENESS

    def bind(self) -> None:
        self._socket.bind(self.settings.bind)
        self._announcing_until = time.monotonic() + self._timeout
        log.info("broker listening on %s", self.settings.bind)

    def run(self) -> None:
        """Serve until `stopping` is set."""
        poller = zmq.Poller()
        poller.register(self._socket, zmq.POLLIN)
        while not self.stopping.is_set():
            wait = max(0.0, min(self._next_heartbeat - time.monotonic(), 0.1))
            if poller.poll(wait * 1000):
                self._drain()
            now = time.monotonic()
            try:
                self._purge(now)
                if now >= self._next_heartbeat:
                    self._send_heartbeats()
            except Exception:  # a bug must never stop the loop
                log.exception("housekeeping failed")
            if now >= self._next_heartbeat:
                self._next_heartbeat = now + self.settings.heartbeat_interval
        self._socket.close(linger=0)

    def _drain(self) -> None:
        for _ in range(10_000):  # bounded, so purge and heartbeats still get their turn
            try:
                frames = self._socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                self._route(frames)
            except Exception:  # even answering a bad message went wrong: drop it, keep serving
                log.exception("failed to answer a message from %s", frames[0].hex())

    # -- routing

    def _route(self, frames: list[bytes]) -> None:
        identity, payload = frames[0], frames[1:]
        message = None
        try:
            message = protocol.decode(payload)
            self._handle(identity, message, time.monotonic())
        except protocol.ProtocolError as exc:
            self._reject(identity, payload, exc)
        except Exception as exc:  # a bug must cost one message, never the broker
            log.exception("failed to handle a message from %s", identity.hex())
            if message is not None and message.command is Command.REQUEST and message.request_id:
                self._abort(message.request_id, identity, exc)

    def _handle(self, identity: bytes, message: Message, now: float) -> None:
        worker = self.workers.get(identity)
        if worker is not None:
            worker.last_seen = now
        command = message.command
        if command is Command.READY:
            self._on_ready(identity, protocol.Ready.from_fields(message.fields()), now)
        elif command in _WORKER_REPLIES:
            self._on_worker_reply(identity, worker, message)
        elif command is Command.DISCONNECT:
            if worker is not None:
                log.info("worker %s disconnected", worker.ready.worker_id)
                self._remove_worker(worker)
        elif command is Command.HEARTBEAT:
            self._on_heartbeat(identity, worker, message.fields(), now)
        elif command is Command.REQUEST:
            self._on_request(identity, message, now)
        elif command is Command.CANCEL:
            self._on_cancel(identity, message.request_id)
        elif command is Command.LIST_MODELS:
            self._send(identity, Command.MODELS, message.request_id, protocol.model_list_fields(self._model_infos()))
        elif command is Command.LIST_WORKERS:
            self._send(identity, Command.WORKERS, message.request_id, protocol.worker_list_fields(self._worker_infos(now)))
        else:
            raise protocol.ProtocolError(f"{command.value} is not a command the broker accepts")

    def _reject(self, identity: bytes, payload: list[bytes], exc: protocol.ProtocolError) -> None:
        self._num_malformed += 1
        now = time.monotonic()
        if now - self._last_malformed_log > 5.0:
            log.warning("dropped malformed message (%d so far): %s", self._num_malformed, exc)
            self._last_malformed_log = now
        request_id = payload[2] if len(payload) == 4 and len(payload[2]) == protocol.REQUEST_ID_SIZE else b""
        if len(payload) == 4 and payload[0] == protocol.PROTOCOL_SIGNATURE:
            self._send_error(identity, request_id, ErrorCode.BAD_REQUEST, str(exc))
        worker = self.workers.get(identity)
        if worker is not None and request_id in worker.requests:
            self._on_bad_reply(worker, self._requests[request_id], exc)

    def _on_bad_reply(self, worker: WorkerRecord, request: PendingRequest, exc: protocol.ProtocolError) -> None:
        """A worker's reply to a request was malformed: a lost token or ending must not go unnoticed,
        so the request fails, the worker is told to stop it, and its slot is free at once."""
        log.warning("worker %s sent a malformed reply to request %s: %s", worker.ready.worker_id,
                    request.request_id.hex(), exc)
        self._send(worker.identity, Command.CANCEL, request.request_id)
        self._fail(request, ErrorCode.INTERNAL, f"worker {worker.ready.worker_id} sent a malformed reply: {exc}")
        self._dispatch_models(worker.ready.models, time.monotonic())

    def _abort(self, request_id: bytes, identity: bytes, exc: Exception) -> None:
        """A request the broker failed on: its client still gets an ending."""
        request = self._requests.get(request_id)
        if request is not None and request.client == identity:
            if request.worker is not None:
                self._send(request.worker, Command.CANCEL, request_id)
            elif request_id in self._queues.get(request.model, ()):
                self._queues[request.model].remove(request_id)
            self._fail(request, ErrorCode.INTERNAL, f"the broker failed on this request: {exc}")
        elif request is None:
            self._send_error(identity, request_id, ErrorCode.INTERNAL, f"the broker failed on this request: {exc}")

    # -- workers

    def _on_ready(self, identity: bytes, ready: protocol.Ready, now: float) -> None:
        # A worker announces again only after losing the broker, and then it has dropped its work:
        # its new self starts empty, and what the old one held is settled as if it had died.
        previous = self.workers.remove(identity)
        self.workers.add(identity, ready, now)
        self._reannounced.pop(identity, None)
        self._models_seen.update(ready.models)
        log.info("worker %s ready: models %s, capacity %d", ready.worker_id, list(ready.models), ready.capacity)
        if previous is not None:
            self._settle(previous)
        self._dispatch_models(ready.models, now)

    def _on_worker_reply(self, identity: bytes, worker: WorkerRecord | None, message: Message) -> None:
        request = self._requests.get(message.request_id)
        if worker is None or request is None or request.worker != identity:
            # A stream the broker does not know (it restarted, or the request ended): stop it.
            if message.command is Command.TOKEN:
                self._send(identity, Command.CANCEL, message.request_id)
            if worker is None:
                self._ask_to_announce(identity, time.monotonic())
            return
        if request.client is not None:
            self._send(request.client, message.command, message.request_id, message.body)
        if message.command is Command.TOKEN:
            request.started = True
        else:
            self._finish(request)
            # The freed slot may serve any of the worker's models (aliases share it).
            self._dispatch_models(worker.ready.models, time.monotonic())

    def _ask_to_announce(self, identity: bytes, now: float) -> None:
        """An unknown worker (this broker restarted, or declared it dead) gets one REANNOUNCE per
        heartbeat interval, however many of its messages arrive before its READY does."""
        if now - self._reannounced.get(identity, -float("inf")) >= self.settings.heartbeat_interval:
            self._reannounced[identity] = now
            self._send(identity, Command.REANNOUNCE)

    def _remove_worker(self, worker: WorkerRecord) -> None:
        """Forget a worker once, and settle the requests it held."""
        if self.workers.remove(worker.identity) is None:
            return  # already removed (a nested failure got there first)
        self._settle(worker)

    def _settle(self, worker: WorkerRecord) -> None:
        """A worker's requests after it is gone: unstarted ones go back to the front of their queue
        while some worker still serves their model; the rest fail."""
        now = time.monotonic()
        model_served = {m: bool(self.workers.serving(m)) for m in worker.ready.models}
        held = sorted((self._requests[r] for r in worker.requests), key=lambda r: r.enqueued_at)
        worker.requests.clear()
        retry = [r for r in held if not r.started and model_served.get(r.model) and r.client is not None]
        for request in reversed(retry):  # the oldest ends up first
            request.worker, request.enqueued_at = None, now  # its wait for a worker starts again
            self._queues.setdefault(request.model, deque()).appendleft(request.request_id)
            log.info("re-queued request %s from lost worker %s", request.request_id.hex(), worker.ready.worker_id)
        for request in held:
            if request not in retry:
                self._fail(request, ErrorCode.WORKER_LOST, f"worker {worker.ready.worker_id} serving the request was lost")
        for model in [m for m, served in model_served.items() if not served]:
            self._fail_queued(model)
        self._dispatch_models(tuple(m for m, served in model_served.items() if served), now)

    def _on_heartbeat(self, identity: bytes, worker: WorkerRecord | None, fields: dict, now: float) -> None:
        if "worker_id" in fields:
            if worker is None:
                self._ask_to_announce(identity, now)
            return
        client = self._clients.get(identity)
        if client is not None:
            client.last_seen, client.heartbeats = now, True
        for request_id in protocol.ClientHeartbeat.from_fields(fields).request_ids:
            request = self._requests.get(request_id)
            if request is None or request.client != identity:
                self._send_error(identity, request_id, ErrorCode.UNKNOWN_REQUEST,
                                 "the broker does not know this request (it may have restarted)")
        self._send(identity, Command.HEARTBEAT)

    # -- clients

    def _on_request(self, identity: bytes, message: Message, now: float) -> None:
        request_id = message.request_id
        if len(request_id) != protocol.REQUEST_ID_SIZE:
            raise protocol.ProtocolError("REQUEST needs a 16-byte request id")
        if request_id in self._requests:
            self._send_error(identity, request_id, ErrorCode.DUPLICATE_REQUEST, "request id already in use")
            return
        model = protocol.GenerationRequest.from_fields(message.fields()).model
        if not self.workers.serving(model) and self._announcing_until is None:
            self._send_error(identity, request_id, *self._not_served(model))
            return
        queue = self._queues.setdefault(model, deque())
        worker = choose_worker(self.workers, model) if not queue else None
        if worker is None and len(queue) >= self.settings.max_queue:
            self._send_error(identity, request_id, ErrorCode.OVERLOADED,
                             f"every worker for '{model}' is busy and {len(queue)} requests are waiting")
            return
        self._requests[request_id] = PendingRequest(request_id, identity, model, message.body, now)
        self._clients.setdefault(identity, ClientRecord(now)).requests.add(request_id)
        if worker is not None:
            self._assign(self._requests[request_id], worker, now)
        else:
            queue.append(request_id)

    def _not_served(self, model: str) -> tuple[ErrorCode, str]:
        served = ", ".join(sorted(self.workers.models())) or "none"
        if model in self._models_seen:
            return ErrorCode.NO_WORKER, f"no live worker serves model '{model}' now; models served: {served}"
        return ErrorCode.UNKNOWN_MODEL, f"model '{model}' is not served; models served: {served}"

    def _fail_queued(self, model: str) -> None:
        """No worker serves `model`: its waiting requests end now, saying so."""
        queue = self._queues.pop(model, deque())
        code, message = self._not_served(model)
        while queue:
            self._fail(self._requests[queue.popleft()], code, message)

    def _on_cancel(self, identity: bytes, request_id: bytes) -> None:
        request = self._requests.get(request_id)
        if request is not None and request.client == identity:
            self._cancel(request)

    def _cancel(self, request: PendingRequest) -> None:
        """Detach the client; a running request is freed when its worker confirms."""
        self._detach_client(request)
        if request.worker is None:
            queue = self._queues.get(request.model, ())
            if request.request_id in queue:
                queue.remove(request.request_id)
            self._requests.pop(request.request_id, None)
        else:
            self._send(request.worker, Command.CANCEL, request.request_id)

    def _detach_client(self, request: PendingRequest) -> None:
        client = self._clients.get(request.client) if request.client is not None else None
        if client is not None:
            client.requests.discard(request.request_id)
            if not client.requests:
                del self._clients[request.client]
        request.client = None

    def _forget_client(self, identity: bytes) -> None:
        client = self._clients.get(identity)
        if client is not None:
            log.info("client gone; cancelling its %d requests", len(client.requests))
            for request_id in list(client.requests):  # _cancel detaches each in turn
                request = self._requests.get(request_id)
                if request is not None:
                    self._cancel(request)
            self._clients.pop(identity, None)

    # -- dispatch

    def _assign(self, request: PendingRequest, worker: WorkerRecord, now: float) -> None:
        request.worker = worker.identity
        worker.requests.add(request.request_id)
        worker.last_dispatch = now
        worker.num_served += 1
        self._send(worker.identity, Command.REQUEST, request.request_id, request.body)

    def _dispatch_models(self, models: tuple[str, ...], now: float) -> None:
        """Serve the queues of these models (one worker's aliases share its slots), the request that
        has waited longest first, whichever name it used."""
        candidates = set(models)
        while candidates:
            waiting = [model for model in candidates if self._queues.get(model)]
            if not waiting:
                return
            model = min(waiting, key=lambda m: self._requests[self._queues[m][0]].enqueued_at)
            worker = choose_worker(self.workers, model)
            if worker is None:
                candidates.discard(model)
            else:
                self._assign(self._requests[self._queues[model].popleft()], worker, now)

    def _finish(self, request: PendingRequest) -> None:
        self._detach_client(request)
        worker = self.workers.get(request.worker) if request.worker is not None else None
        if worker is not None:
            worker.requests.discard(request.request_id)
        self._requests.pop(request.request_id, None)

    def _fail(self, request: PendingRequest, code: ErrorCode, message: str) -> None:
        if request.client is not None:
            self._send_error(request.client, request.request_id, code, message)
        self._finish(request)

    # -- housekeeping

    def _purge(self, now: float) -> None:
        while self._unreachable_clients:
            self._forget_client(self._unreachable_clients.pop())
        for identity, asked_at in list(self._reannounced.items()):
            if asked_at < now - self._timeout:
                del self._reannounced[identity]
        for worker in self.workers.expired(now - self._timeout):
            log.warning("worker %s silent for %.1fs: removed", worker.ready.worker_id, now - worker.last_seen)
            self._remove_worker(worker)
        for identity, client in list(self._clients.items()):
            if client.heartbeats and client.last_seen < now - protocol.CLIENT_TIMEOUT:
                self._forget_client(identity)
        if self._announcing_until is not None and now >= self._announcing_until:
            self._announcing_until = None
            for model in [m for m in self._queues if not self.workers.serving(m)]:
                self._fail_queued(model)  # nobody announced it in time
        deadline = now - self.settings.queue_timeout
        for model, queue in list(self._queues.items()):
            # Re-queued requests restart their wait, so the oldest may be anywhere in the queue.
            for request_id in [r for r in queue if self._requests[r].enqueued_at < deadline]:
                queue.remove(request_id)
                self._fail(self._requests[request_id], ErrorCode.QUEUE_TIMEOUT,
                           f"waited {self.settings.queue_timeout:.0f}s for a free worker for '{model}'")

    def _send_heartbeats(self) -> None:
        for worker in self.workers:
            self._send(worker.identity, Command.HEARTBEAT)

    def _send_error(self, identity: bytes, request_id: bytes, code: ErrorCode, message: str) -> None:
        self._send(identity, Command.ERROR, request_id, protocol.Error(code, message).to_fields())

    def _send(self, identity: bytes, command: Command, request_id: bytes = b"", body: dict | bytes | None = None) -> None:
        if identity in self._unreachable_clients:
            return
        try:
            self._socket.send_multipart([identity, *protocol.encode(command, request_id, body)], zmq.NOBLOCK)
        except zmq.ZMQError as exc:  # EHOSTUNREACH: the peer is gone; EAGAIN: it stopped reading
            log.info("peer %s unreachable (%s)", identity.hex(), exc.strerror)
            worker = self.workers.get(identity)
            if worker is not None:
                self._remove_worker(worker)
            elif identity in self._clients:
                self._unreachable_clients.add(identity)

    # -- status

    def _model_infos(self) -> list[protocol.ModelInfo]:
        infos = []
        for model in sorted(self.workers.models()):
            workers = self.workers.serving(model)
            infos.append(protocol.ModelInfo(
                name=model,
                workers=len(workers),
                capacity=sum(w.ready.capacity for w in workers),
                in_flight=sum(len(w.requests) for w in workers),
                queued=len(self._queues.get(model, ())),
                context_length=max(w.ready.context_length for w in workers),
            ))
        return infos

    def _worker_infos(self, now: float) -> list[protocol.WorkerInfo]:
        return [protocol.WorkerInfo(w.ready.worker_id, w.ready.models, w.ready.capacity, len(w.requests),
                                    round(now - w.last_seen, 3), w.num_served, w.ready.cache_tokens)
                for w in self.workers]
