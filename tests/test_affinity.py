"""Prefix affinity on the broker's socket-free core: which worker gets which turn of a conversation."""

from __future__ import annotations

import msgpack

from broker import protocol
from broker.affinity import PrefixMemory, request_parts
from broker.config import BrokerSettings
from broker.core import BrokerCore
from broker.protocol import ChatMessage, Command, GenerationRequest, Message

A, B, CLIENT = b"worker-a", b"worker-b", b"client"
SYSTEM = {"role": "system", "content": "You are terse. " * 50}


def rid(n: int) -> bytes:
    return n.to_bytes(16, "big")


class Bus:
    def __init__(self) -> None:
        self.core = BrokerCore(BrokerSettings(heartbeat_interval=1.0), 0.0)
        self.now = 0.0

    def send(self, identity: bytes, command: Command, request_id: bytes = b"", fields: dict | None = None):
        message = Message(command, request_id, msgpack.packb(fields or {}, use_bin_type=True))
        return self.core.handle(identity, message, self.now)

    def ready(self, worker: bytes, prefix_cache_tokens: int = 8192, capacity: int = 4) -> None:
        ready = protocol.Ready(worker.decode(), ("m",), capacity, 2048, 0, prefix_cache_tokens)
        self.send(worker, Command.READY, b"", ready.to_fields())

    def request(self, n: int, messages: list[dict]) -> bytes | None:
        """Send a chat request; the worker it went to, if any."""
        self.now += 0.01  # so that ties go to the least recently used worker
        out = self.send(CLIENT, Command.REQUEST, rid(n), {"model": "m", "messages": messages})
        sent = [m.identity for m in out if m.command is Command.REQUEST]
        return sent[0] if sent else None

    def done(self, worker: bytes, n: int) -> None:
        self.send(worker, Command.DONE, rid(n), {"finish_reason": "stop", "prompt_tokens": 1, "completion_tokens": 1})


def turn(history: list[dict], number: int) -> list[dict]:
    history += [{"role": "user", "content": f"question {number}"}]
    return list(history)


def test_parts_chain_the_leading_messages():
    first = GenerationRequest("m", messages=(ChatMessage("system", "s"), ChatMessage("user", "u")))
    second = GenerationRequest("m", messages=(*first.messages, ChatMessage("assistant", "a"), ChatMessage("user", "v")))
    other = GenerationRequest("m", messages=(ChatMessage("system", "t"), ChatMessage("user", "u")))
    assert request_parts(second)[:2] == request_parts(first)
    assert request_parts(other)[1] != request_parts(first)[1], "a digest covers every part before it"
    prompt = GenerationRequest("m", prompt="x" * 600)
    assert [p.num_chars for p in request_parts(prompt)] == [256, 256, 88]


def test_a_memory_forgets_the_least_recently_sent_beyond_its_budget():
    memory = PrefixMemory(budget_tokens=100)  # about 400 characters
    old = request_parts(GenerationRequest("m", prompt="a" * 300))
    new = request_parts(GenerationRequest("m", prompt="b" * 300))
    memory.remember(old)
    assert memory.matched_chars(old) == 300
    memory.remember(new)
    assert memory.matched_chars(new) == 300 and memory.matched_chars(old) < 300
    assert PrefixMemory(0).matched_chars(new) == 0


def test_each_conversation_stays_on_its_worker_and_the_load_stays_balanced():
    bus = Bus()
    bus.ready(A)
    bus.ready(B)
    histories = [[SYSTEM] for _ in range(4)]
    placed: dict[int, list[bytes]] = {c: [] for c in range(4)}
    n = 0
    for number in range(4):
        running = []
        for c, history in enumerate(histories):
            n += 1
            worker = bus.request(n, turn(history, number))
            placed[c].append(worker)
            running.append((worker, n))
        for worker, m in running:
            bus.done(worker, m)
        for history in histories:
            history.append({"role": "assistant", "content": "ok"})
    assert all(len(set(workers)) == 1 for workers in placed.values()), placed
    first_workers = [workers[0] for workers in placed.values()]
    assert first_workers.count(A) == first_workers.count(B) == 2


def test_a_much_busier_worker_gives_way_and_the_conversation_moves():
    bus = Bus()  # affinity_slack 1
    bus.ready(A)
    bus.ready(B)
    history = [SYSTEM]
    assert bus.request(1, turn(history, 0)) == A
    bus.done(A, 1)
    history.append({"role": "assistant", "content": "ok"})
    # Two other conversations with the same system prompt follow it to A, up to the slack: A runs 2.
    assert bus.request(2, [SYSTEM, {"role": "user", "content": "x"}]) == A
    assert bus.request(3, [SYSTEM, {"role": "user", "content": "y"}]) == A
    assert bus.request(4, turn(history, 1)) == B, "A runs 2 > B's 0 + 1: balance wins"
    for worker, m in ((A, 2), (A, 3), (B, 4)):
        bus.done(worker, m)
    history.append({"role": "assistant", "content": "ok"})
    assert bus.request(5, turn(history, 2)) == B, "it now follows the worker that served its last turn"


def test_a_worker_that_announces_again_has_forgotten_its_prefixes():
    bus = Bus()
    bus.ready(A)
    bus.ready(B)
    talks = [[SYSTEM], [SYSTEM], [SYSTEM]]
    assert [bus.request(n, turn(talk, 0)) for n, talk in enumerate(talks)] == [A, A, B]
    for worker, m in ((A, 0), (A, 1), (B, 2)):
        bus.done(worker, m)
    talks[0].append({"role": "assistant", "content": "ok"})
    bus.ready(A)  # restarted: its cache is empty, and B still holds the system prompt
    assert bus.request(3, turn(talks[0], 1)) == B
    bus.done(B, 3)
    talks[0].append({"role": "assistant", "content": "ok"})
    assert bus.request(4, turn(talks[0], 2)) == B, "A is idle and least recently used, but B holds the talk"


def test_workers_without_a_prefix_cache_are_balanced_as_before():
    bus = Bus()
    bus.ready(A, prefix_cache_tokens=0)
    bus.ready(B, prefix_cache_tokens=0)
    history = [SYSTEM]
    seen = []
    for number in range(4):
        worker = bus.request(number + 1, turn(history, number))
        bus.done(worker, number + 1)
        history.append({"role": "assistant", "content": "ok"})
        seen.append(worker)
    assert seen == [A, B, A, B]
