"""The dispatch policy: shortest queue first, ties to the least recently used worker."""

from broker.protocol import Ready
from broker.registry import WorkerRegistry, choose_worker


def registry_with(*capacities: int) -> WorkerRegistry:
    registry = WorkerRegistry()
    for index, capacity in enumerate(capacities):
        registry.add(f"w{index}".encode(), Ready(f"w{index}", ("m",), capacity), now=0.0)
    return registry


def idle(identity: bytes) -> int:
    return 0


def test_most_free_slots_wins():
    registry = registry_with(2, 4)
    assert choose_worker(registry, "m", idle).identity == b"w1"
    busy = {b"w1": 3}
    assert choose_worker(registry, "m", lambda w: busy.get(w, 0)).identity == b"w0"


def test_ties_go_to_least_recently_used():
    registry = registry_with(2, 2, 2)
    registry.get(b"w0").last_dispatch = 5.0
    registry.get(b"w1").last_dispatch = 3.0
    registry.get(b"w2").last_dispatch = 4.0
    assert choose_worker(registry, "m", idle).identity == b"w1"


def test_full_workers_and_other_models_are_skipped():
    registry = registry_with(1)
    registry.add(b"other", Ready("other", ("x",), 8), now=0.0)
    assert choose_worker(registry, "m", idle).identity == b"w0"
    assert choose_worker(registry, "m", lambda w: 1 if w == b"w0" else 0) is None
    assert choose_worker(registry, "unknown", idle) is None


def test_add_and_remove_are_the_only_ways_in_and_out():
    registry = registry_with(1, 1)
    assert registry.models() == {"m"}
    assert registry.remove(b"w0").identity == b"w0"
    assert registry.remove(b"w0") is None
    assert [w.identity for w in registry.serving("m")] == [b"w1"]
    registry.add(b"w1", Ready("w1", ("n",), 3), now=1.0)  # a re-announce replaces the old one
    assert registry.models() == {"n"} and len(registry) == 1


def test_expired_workers():
    registry = registry_with(1, 1)
    registry.get(b"w1").last_seen = 10.0
    assert [w.identity for w in registry.expired(deadline=5.0)] == [b"w0"]
