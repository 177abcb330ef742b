"""How requests meet workers: the broker's moves on its registry and request table.

The core reads what peers send and decides; the router does what follows from a worker coming or
going and a slot freeing up: queues are served, a lost worker's requests settled, requests ended
with an error. `dispatch` says which request goes where; the router applies it and fills the outbox.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field

from broker import dispatch
from broker.config import BrokerSettings
from broker.outbox import Outbox
from broker.protocol import TASK_OF_COMMAND, Command, ErrorCode, Ready
from broker.registry import WorkerRecord, WorkerRegistry
from broker.requests import Request, RequestTable, State

log = logging.getLogger(__name__)


@dataclass(slots=True)
class BusStats:
    """Counts since the broker started, for its metrics; `waits` are queue waits not yet reported."""

    sent: Counter[str] = field(default_factory=Counter)  # messages sent, by command (relayed ones included)
    num_malformed: int = 0
    num_refused: int = 0  # messages refused for their sender's role
    num_workers_lost: int = 0  # removed for silence, unreachability or a fresh READY, not DISCONNECT
    waits: list[float] = field(default_factory=list)

    def take_waits(self) -> list[float]:
        waits, self.waits = self.waits, []
        return waits


class Router:
    """The broker's workers and requests, and the only moves that pair them up or end them."""

    def __init__(self, settings: BrokerSettings) -> None:
        self.settings = settings
        self.workers = WorkerRegistry()
        self.requests = RequestTable()
        self.stats = BusStats()
        self.out = Outbox(self.stats.sent)
        self.models_seen: set[str] = set()  # every model announced since the broker started

    # -- workers

    def add_worker(self, identity: bytes, ready: Ready, now: float) -> None:
        """A worker's READY. A worker announces again only after losing the broker, and then it has
        dropped its work: its new self starts empty, and what the old one held is settled as if it had died."""
        previous = self.workers.remove(identity)
        self.workers.add(identity, ready, now)
        self.models_seen.update(ready.models)
        log.info("worker %s ready: models %s, capacity %d", ready.worker_id, list(ready.models), ready.capacity)
        if previous is not None:
            self.stats.num_workers_lost += 1
            self._settle(previous, now)
        self.dispatch(ready.models, now)

    def remove_worker(self, worker: WorkerRecord, now: float) -> None:
        if self.workers.remove(worker.identity) is not None:
            self._settle(worker, now)

    def _settle(self, worker: WorkerRecord, now: float) -> None:
        """A worker's requests after it is gone: those that produced no token go back to the front
        of their queue while some worker still serves their model; the rest end."""
        model_served = {m: bool(self.workers.serving(m)) for m in worker.ready.models}
        held = self.requests.on_worker(worker.identity)
        for request in reversed(held):  # the oldest ends up first
            if request.state is State.RUNNING and not request.started and model_served.get(request.model):
                self.requests.requeue(request, now)  # its wait for a worker starts again
                log.info("re-queued request %s from lost worker %s", request.request_id.hex(), worker.ready.worker_id)
        for request in held:
            if request.state is not State.QUEUED:
                self.end(request, ErrorCode.WORKER_LOST,
                         f"worker {worker.ready.worker_id} serving the request was lost")
        for model, served in model_served.items():
            if not served:
                self.fail_queued(model)
        self.dispatch(tuple(m for m, served in model_served.items() if served), now)

    # -- requests

    def dispatch(self, models: tuple[str, ...], now: float) -> None:
        """Serve the queues of these models (one worker's aliases share its slots), by priority, then
        the request that came first, whichever name it used."""
        # A queue per model and request kind: an EMBED waiting for a full embedding worker does not
        # hold up a REQUEST for a free generating worker under the same name, nor the other way round.
        candidates = {(model, command) for model in models for command in TASK_OF_COMMAND}
        while (request := dispatch.next_request(self.requests, candidates)) is not None:
            worker = dispatch.worker_for(self.workers, self.requests, request, self.settings.affinity_slack)
            if worker is None:
                refusal = dispatch.wrong_task(self.workers, request.model, TASK_OF_COMMAND[request.command])
                if refusal is not None:  # queued while workers were announcing; those that came do other work
                    self.end(request, ErrorCode.BAD_REQUEST, refusal)
                else:
                    candidates.discard((request.model, request.command))
                continue
            self.requests.assign(request, worker.identity)
            worker.prefixes.remember(request.parts)
            worker.last_dispatch = now
            worker.num_served += 1
            self.stats.waits.append(now - request.enqueued_at)
            self.out.send(worker.identity, request.command, request.request_id, request.body)

    def fail_queued(self, model: str) -> None:
        """No worker serves `model`: its waiting requests end now, saying so."""
        code, message = dispatch.not_served(self.workers, model, self.models_seen)
        for request in self.requests.queue(model):
            self.end(request, code, message)

    def expire_waits(self, now: float) -> None:
        """Requests that waited too long in a queue end; running ones past their deadline are told to stop."""
        for expiry in list(dispatch.expired(self.requests, now, self.settings.queue_timeout)):
            self.end(expiry.request, expiry.code, expiry.message)
        for request in dispatch.overdue(self.requests, now):
            # the worker ends it with DONE `deadline`, the answer so far kept
            self.requests.mark_deadline_sent(request)
            self.out.send(request.worker, Command.CANCEL, request.request_id, {"reason": "deadline"})

    def cancel(self, request: Request) -> None:
        """The client stops listening; a running request's slot is freed when its worker confirms."""
        if not self.requests.cancel(request):
            self.out.send(request.worker, Command.CANCEL, request.request_id)

    def end(self, request: Request, code: ErrorCode, message: str) -> None:
        """End a request with an ERROR to its client, if it still listens."""
        if request.listening:
            self.out.error(request.client, request.request_id, code, message)
        self.requests.end(request)
