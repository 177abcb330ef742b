"""Which queued request goes to which worker, and which requests have waited too long: pure
functions of the registry and the request table, which the core applies."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from broker.protocol import TASK_OF_COMMAND, Command, ErrorCode, Task
from broker.registry import WorkerRecord, WorkerRegistry, choose_worker
from broker.requests import Request, RequestTable, State, queue_order


@dataclass(frozen=True, slots=True)
class Expiry:
    """A request whose wait or time ran out, and the error that ends it."""

    request: Request
    code: ErrorCode
    message: str


def next_request(requests: RequestTable, candidates: set[tuple[str, Command]]) -> Request | None:
    """Of the queues named (a model and a request kind each), the request to serve first."""
    heads = [request for model, command in candidates
             if (request := requests.next_queued(model, command)) is not None]
    return min(heads, key=queue_order, default=None)


def worker_for(workers: WorkerRegistry, requests: RequestTable, request: Request,
               affinity_slack: int) -> WorkerRecord | None:
    if request.command is Command.TOKENIZE:
        return _least_busy(workers, requests, request.model)
    return choose_worker(workers, request.model, requests.num_on_worker, TASK_OF_COMMAND[request.command],
                         parts=request.parts, affinity_slack=affinity_slack)


def _least_busy(workers: WorkerRegistry, requests: RequestTable, model: str) -> WorkerRecord | None:
    """A TOKENIZE runs no model step: any live generating worker answers it at once, full or not."""
    serving = [w for w in workers.serving(model, Task.GENERATE) if not w.draining]
    return min(serving, key=lambda w: requests.num_on_worker(w.identity), default=None)


def has_room(workers: WorkerRegistry, requests: RequestTable, model: str, command: Command) -> bool:
    """Some worker of `model` could take a `command` request now."""
    if command is Command.TOKENIZE:
        return _least_busy(workers, requests, model) is not None
    return choose_worker(workers, model, requests.num_on_worker, TASK_OF_COMMAND[command]) is not None


def wrong_task(workers: WorkerRegistry, model: str, task: Task) -> str | None:
    """Why `model`'s workers cannot take a `task` request, when they do only other work; else None."""
    serving = workers.serving(model)
    if not serving or workers.serving(model, task):
        return None
    tasks = sorted({t.value for w in serving for t in w.ready.tasks})
    return f"model '{model}' does not serve '{task.value}' requests; it serves: {', '.join(tasks)}"


def not_served(workers: WorkerRegistry, model: str, seen: set[str]) -> tuple[ErrorCode, str]:
    """The error for a model no live worker serves: `no_worker` for one served before, else `unknown_model`."""
    served = ", ".join(sorted(workers.models())) or "none"
    if model in seen:
        return ErrorCode.NO_WORKER, f"no live worker serves model '{model}' now; models served: {served}"
    return ErrorCode.UNKNOWN_MODEL, f"model '{model}' is not served; models served: {served}"


def expired(requests: RequestTable, now: float, queue_timeout: float) -> Iterator[Expiry]:
    """Queued requests whose `timeout` ran out, or that waited longer than the queue allows."""
    oldest = now - queue_timeout
    for model in requests.queued_models():
        # Re-queued requests restart their wait, so the oldest may be anywhere in the queue.
        for request in requests.queue(model):
            if request.deadline is not None and request.deadline <= now:
                yield Expiry(request, ErrorCode.DEADLINE_EXCEEDED,
                             f"its timeout ran out while it waited for a free worker for '{model}'")
            elif request.enqueued_at < oldest:
                yield Expiry(request, ErrorCode.QUEUE_TIMEOUT,
                             f"waited {queue_timeout:.0f}s for a free worker for '{model}'")


def overdue(requests: RequestTable, now: float) -> list[Request]:
    """Running requests whose `timeout` ran out and whose worker has not been told yet."""
    return [request for request in requests.timed() if request.state is State.RUNNING and
            request.deadline is not None and request.deadline <= now and not request.deadline_sent]
