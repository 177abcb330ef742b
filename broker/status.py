"""The broker's answers to LIST_MODELS and LIST_WORKERS, read off its registry and request table."""

from __future__ import annotations

from broker import protocol
from broker.registry import WorkerRegistry
from broker.requests import RequestTable


def model_infos(workers: WorkerRegistry, requests: RequestTable) -> list[protocol.ModelInfo]:
    """Each model served now, with its live workers taken together."""
    infos = []
    for model in sorted(workers.models()):
        serving = workers.serving(model)
        infos.append(protocol.ModelInfo(
            name=model,
            workers=len(serving),
            capacity=sum(w.ready.capacity for w in serving),
            in_flight=sum(requests.num_on_worker(w.identity) for w in serving),
            queued=requests.num_queued(model),
            context_length=max(w.ready.context_length for w in serving),
            tasks=tuple(sorted({t.value for w in serving for t in w.ready.tasks})),
        ))
    return infos


def worker_infos(workers: WorkerRegistry, requests: RequestTable, now: float) -> list[protocol.WorkerInfo]:
    """Each live worker as it announced itself, with what it holds now."""
    return [protocol.WorkerInfo(w.ready.worker_id, w.ready.models, w.ready.capacity,
                                requests.num_on_worker(w.identity), round(now - w.last_seen, 3),
                                w.num_served, w.ready.cache_tokens, tuple(t.value for t in w.ready.tasks),
                                w.draining)
            for w in workers]
