"""The broker's logic as a state machine without a socket.

Inputs are what a peer sent (`receive`), that a peer could not be reached (`unreachable`) and the
passing of time (`tick`), each with the current time; each returns the messages to send. The
server (`broker/server.py`) does the I/O. The core reads each message and decides; the `Router`
holds the workers (a `WorkerRegistry`) and the requests (a `RequestTable`) and makes the moves
that follow, `dispatch` saying which request goes where. `status` answers the lists.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from broker import dispatch, protocol
from broker.affinity import request_parts
from broker.auth import Role
from broker.config import BrokerSettings
from broker.outbox import Outgoing
from broker.protocol import REQUEST_BODIES, TASK_OF_COMMAND, Command, ErrorCode, Message
from broker.registry import WorkerRecord
from broker.requests import Request
from broker.routing import Router
from broker.status import model_infos, worker_infos

log = logging.getLogger(__name__)

_WORKER_REPLIES = (Command.TOKEN, Command.DONE, Command.EMBEDDINGS, Command.TOKENS, Command.ERROR)
_WORKER_COMMANDS = (Command.READY, *_WORKER_REPLIES, Command.DRAIN, Command.DISCONNECT)
_LOG_INTERVAL = 5.0  # seconds between warnings about malformed or refused messages
EVERY_ROLE = frozenset(Role)  # a bus without authentication: every peer may do everything


@dataclass(slots=True)
class ClientWatch:
    """When a client was last heard from; only a client that heartbeats is judged by its silence."""

    last_seen: float
    heartbeats: bool = False


class BrokerCore:
    """Routes requests from clients to workers and their token streams back."""

    def __init__(self, settings: BrokerSettings, now: float) -> None:
        self.settings = settings
        self._router = Router(settings)
        # The router's state, named here for short (the metrics read it too)
        self.workers, self.requests, self.stats = self._router.workers, self._router.requests, self._router.stats
        self._out = self._router.out
        self._clients: dict[bytes, ClientWatch] = {}
        self._reannounced: dict[bytes, float] = {}  # unknown workers asked to announce, and when
        # Until then, workers that served this broker's predecessor may still be re-announcing: a
        # request for a model none has announced waits for them instead of failing at once.
        self._announcing_until: float | None = now + self._timeout
        self._next_heartbeat = now
        self._last_warning = {"malformed": -float("inf"), "refused": -float("inf")}

    @property
    def _timeout(self) -> float:
        return self.settings.heartbeat_interval * protocol.HEARTBEAT_LIVENESS

    @property
    def next_tick(self) -> float:
        """When `tick` next has something to do on its own (heartbeats); time-outs are checked then too."""
        return self._next_heartbeat

    # -- inputs

    def receive(self, identity: bytes, frames: list[bytes], now: float,
                roles: frozenset[Role] = EVERY_ROLE) -> list[Outgoing]:
        """A message from a peer, as the frames after its routing identity; `roles`: what its key
        may do (on a bus without keys, everything)."""
        try:
            message = protocol.decode(frames)
        except protocol.ProtocolError as exc:
            # Answered only where the sender speaks the protocol enough to read an answer.
            answerable = len(frames) == 4 and frames[0] == protocol.PROTOCOL_SIGNATURE
            request_id = frames[2] if answerable and len(frames[2]) == protocol.REQUEST_ID_SIZE else b""
            self._reject(identity, request_id, exc, now, answer=answerable)
            return self._out.take()
        return self.handle(identity, message, now, roles)

    def handle(self, identity: bytes, message: Message, now: float,
               roles: frozenset[Role] = EVERY_ROLE) -> list[Outgoing]:
        """A decoded message from a peer."""
        try:
            if roles is EVERY_ROLE or self._role_needed(message) in roles:
                self._handle(identity, message, now)
            else:
                self._refuse(identity, message, roles, now)
        except protocol.ProtocolError as exc:
            self._reject(identity, message.request_id, exc, now, answer=True)
        except Exception as exc:  # a bug must cost one message, never the broker
            log.exception("failed to handle a message from %s", identity.hex())
            if message.command in REQUEST_BODIES:  # REQUEST and EMBED: their client waits for an ending
                self._abort(identity, message.request_id, exc)
        return self._out.take()

    def unreachable(self, identity: bytes, now: float) -> list[Outgoing]:
        """A send to this peer failed: it is gone (or stopped reading)."""
        worker = self.workers.get(identity)
        if worker is not None:
            log.info("worker %s unreachable: removed", worker.ready.worker_id)
            self.stats.num_workers_lost += 1
            self._router.remove_worker(worker, now)
        elif identity in self._clients:
            self._forget_client(identity)
        return self._out.take()

    def tick(self, now: float) -> list[Outgoing]:
        """Time passes: dead peers, waits that ran out, heartbeats that are due."""
        for identity, asked_at in list(self._reannounced.items()):
            if asked_at < now - self._timeout:
                del self._reannounced[identity]
        for worker in self.workers.expired(now - self._timeout):
            log.warning("worker %s silent for %.1fs: removed", worker.ready.worker_id, now - worker.last_seen)
            self.stats.num_workers_lost += 1
            self._router.remove_worker(worker, now)
        for identity, client in list(self._clients.items()):
            if not self.requests.of_client(identity):
                del self._clients[identity]  # watched only while it has requests
            elif client.heartbeats and client.last_seen < now - protocol.CLIENT_TIMEOUT:
                self._forget_client(identity)
        if self._announcing_until is not None and now >= self._announcing_until:
            self._announcing_until = None
            for model in self.requests.queued_models():
                if not self.workers.serving(model):
                    self._router.fail_queued(model)  # nobody announced it in time
        self._router.expire_waits(now)
        if now >= self._next_heartbeat:
            for worker in self.workers:
                self._out.send(worker.identity, Command.HEARTBEAT)
            self._next_heartbeat = now + self.settings.heartbeat_interval
        return self._out.take()

    # -- messages

    def _handle(self, identity: bytes, message: Message, now: float) -> None:
        worker = self.workers.get(identity)
        if worker is not None:
            worker.last_seen = now
        elif identity in self._clients:
            self._clients[identity].last_seen = now
        command = message.command
        if command is Command.READY:
            self._on_ready(identity, protocol.Ready.from_fields(message.fields()), now)
        elif command in _WORKER_REPLIES:
            self._on_worker_reply(identity, worker, message, now)
        elif command is Command.DRAIN:
            if worker is not None:
                if not worker.draining:
                    log.info("worker %s draining: %d requests to finish", worker.ready.worker_id,
                             self.requests.num_on_worker(identity))
                worker.draining = True
                self._out.send(identity, Command.DRAIN)  # after every request sent to it: it has them all
        elif command is Command.DISCONNECT:
            if worker is not None:
                log.info("worker %s disconnected", worker.ready.worker_id)
                self._router.remove_worker(worker, now)
        elif command is Command.HEARTBEAT:
            self._on_heartbeat(identity, worker, message.fields(), now)
        elif command in REQUEST_BODIES:
            self._on_request(identity, message, now)
        elif command is Command.CANCEL:
            self._on_cancel(identity, message.request_id)
        elif command is Command.LIST_MODELS:
            self._out.send(identity, Command.MODELS, message.request_id,
                           protocol.model_list_fields(model_infos(self.workers, self.requests)))
        elif command is Command.LIST_WORKERS:
            self._out.send(identity, Command.WORKERS, message.request_id,
                           protocol.worker_list_fields(worker_infos(self.workers, self.requests, now)))
        else:
            raise protocol.ProtocolError(f"{command.value} is not a command the broker accepts")

    @staticmethod
    def _role_needed(message: Message) -> Role:
        command = message.command
        if command in _WORKER_COMMANDS or (command is Command.HEARTBEAT and "worker_id" in message.fields()):
            return Role.WORKER
        return Role.CLIENT

    def _refuse(self, identity: bytes, message: Message, roles: frozenset[Role], now: float) -> None:
        """A message its sender's key does not allow: answered, counted, never routed."""
        self.stats.num_refused += 1
        who = " or ".join(sorted(r.value for r in roles)) or "no longer allowed"
        text = f"{message.command.value} is not allowed for this key ({who})"
        self._warn("refused", f"refused a message (%d so far): {text}", self.stats.num_refused, now)
        self._out.error(identity, message.request_id, ErrorCode.FORBIDDEN, text)

    def _warn(self, kind: str, text: str, count: int, now: float) -> None:
        if now - self._last_warning[kind] > _LOG_INTERVAL:
            log.warning(text, count)
            self._last_warning[kind] = now

    def _reject(self, identity: bytes, request_id: bytes, exc: protocol.ProtocolError, now: float, *,
                answer: bool) -> None:
        self.stats.num_malformed += 1
        self._warn("malformed", f"dropped malformed message (%d so far): {exc}", self.stats.num_malformed, now)
        if answer:
            self._out.error(identity, request_id, ErrorCode.BAD_REQUEST, str(exc), exc.field)
        request = self.requests.get(request_id) if request_id else None
        worker = self.workers.get(identity)
        if worker is not None and request is not None and request.worker == identity:
            # A lost token or ending must not go unnoticed: the request fails, the worker is told to
            # stop it, and its slot is free at once.
            log.warning("worker %s sent a malformed reply to request %s: %s", worker.ready.worker_id,
                        request_id.hex(), exc)
            self._out.send(identity, Command.CANCEL, request_id)
            self._router.end(request, ErrorCode.INTERNAL,
                            f"worker {worker.ready.worker_id} sent a malformed reply: {exc}")
            self._router.dispatch(worker.ready.models, now)

    def _abort(self, identity: bytes, request_id: bytes, exc: Exception) -> None:
        """A request the broker failed on: its client still gets an ending."""
        request = self.requests.get(request_id)
        message = f"the broker failed on this request: {exc}"
        if request is None:
            self._out.error(identity, request_id, ErrorCode.INTERNAL, message)
        elif request.client == identity and request.listening:
            if request.worker is not None:
                self._out.send(request.worker, Command.CANCEL, request_id)
            self._router.end(request, ErrorCode.INTERNAL, message)

    # -- workers

    def _on_ready(self, identity: bytes, ready: protocol.Ready, now: float) -> None:
        self._reannounced.pop(identity, None)
        self._router.add_worker(identity, ready, now)

    def _on_worker_reply(self, identity: bytes, worker: WorkerRecord | None, message: Message, now: float) -> None:
        request = self.requests.get(message.request_id)
        if worker is None or request is None or request.worker != identity:
            # A stream the broker does not know (it restarted, or the request ended): stop it.
            if message.command is Command.TOKEN:
                self._out.send(identity, Command.CANCEL, message.request_id)
            if worker is None:
                self._ask_to_announce(identity, now)
            return
        if request.listening:
            self._out.send(request.client, message.command, message.request_id, message.body)
        if message.command is Command.TOKEN:
            self.requests.mark_started(request)
            return
        self.requests.end(request)
        # The freed slot may serve any of the worker's models (aliases share it).
        self._router.dispatch(worker.ready.models, now)

    def _ask_to_announce(self, identity: bytes, now: float) -> None:
        """An unknown worker (this broker restarted, or declared it dead) gets one REANNOUNCE per
        heartbeat interval, however many of its messages arrive before its READY does."""
        if now - self._reannounced.get(identity, -float("inf")) >= self.settings.heartbeat_interval:
            self._reannounced[identity] = now
            self._out.send(identity, Command.REANNOUNCE)

    # -- clients

    def _on_heartbeat(self, identity: bytes, worker: WorkerRecord | None, fields: dict, now: float) -> None:
        if "worker_id" in fields:
            if worker is None:
                self._ask_to_announce(identity, now)
            return
        client = self._clients.get(identity)
        if client is not None:
            client.heartbeats = True
        for request_id in protocol.ClientHeartbeat.from_fields(fields).request_ids:
            request = self.requests.get(request_id)
            if request is None or request.client != identity or not request.listening:
                self._out.error(identity, request_id, ErrorCode.UNKNOWN_REQUEST,
                                "the broker does not know this request (it may have restarted)")
        self._out.send(identity, Command.HEARTBEAT)

    def _on_request(self, identity: bytes, message: Message, now: float) -> None:
        request_id = message.request_id
        if len(request_id) != protocol.REQUEST_ID_SIZE:
            raise protocol.ProtocolError(f"{message.command.value} needs a 16-byte request id")
        if request_id in self.requests:
            self._on_duplicate(identity, request_id)
            return
        body = REQUEST_BODIES[message.command].from_fields(message.fields())
        model = body.model
        task = TASK_OF_COMMAND[message.command]
        parts = request_parts(body) if isinstance(body, protocol.GenerationRequest) else ()
        if not self.workers.serving(model) and self._announcing_until is None:
            self._out.error(identity, request_id, *dispatch.not_served(self.workers, model, self._router.models_seen))
            return
        refusal = dispatch.wrong_task(self.workers, model, task)
        if refusal is not None:  # refused here, so no worker ever sees a request it cannot run
            self._out.error(identity, request_id, ErrorCode.BAD_REQUEST, refusal)
            return
        num_waiting = self.requests.num_queued(model)
        if num_waiting >= self.settings.max_queue and not dispatch.has_room(self.workers, self.requests, model,
                                                                               message.command):
            self._out.error(identity, request_id, ErrorCode.OVERLOADED,
                            f"every worker for '{model}' is busy and {num_waiting} requests are waiting")
            return
        generation = body if isinstance(body, protocol.GenerationRequest) else None
        timeout = None if generation is None else generation.timeout or self.settings.request_timeout
        self.requests.enqueue(Request(request_id, identity, model, message.body, now, parts=parts,
                                      command=message.command, priority=generation.priority if generation else 0,
                                      deadline=now + timeout if timeout else None))
        self._clients.setdefault(identity, ClientWatch(now))
        self._router.dispatch((model,), now)

    def _on_duplicate(self, identity: bytes, request_id: bytes) -> None:
        """A REQUEST on an id in use. Its sender gets exactly one ending on that id, this ERROR: a
        request of its own under that id is cancelled, so no frame of it follows. Another client's
        request under the id is left alone."""
        request = self.requests.get(request_id)
        assert request is not None
        if request.client == identity and request.listening:
            self._router.cancel(request)
        self._out.error(identity, request_id, ErrorCode.DUPLICATE_REQUEST, "request id already in use")

    def _on_cancel(self, identity: bytes, request_id: bytes) -> None:
        request = self.requests.get(request_id)
        if request is not None and request.client == identity and request.listening:
            self._router.cancel(request)

    def _forget_client(self, identity: bytes) -> None:
        requests = self.requests.of_client(identity)
        self._clients.pop(identity, None)
        if requests:
            log.info("client gone; cancelling its %d requests", len(requests))
        for request in requests:
            self._router.cancel(request)
