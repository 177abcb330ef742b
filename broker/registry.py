"""All the broker knows about workers: one registry, one way in (`add`) and one way out (`remove`)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from broker.affinity import Part, PrefixMemory
from broker.protocol import Ready, Task


@dataclass(slots=True)
class WorkerRecord:
    """A live worker, keyed by its ROUTER identity."""

    identity: bytes
    ready: Ready
    last_seen: float
    last_dispatch: float = 0.0
    num_served: int = 0
    draining: bool = False  # it said DRAIN: it finishes what it holds and gets nothing new
    prefixes: PrefixMemory = field(init=False)  # what it likely holds in its prefix cache

    def __post_init__(self) -> None:
        self.prefixes = PrefixMemory(self.ready.prefix_cache_tokens)


class WorkerRegistry:
    def __init__(self) -> None:
        self._workers: dict[bytes, WorkerRecord] = {}

    def add(self, identity: bytes, ready: Ready, now: float) -> WorkerRecord:
        """Register a worker; a repeated READY from the same identity replaces its announcement."""
        record = self._workers.get(identity)
        if record is None:
            record = self._workers[identity] = WorkerRecord(identity, ready, now)
        else:  # an announcement is a fresh start: whatever it cached is gone
            record.ready, record.last_seen, record.draining = ready, now, False
            record.prefixes = PrefixMemory(ready.prefix_cache_tokens)
        return record

    def remove(self, identity: bytes) -> WorkerRecord | None:
        """Forget a worker; the caller settles the requests it still held."""
        return self._workers.pop(identity, None)

    def get(self, identity: bytes) -> WorkerRecord | None:
        return self._workers.get(identity)

    def __iter__(self) -> Iterator[WorkerRecord]:
        return iter(list(self._workers.values()))

    def __len__(self) -> int:
        return len(self._workers)

    def serving(self, model: str, task: Task | None = None) -> list[WorkerRecord]:
        """The workers of `model`; with `task`, only those that do it."""
        return [w for w in self._workers.values()
                if model in w.ready.models and (task is None or task in w.ready.tasks)]

    def models(self) -> set[str]:
        return {name for w in self._workers.values() for name in w.ready.models}

    def expired(self, deadline: float) -> list[WorkerRecord]:
        """Workers not heard from since `deadline`."""
        return [w for w in self._workers.values() if w.last_seen < deadline]


def choose_worker(registry: WorkerRegistry, model: str, num_busy: Callable[[bytes], int],
                  task: Task = Task.GENERATE, *, parts: tuple[Part, ...] = (),
                  affinity_slack: int = 0) -> WorkerRecord | None:
    """Shortest queue first: the worker doing `task` for `model` with the most free slots (capacity
    minus `num_busy` of its identity); ties go to the least recently used. Prefix affinity first,
    though: the worker that likely holds the longest prefix of the request (`parts`) gets it when it
    has a free slot and runs at most `affinity_slack` more requests than the shortest queue's worker."""
    serving = [w for w in registry.serving(model, task) if not w.draining]
    free = {w.identity: w.ready.capacity - num_busy(w.identity) for w in serving}
    candidates = [w for w in serving if free[w.identity] > 0]
    if not candidates:
        return None
    balanced = max(candidates, key=lambda w: (free[w.identity], -w.last_dispatch))
    if not parts:
        return balanced
    matched = {w.identity: w.prefixes.matched_chars(parts) for w in candidates}
    # Among equal matches (e.g. a system prompt every worker holds) balance decides.
    best = max(candidates, key=lambda w: (matched[w.identity], free[w.identity], -w.last_dispatch))
    busy = {w.identity: num_busy(w.identity) for w in (best, balanced)}
    if matched[best.identity] > matched[balanced.identity] and \
            busy[best.identity] <= busy[balanced.identity] + affinity_slack:
        return best
    return balanced
