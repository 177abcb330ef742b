"""The broker's rules on its socket-free core: messages and times in, messages out; no processes."""

from __future__ import annotations

import msgpack
import pytest

from broker import protocol
from broker.config import BrokerSettings
from broker.core import BrokerCore, Outgoing
from broker.protocol import Command, Message

INTERVAL = 1.0
TIMEOUT = INTERVAL * protocol.HEARTBEAT_LIVENESS
CLIENT, OTHER_CLIENT = b"client", b"other-client"


def rid(n: int) -> bytes:
    return bytes([n]) * protocol.REQUEST_ID_SIZE


def message(command: Command, request_id: bytes = b"", fields: dict | None = None) -> Message:
    return Message(command, request_id, msgpack.packb(fields or {}, use_bin_type=True))


class Bus:
    """A core and the peers that talk to it; `now` moves only when a test says so."""

    def __init__(self, **settings) -> None:
        self.now = 0.0
        options = {"heartbeat_interval": INTERVAL, "max_queue": 4, "queue_timeout": 30.0, **settings}
        self.core = BrokerCore(BrokerSettings(**options), self.now)

    def at(self, now: float) -> Bus:
        self.now = now
        return self

    def send(self, identity: bytes, command: Command, request_id: bytes = b"", fields: dict | None = None) -> list[Outgoing]:
        return self.core.handle(identity, message(command, request_id, fields), self.now)

    def ready(self, worker: bytes, *models: str, capacity: int = 1) -> list[Outgoing]:
        return self.send(worker, Command.READY, b"", protocol.Ready(worker.decode(), models or ("m",), capacity).to_fields())

    def request(self, request_id: bytes, model: str = "m", client: bytes = CLIENT) -> list[Outgoing]:
        return self.send(client, Command.REQUEST, request_id, {"model": model, "prompt": "hi"})

    def token(self, worker: bytes, request_id: bytes) -> list[Outgoing]:
        return self.send(worker, Command.TOKEN, request_id, {"text": "x", "num_tokens": 1})

    def done(self, worker: bytes, request_id: bytes, reason: str = "stop") -> list[Outgoing]:
        fields = {"finish_reason": reason, "prompt_tokens": 1, "completion_tokens": 1}
        return self.send(worker, Command.DONE, request_id, fields)

    def alive(self, *workers: bytes) -> None:
        for worker in workers:
            self.send(worker, Command.HEARTBEAT, b"", {"worker_id": worker.decode()})

    def tick(self, now: float) -> list[Outgoing]:
        self.now = now
        return self.core.tick(now)

    def models(self) -> dict[str, protocol.ModelInfo]:
        [reply] = self.send(CLIENT, Command.LIST_MODELS, rid(200))
        return {m.name: m for m in protocol.parse_model_list(msgpack.unpackb(msgpack.packb(reply.body)))}


def summary(out: list[Outgoing]) -> list[tuple]:
    """Each message as (peer, command, request id[, error code]), heartbeats left out."""
    rows = []
    for m in out:
        if m.command is Command.HEARTBEAT:
            continue
        row = (m.identity, m.command.value, m.request_id)
        if m.command is Command.ERROR:
            row += (m.body["code"],)
        rows.append(row)
    return rows


@pytest.fixture
def bus() -> Bus:
    return Bus()


# -- dispatch


def test_most_free_slots_first_then_least_recently_used(bus):
    bus.ready(b"w1", capacity=2)
    bus.ready(b"w2", capacity=2)
    assert summary(bus.at(1).request(rid(1))) == [(b"w1", "REQUEST", rid(1))]
    assert summary(bus.at(2).request(rid(2))) == [(b"w2", "REQUEST", rid(2))]
    assert summary(bus.at(3).request(rid(3))) == [(b"w1", "REQUEST", rid(3))]  # both 1 free: w1 waited longer
    bus.at(4).done(b"w1", rid(1))
    assert summary(bus.at(5).request(rid(4))) == [(b"w2", "REQUEST", rid(4))]  # one free each: w2 waited longer
    bus.done(b"w1", rid(3))
    assert summary(bus.at(6).request(rid(5))) == [(b"w1", "REQUEST", rid(5))]  # w1 has more free slots


def test_the_request_body_reaches_the_worker_verbatim(bus):
    bus.ready(b"w1")
    [out] = bus.request(rid(1))
    assert msgpack.unpackb(out.body) == {"model": "m", "prompt": "hi"}


def test_full_workers_queue_then_overload_and_a_freed_slot_serves_the_oldest(bus):
    bus.ready(b"w1")
    bus.request(rid(1))
    for n in range(2, 6):
        assert bus.request(rid(n)) == []  # queued: four may wait
    assert summary(bus.request(rid(6))) == [(CLIENT, "ERROR", rid(6), "overloaded")]
    assert bus.models()["m"].queued == 4
    out = bus.done(b"w1", rid(1))
    assert summary(out) == [(CLIENT, "DONE", rid(1)), (b"w1", "REQUEST", rid(2))]


def test_a_queued_request_times_out(bus):
    bus.ready(b"w1")
    bus.request(rid(1))
    bus.at(10).request(rid(2))
    bus.at(38).alive(b"w1")
    assert summary(bus.tick(39)) == []
    assert summary(bus.tick(41)) == [(CLIENT, "ERROR", rid(2), "queue_timeout")]
    assert bus.models()["m"].queued == 0


def test_a_freed_slot_serves_the_longest_wait_across_the_workers_aliases(bus):
    bus.ready(b"w1", "a", "b")
    bus.request(rid(1), "a")
    bus.at(1).request(rid(2), "b")
    bus.at(2).request(rid(3), "a")
    assert summary(bus.done(b"w1", rid(1))) == [(CLIENT, "DONE", rid(1)), (b"w1", "REQUEST", rid(2))]


def test_unknown_and_no_longer_served_models_are_named(bus):
    bus.tick(TIMEOUT)  # the announcing window is over
    bus.ready(b"w1", "m")
    [error] = bus.request(rid(1), "x")
    assert error.body["code"] == "unknown_model" and "models served: m" in error.body["message"]
    bus.send(b"w1", Command.DISCONNECT)
    assert summary(bus.request(rid(2), "m")) == [(CLIENT, "ERROR", rid(2), "no_worker")]


def test_a_new_broker_holds_requests_for_models_not_yet_announced(bus):
    assert bus.request(rid(1), "m") == []
    assert bus.request(rid(2), "x") == []
    assert summary(bus.at(1).ready(b"w1", "m")) == [(b"w1", "REQUEST", rid(1))]
    assert summary(bus.tick(TIMEOUT)) == [(CLIENT, "ERROR", rid(2), "unknown_model")]


# -- a request's life


def test_tokens_and_the_ending_are_forwarded_verbatim_and_free_the_slot(bus):
    bus.ready(b"w1")
    bus.request(rid(1))
    [token] = bus.token(b"w1", rid(1))
    assert (token.identity, token.command, msgpack.unpackb(token.body)) == (CLIENT, Command.TOKEN, {"text": "x", "num_tokens": 1})
    bus.done(b"w1", rid(1))
    assert bus.models()["m"].in_flight == 0


def test_cancelling_a_queued_request_removes_it_silently(bus):
    bus.ready(b"w1")
    bus.request(rid(1))
    bus.request(rid(2))
    assert bus.send(CLIENT, Command.CANCEL, rid(2)) == []
    assert summary(bus.done(b"w1", rid(1))) == [(CLIENT, "DONE", rid(1))]  # nothing left to dispatch


def test_a_cancelled_request_keeps_its_slot_until_the_worker_confirms(bus):
    bus.ready(b"w1")
    bus.request(rid(1))
    bus.request(rid(2))
    assert summary(bus.send(CLIENT, Command.CANCEL, rid(1))) == [(b"w1", "CANCEL", rid(1))]
    assert bus.token(b"w1", rid(1)) == []  # in flight before the CANCEL: not forwarded
    assert bus.models()["m"].in_flight == 1
    assert summary(bus.done(b"w1", rid(1), "cancelled")) == [(b"w1", "REQUEST", rid(2))]


def test_only_its_own_client_can_cancel_a_request(bus):
    bus.ready(b"w1")
    bus.request(rid(1))
    assert bus.send(OTHER_CLIENT, Command.CANCEL, rid(1)) == []
    assert summary(bus.done(b"w1", rid(1))) == [(CLIENT, "DONE", rid(1))]


def test_a_reused_id_ends_the_senders_own_request_with_one_error(bus):
    bus.ready(b"w1", capacity=2)
    bus.request(rid(1))
    bus.token(b"w1", rid(1))
    out = bus.request(rid(1))
    assert summary(out) == [(b"w1", "CANCEL", rid(1)), (CLIENT, "ERROR", rid(1), "duplicate_request")]
    assert bus.token(b"w1", rid(1)) == [] and summary(bus.done(b"w1", rid(1), "cancelled")) == []


def test_a_reused_id_of_another_clients_request_leaves_that_request_alone(bus):
    bus.ready(b"w1", capacity=2)
    bus.request(rid(1))
    assert summary(bus.request(rid(1), client=OTHER_CLIENT)) == [(OTHER_CLIENT, "ERROR", rid(1), "duplicate_request")]
    assert summary(bus.done(b"w1", rid(1))) == [(CLIENT, "DONE", rid(1))]


def test_malformed_request_fields_are_bad_requests_naming_the_field(bus):
    [error] = bus.send(CLIENT, Command.REQUEST, rid(1), {"model": "m", "messages": [{"role": "robot", "content": "x"}]})
    assert error.body["code"] == "bad_request" and "messages[0].role" in error.body["message"]
    [error] = bus.core.receive(CLIENT, [protocol.PROTOCOL_SIGNATURE, b"REQUEST", rid(2), b"\xc1"], 0.0)
    assert (error.command, error.request_id, error.body["code"]) == (Command.ERROR, rid(2), "bad_request")
    assert bus.core.receive(CLIENT, [b"garbage"], 0.0) == []  # no way to answer it
    assert bus.core.stats.num_malformed == 3


def test_a_malformed_reply_fails_the_request_and_frees_the_slot(bus):
    bus.ready(b"w1")
    bus.request(rid(1))
    bus.request(rid(2))
    out = bus.core.receive(b"w1", [protocol.PROTOCOL_SIGNATURE, b"VECTORS", rid(1), b"\x80"], bus.now)
    assert summary(out) == [(b"w1", "ERROR", rid(1), "bad_request"), (b"w1", "CANCEL", rid(1)),
                            (CLIENT, "ERROR", rid(1), "internal_error"), (b"w1", "REQUEST", rid(2))]


# -- workers that go away


def test_a_lost_worker_gives_back_what_it_had_not_started_and_fails_the_rest(bus):
    bus.ready(b"w1", capacity=2)
    bus.ready(b"w2")
    bus.at(0.1).request(rid(1))  # -> w1
    bus.at(0.2).request(rid(2))  # -> w2
    bus.at(0.3).request(rid(3))  # -> w1
    bus.at(0.4).token(b"w1", rid(1))
    bus.at(3).alive(b"w2")
    out = bus.tick(0.4 + TIMEOUT + 0.1)  # w1 silent since 0.4
    assert summary(out) == [(CLIENT, "ERROR", rid(1), "worker_lost")]  # rid(3) waits for w2
    assert summary(bus.done(b"w2", rid(2))) == [(CLIENT, "DONE", rid(2)), (b"w2", "REQUEST", rid(3))]


def test_requests_for_a_model_nobody_serves_any_more_fail(bus):
    bus.tick(TIMEOUT)
    bus.ready(b"w1")
    bus.request(rid(1))
    bus.request(rid(2))
    assert summary(bus.send(b"w1", Command.DISCONNECT)) == [(CLIENT, "ERROR", rid(1), "worker_lost"),
                                                            (CLIENT, "ERROR", rid(2), "no_worker")]


def test_a_worker_that_announces_again_starts_empty(bus):
    bus.ready(b"w1")
    bus.request(rid(1))
    out = bus.ready(b"w1")  # it lost the broker and dropped its work: the request starts over
    assert summary(out) == [(b"w1", "REQUEST", rid(1))]


def test_an_unreachable_worker_is_removed_at_once(bus):
    bus.ready(b"w1")
    bus.request(rid(1))
    bus.token(b"w1", rid(1))
    assert summary(bus.core.unreachable(b"w1", 0.0)) == [(CLIENT, "ERROR", rid(1), "worker_lost")]
    assert bus.models() == {}


def test_an_unknown_worker_is_asked_to_announce_once_per_interval(bus):
    heartbeat = {"worker_id": "w9"}
    assert summary(bus.send(b"w9", Command.HEARTBEAT, b"", heartbeat)) == [(b"w9", "REANNOUNCE", b"")]
    assert summary(bus.at(0.5).token(b"w9", rid(1))) == [(b"w9", "CANCEL", rid(1))]
    assert summary(bus.at(1.0).send(b"w9", Command.HEARTBEAT, b"", heartbeat)) == [(b"w9", "REANNOUNCE", b"")]


def test_heartbeats_go_to_every_worker_once_per_interval(bus):
    bus.ready(b"w1")
    bus.ready(b"w2")
    assert [m.identity for m in bus.tick(0.0)] == [b"w1", b"w2"]
    assert bus.tick(0.5) == []
    assert {m.command for m in bus.tick(1.0)} == {Command.HEARTBEAT}


# -- clients that go away


def test_a_silent_heartbeating_client_is_gone_and_its_requests_cancelled(bus):
    bus.ready(b"w1")
    bus.request(rid(1))
    bus.at(1).send(CLIENT, Command.HEARTBEAT, b"", {"request_ids": [rid(1)]})
    bus.at(1 + protocol.CLIENT_TIMEOUT - 0.2).alive(b"w1")
    assert summary(bus.tick(1 + protocol.CLIENT_TIMEOUT - 0.1)) == []
    assert summary(bus.tick(1 + protocol.CLIENT_TIMEOUT + 0.1)) == [(b"w1", "CANCEL", rid(1))]


def test_a_client_that_never_heartbeats_is_not_judged_by_its_silence(bus):
    bus.ready(b"w1")
    bus.request(rid(1))
    bus.send(b"w1", Command.HEARTBEAT, b"", {"worker_id": "w1"})
    bus.at(100).send(b"w1", Command.HEARTBEAT, b"", {"worker_id": "w1"})
    assert all(m.command is Command.HEARTBEAT for m in bus.tick(100))


def test_an_unreachable_client_has_its_requests_cancelled(bus):
    bus.ready(b"w1")
    bus.request(rid(1))
    bus.request(rid(2))
    assert summary(bus.core.unreachable(CLIENT, 0.0)) == [(b"w1", "CANCEL", rid(1))]
    assert bus.models()["m"].queued == 0


def test_a_heartbeat_names_the_requests_the_broker_does_not_know(bus):
    bus.ready(b"w1")
    bus.request(rid(1))
    out = bus.send(CLIENT, Command.HEARTBEAT, b"", {"request_ids": [rid(1), rid(2)]})
    assert summary(out) == [(CLIENT, "ERROR", rid(2), "unknown_request")]
    assert out[-1].command is Command.HEARTBEAT


@pytest.mark.parametrize("command, fields", [(Command.REQUEST, {"model": "m", "prompt": "hi"}),
                                             (Command.EMBED, {"model": "m", "input": ["hi"]})])
def test_a_request_the_broker_fails_on_still_gets_its_ending(command, fields, monkeypatch):
    bus = Bus()

    def broken(*args):
        raise RuntimeError("a bug")

    monkeypatch.setattr(bus.core, "_on_request", broken)  # a fault inside the broker's own handling
    out = bus.send(CLIENT, command, rid(1), fields)
    assert summary(out) == [(CLIENT, "ERROR", rid(1), "internal_error")]
    assert "a bug" in out[0].body["message"]


# -- priority, deadlines and drain


def test_each_queue_is_served_by_priority_then_arrival(bus):
    bus.ready(b"w1")
    bus.request(rid(1))  # runs: the worker's only slot
    for n, priority in ((2, 5), (3, 0), (4, 5), (5, -1)):
        bus.send(CLIENT, Command.REQUEST, rid(n), {"model": "m", "prompt": "hi", "priority": priority})
    order = []
    finished = rid(1)
    for _ in range(4):
        [dispatched] = [m for m in bus.done(b"w1", finished) if m.identity == b"w1"]
        order.append(dispatched.request_id)
        finished = dispatched.request_id
    assert order == [rid(5), rid(3), rid(2), rid(4)]


def test_a_lost_workers_request_goes_back_first_among_its_priority(bus):
    bus.ready(b"w1")
    bus.ready(b"w2")
    bus.request(rid(1))  # on w1
    bus.request(rid(2))  # on w2
    bus.send(CLIENT, Command.REQUEST, rid(3), {"model": "m", "prompt": "hi", "priority": 1})
    bus.request(rid(4))  # priority 0: ahead of rid(3)
    bus.send(b"w1", Command.DISCONNECT)  # rid(1) had no token: back in the queue, first among priority 0
    assert [r.request_id for r in bus.core.requests.queue("m")] == [rid(1), rid(4), rid(3)]


def test_a_timeout_ends_a_queued_request_and_stops_a_running_one(bus):
    bus.ready(b"w1")
    bus.send(CLIENT, Command.REQUEST, rid(1), {"model": "m", "prompt": "hi", "timeout": 5})
    bus.send(CLIENT, Command.REQUEST, rid(2), {"model": "m", "prompt": "hi", "timeout": 2})  # waits
    assert summary(bus.tick(2.5)) == [(CLIENT, "ERROR", rid(2), "deadline_exceeded")]
    bus.at(4.5).alive(b"w1")
    out = bus.tick(5.0)
    assert [(m.identity, m.command, m.request_id, m.body) for m in out if m.command is Command.CANCEL] == [
        (b"w1", Command.CANCEL, rid(1), {"reason": "deadline"})]
    bus.at(5.5).alive(b"w1")
    assert summary(bus.tick(6.0)) == []  # told once
    # its worker ends it with the answer so far: the DONE reaches the client
    assert summary(bus.done(b"w1", rid(1), "deadline")) == [(CLIENT, "DONE", rid(1))]


def test_the_server_wide_timeout_applies_to_requests_without_their_own():
    bus = Bus(request_timeout=3.0)
    bus.ready(b"w1")
    bus.request(rid(1))
    bus.request(rid(2))
    assert summary(bus.tick(3.0)) == [(CLIENT, "ERROR", rid(2), "deadline_exceeded"), (b"w1", "CANCEL", rid(1))]


def test_a_draining_worker_gets_nothing_new_and_its_model_still_queues(bus):
    bus.ready(b"w1", capacity=2)
    bus.request(rid(1))
    bus.send(b"w1", Command.DRAIN)
    assert summary(bus.request(rid(2))) == []  # queued, not refused: the model is still served
    [info] = [w for w in protocol.parse_worker_list(msgpack.unpackb(msgpack.packb(
        bus.send(CLIENT, Command.LIST_WORKERS, rid(201))[0].body)))]
    assert info.draining and info.in_flight == 1
    bus.ready(b"w2", capacity=2)
    assert [m.identity for m in bus.done(b"w1", rid(1))] == [CLIENT]  # nothing more for w1
    assert bus.core.requests.get(rid(2)).worker == b"w2"


def test_a_tokenize_goes_to_a_worker_at_once_even_a_full_one(bus):
    bus.ready(b"w1")
    bus.request(rid(1))  # the only slot
    bus.request(rid(2))  # waits
    out = bus.send(CLIENT, Command.TOKENIZE, rid(3), {"model": "m", "prompt": "hi"})
    assert summary(out) == [(b"w1", "TOKENIZE", rid(3))]
    assert summary(bus.send(b"w1", Command.TOKENS, rid(3), {"tokens": [1], "max_model_len": 8})) == [
        (CLIENT, "TOKENS", rid(3))]
    assert bus.core.requests.get(rid(2)).worker is None  # the generation still waits for the slot
