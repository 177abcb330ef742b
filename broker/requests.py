"""Every request the broker holds, in one table: its state and the only operations that move it.

    enqueue ──► QUEUED ──assign──► RUNNING ──cancel──► CANCELLING
                  ▲                   │                     │
                  └──────requeue──────┘                     │
    end: from any state, the request leaves the table ◄─────┘

A QUEUED request waits in its model's queue, served by priority (lower first), then in arrival
order (a request given back by a lost worker first among its priority); a RUNNING one is on a worker and
its client waits for the answer; a CANCELLING one is still on its worker (which must confirm
before its slot is free) but its client no longer listens.
"""

from __future__ import annotations

import enum
import itertools
from collections import deque
from dataclasses import dataclass

from broker.affinity import Part
from broker.protocol import Command


class State(enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    CANCELLING = "cancelling"


@dataclass(slots=True, eq=False)
class Request:
    """A client's request as the broker sees it; the table alone changes its fields."""

    request_id: bytes
    client: bytes
    model: str
    body: bytes  # the packed REQUEST body, forwarded verbatim
    enqueued_at: float  # when its current wait for a worker began
    state: State = State.QUEUED
    worker: bytes | None = None
    started: bool = False  # a token has reached the client: sending it again would repeat text
    parts: tuple[Part, ...] = ()  # digests of its leading messages, for prefix affinity
    command: Command = Command.REQUEST  # its kind (REQUEST, EMBED or TOKENIZE), sent on to the worker
    priority: int = 0  # lower first in its queue
    deadline: float | None = None  # when its time runs out (its `timeout` after it arrived)
    deadline_sent: bool = False  # its worker was told its time ran out
    order: int = 0  # its place among those of its priority, set by the table

    @property
    def listening(self) -> bool:
        """Whether its client still waits for the answer."""
        return self.state is not State.CANCELLING


def queue_order(request: Request) -> tuple[int, int]:
    """The order a model's queue is served in: priority, then arrival (returns first)."""
    return request.priority, request.order


class RequestTable:
    """Requests by id, with the indexes the broker needs: per-model queues, per-worker and
    per-client sets. Every index changes only through the operations below."""

    def __init__(self) -> None:
        self._requests: dict[bytes, Request] = {}
        self._queues: dict[str, deque[Request]] = {}
        self._by_worker: dict[bytes, set[bytes]] = {}
        self._by_client: dict[bytes, set[bytes]] = {}
        self._timed: dict[bytes, Request] = {}  # those with a deadline: the broker's every tick looks only at these
        self._arrivals = itertools.count()  # increasing: the order of arrival
        self._returns = itertools.count(-1, -1)  # decreasing: given back by a lost worker, ahead of arrivals

    def get(self, request_id: bytes) -> Request | None:
        return self._requests.get(request_id)

    def __contains__(self, request_id: bytes) -> bool:
        return request_id in self._requests

    # -- indexes

    def queue(self, model: str) -> tuple[Request, ...]:
        """The requests waiting for `model`, in the order they will be served."""
        return tuple(sorted(self._queues.get(model, ()), key=queue_order))

    def queued_models(self) -> list[str]:
        return [model for model, queue in self._queues.items() if queue]

    def num_queued(self, model: str) -> int:
        return len(self._queues.get(model, ()))

    def next_queued(self, model: str, command: Command | None = None) -> Request | None:
        """The request for `model` to serve next (of one kind: `command`): the lowest priority, then
        the earliest."""
        queue = [request for request in self._queues.get(model, ()) if command in (None, request.command)]
        return min(queue, key=queue_order, default=None)

    def on_worker(self, worker: bytes) -> list[Request]:
        """The requests a worker holds (running or cancelling), oldest first."""
        held = (self._requests[r] for r in self._by_worker.get(worker, ()))
        return sorted(held, key=lambda r: r.enqueued_at)

    def num_on_worker(self, worker: bytes) -> int:
        """Slots the request occupies on `worker`: a cancelled request's slot is busy until confirmed."""
        return len(self._by_worker.get(worker, ()))

    def of_client(self, client: bytes) -> list[Request]:
        """The requests a client still listens to."""
        return [self._requests[r] for r in self._by_client.get(client, ())]

    # -- transitions

    def enqueue(self, request: Request, *, front: bool = False) -> None:
        """A new request (or one given back by a lost worker, `front` True) waits for a worker."""
        if request.request_id in self._requests and self._requests[request.request_id] is not request:
            raise ValueError("request id already in use")
        self._requests[request.request_id] = request
        self._by_client.setdefault(request.client, set()).add(request.request_id)
        if request.deadline is not None:
            self._timed[request.request_id] = request
        request.order = next(self._returns if front else self._arrivals)
        self._queues.setdefault(request.model, deque()).append(request)

    def assign(self, request: Request, worker: bytes) -> None:
        """QUEUED -> RUNNING on `worker`."""
        assert request.state is State.QUEUED
        self._queues[request.model].remove(request)
        request.state, request.worker = State.RUNNING, worker
        self._by_worker.setdefault(worker, set()).add(request.request_id)

    def requeue(self, request: Request, now: float) -> None:
        """RUNNING -> QUEUED at the front of its queue: its worker is gone before it produced a token."""
        assert request.state is State.RUNNING and not request.started
        self._leave_worker(request)
        request.state, request.worker, request.enqueued_at = State.QUEUED, None, now
        request.deadline_sent = False  # its next worker must be told too, if its time runs out there
        request.order = next(self._returns)
        self._queues.setdefault(request.model, deque()).append(request)

    def mark_started(self, request: Request) -> None:
        """A token reached its client: sent again, it would repeat text (its client may resume it)."""
        request.started = True

    def mark_deadline_sent(self, request: Request) -> None:
        """Its worker was told that its time ran out."""
        request.deadline_sent = True

    def cancel(self, request: Request) -> bool:
        """The client stops listening. A queued request ends at once (returns True); a running one
        becomes CANCELLING until its worker confirms (returns False)."""
        if request.state is State.QUEUED:
            self.end(request)
            return True
        self._leave_client(request)
        request.state = State.CANCELLING
        return False

    def end(self, request: Request) -> None:
        """The request is over, whatever the outcome: it leaves every index."""
        if self._requests.pop(request.request_id, None) is None:
            return
        self._timed.pop(request.request_id, None)
        if request.state is State.QUEUED:
            self._queues[request.model].remove(request)
        self._leave_worker(request)
        self._leave_client(request)

    def timed(self) -> list[Request]:
        """The requests that carry a deadline, in any state."""
        return list(self._timed.values())

    def _leave_worker(self, request: Request) -> None:
        if request.worker is not None:
            held = self._by_worker.get(request.worker, set())
            held.discard(request.request_id)
            if not held:
                self._by_worker.pop(request.worker, None)

    def _leave_client(self, request: Request) -> None:
        mine = self._by_client.get(request.client, set())
        mine.discard(request.request_id)
        if not mine:
            self._by_client.pop(request.client, None)
