"""Workers and models: READY, the MODELS and WORKERS lists, and a client's HEARTBEAT."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from broker.protocol.frames import ProtocolError, REQUEST_ID_SIZE, Task
from broker.protocol.fields import _get


@dataclass(frozen=True, slots=True)
class Ready:
    """Body of READY: a worker's announcement."""

    worker_id: str
    models: tuple[str, ...]
    capacity: int
    context_length: int = 0
    cache_tokens: int = 0  # the KV cache budget: rows x their longest prompt + max_tokens (0: unknown)
    prefix_cache_tokens: int = 0  # tokens of finished requests' KV it keeps for prompts that start alike (0: none)
    tasks: tuple[Task, ...] = (Task.GENERATE,)  # a worker that does not say generates

    def __post_init__(self) -> None:
        if not self.models or not all(isinstance(m, str) and m for m in self.models):
            raise ProtocolError.about("models", "must be a non-empty array of names")
        if self.capacity < 1:
            raise ProtocolError.about("capacity", "must be at least 1")
        if not self.tasks:
            raise ProtocolError.about("tasks", "must not be empty")

    def to_fields(self) -> dict[str, Any]:
        return {
            "worker_id": self.worker_id,
            "models": list(self.models),
            "capacity": self.capacity,
            "context_length": self.context_length,
            "cache_tokens": self.cache_tokens,
            "prefix_cache_tokens": self.prefix_cache_tokens,
            "tasks": [task.value for task in self.tasks],
        }

    @classmethod
    def from_fields(cls, fields: dict[str, Any]) -> Ready:
        return cls(
            _get(fields, "worker_id", str, required=True),
            tuple(_get(fields, "models", list, required=True)),
            _get(fields, "capacity", int, required=True),
            _get(fields, "context_length", int, 0),
            _get(fields, "cache_tokens", int, 0),
            _get(fields, "prefix_cache_tokens", int, 0),
            _tasks(_get(fields, "tasks", list, [Task.GENERATE.value])),
        )


def _tasks(values: list) -> tuple[Task, ...]:
    try:
        return tuple(dict.fromkeys(Task(v) for v in values))
    except (ValueError, TypeError):
        known = ", ".join(t.value for t in Task)
        raise ProtocolError.about("tasks", f"must be an array of task names ({known})") from None


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """One entry of MODELS: a model name with the live workers that serve it."""

    name: str
    workers: int
    capacity: int
    in_flight: int
    queued: int
    context_length: int
    tasks: tuple[str, ...] = (Task.GENERATE.value,)  # what the model's workers do, together

    @property
    def can_chat(self) -> bool:
        return Task.GENERATE.value in self.tasks


@dataclass(frozen=True, slots=True)
class WorkerInfo:
    """One entry of WORKERS."""

    worker_id: str
    models: tuple[str, ...]
    capacity: int
    in_flight: int
    idle_seconds: float
    served: int = 0
    cache_tokens: int = 0
    tasks: tuple[str, ...] = (Task.GENERATE.value,)
    draining: bool = False  # it sent DRAIN: it gets no new requests and leaves once its own are done


def model_list_fields(models: list[ModelInfo]) -> dict[str, Any]:
    return {"models": [dict(asdict(m), tasks=list(m.tasks)) for m in models]}


def _known_fields(kind: type, entry: Any) -> dict[str, Any]:
    """The fields of `kind` in a list entry; fields added by a newer broker are ignored."""
    if not isinstance(entry, dict):
        raise ProtocolError(f"each {kind.__name__} entry must be a map")
    return {name: entry[name] for name in kind.__dataclass_fields__ if name in entry}


def parse_model_list(fields: dict[str, Any]) -> list[ModelInfo]:
    try:
        return [ModelInfo(**_with_tasks(_known_fields(ModelInfo, m))) for m in _get(fields, "models", list, [])]
    except TypeError as exc:
        raise ProtocolError(f"malformed MODELS entry: {exc}", "models") from None


def worker_list_fields(workers: list[WorkerInfo]) -> dict[str, Any]:
    return {"workers": [dict(asdict(w), models=list(w.models), tasks=list(w.tasks)) for w in workers]}


def _with_tasks(entry: dict[str, Any]) -> dict[str, Any]:
    """An entry's tasks as a tuple of names (an older broker sends none: it knew only generation)."""
    if "tasks" in entry:
        entry["tasks"] = tuple(map(str, entry["tasks"]))
    return entry


def parse_worker_list(fields: dict[str, Any]) -> list[WorkerInfo]:
    try:
        return [WorkerInfo(**_with_tasks(dict(_known_fields(WorkerInfo, w), models=tuple(w["models"]))))
                for w in _get(fields, "workers", list, [])]
    except (TypeError, KeyError) as exc:
        raise ProtocolError(f"malformed WORKERS entry: {exc}", "workers") from None


@dataclass(frozen=True, slots=True)
class ClientHeartbeat:
    """Body of a client's HEARTBEAT: the requests it still waits on."""

    request_ids: tuple[bytes, ...] = field(default_factory=tuple)

    def to_fields(self) -> dict[str, Any]:
        return {"request_ids": list(self.request_ids)}

    @classmethod
    def from_fields(cls, fields: dict[str, Any]) -> ClientHeartbeat:
        ids = _get(fields, "request_ids", list, [])
        if not all(isinstance(i, bytes) and len(i) == REQUEST_ID_SIZE for i in ids):
            raise ProtocolError.about("request_ids", "must be an array of 16-byte binaries")
        return cls(tuple(ids))
