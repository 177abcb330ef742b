"""Embeddings on the bus without processes: the EMBED and EMBEDDINGS bodies, tasks in READY and
MODELS, the broker's routing by task, the worker's pass planning and the API's body parsing."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest

from broker import protocol
from broker.protocol import Command, EmbeddingRequest, Embeddings, ProtocolError, Task
from frontends.openai_api.embeddings import parse_embeddings
from frontends.openai_api.errors import ApiError
from frontends.web.models import chat_models
from tests.test_broker_core import CLIENT, Bus, rid, summary
from worker.embedder import PendingEmbedding, plan_pass

EMBEDDER, GENERATOR = b"embedder", b"generator"


# -- bodies


def test_embedding_request_round_trip_and_refusals():
    texts = EmbeddingRequest.from_fields({"model": "e", "input": ["a", "b"], "dimensions": 8})
    assert EmbeddingRequest.from_fields(texts.to_fields()) == texts and not texts.token_input
    ids = EmbeddingRequest.from_fields({"model": "e", "input": [[1, 2], [3]]})
    assert ids.inputs == ((1, 2), (3,)) and ids.token_input
    for fields, field in [({"model": "e", "input": []}, "input"),
                          ({"model": "e", "input": ["a", [1]]}, "input"),  # no mixing
                          ({"model": "e", "input": [[True]]}, "input"),  # a boolean is no token id
                          ({"model": "e", "input": [[-1]]}, "input"),
                          ({"model": "e", "input": [""]}, "input"),
                          ({"model": "e", "input": ["a"] * (protocol.MAX_EMBED_INPUTS + 1)}, "input"),
                          ({"model": "e", "input": ["a"], "dimensions": 0}, "dimensions"),
                          ({"model": "e", "input": ["a"], "stream": True}, "stream"),
                          ({"input": ["a"]}, "model")]:
        with pytest.raises(ProtocolError) as caught:
            EmbeddingRequest.from_fields(fields)
        assert caught.value.field == field


def test_embeddings_body_is_float32_bin():
    vectors = np.array([[1.0, -2.5, 0.125], [0.0, 3.0, 1e-8]], dtype="<f4")
    body = Embeddings(tuple(v.tobytes() for v in vectors), 3, (4, 5)).to_fields()
    raw = msgpack.unpackb(msgpack.packb(body, use_bin_type=True))
    assert isinstance(raw["embeddings"][0], bytes) and len(raw["embeddings"][0]) == 12
    parsed = Embeddings.from_fields(raw)
    assert np.array_equal(np.frombuffer(b"".join(parsed.vectors), "<f4").reshape(2, 3), vectors)
    assert parsed.prompt_tokens == 9
    with pytest.raises(ProtocolError):
        Embeddings.from_fields({**raw, "dimensions": 4})  # 12 bytes are not 4 float32 values
    with pytest.raises(ProtocolError):
        Embeddings.from_fields({**raw, "token_counts": [1]})


def test_ready_tasks_default_to_generate_and_must_be_known():
    old = {"worker_id": "w", "models": ["m"], "capacity": 1}
    assert protocol.Ready.from_fields(old).tasks == (Task.GENERATE,)
    ready = protocol.Ready("w", ("e",), 4, tasks=(Task.EMBED,))
    assert protocol.Ready.from_fields(ready.to_fields()).tasks == (Task.EMBED,)
    for tasks in (["dance"], [], [{}]):
        with pytest.raises(ProtocolError):
            protocol.Ready.from_fields({**old, "tasks": tasks})


# -- the broker


def embedding_bus(**settings) -> Bus:
    bus = Bus(**settings)
    bus.send(EMBEDDER, Command.READY, b"", protocol.Ready("e", ("e",), 2, 256, tasks=(Task.EMBED,)).to_fields())
    bus.ready(GENERATOR, "g")
    return bus


def embed(bus: Bus, request_id: bytes, model: str = "e") -> list:
    return bus.send(CLIENT, Command.EMBED, request_id, {"model": model, "input": ["hello"]})


def answer(bus: Bus, request_id: bytes) -> list:
    body = Embeddings((bytes(8),), 2, (3,)).to_fields()
    return bus.send(EMBEDDER, Command.EMBEDDINGS, request_id, body)


def test_models_and_workers_say_what_they_do():
    bus = embedding_bus()
    assert {name: info.tasks for name, info in bus.models().items()} == {"e": ("embed",), "g": ("generate",)}
    [reply] = bus.send(CLIENT, Command.LIST_WORKERS, rid(201))
    workers = protocol.parse_worker_list(msgpack.unpackb(msgpack.packb(reply.body)))
    assert {w.worker_id: w.tasks for w in workers} == {"e": ("embed",), "generator": ("generate",)}


def test_a_task_the_model_does_not_serve_is_refused_before_any_worker_sees_it():
    bus = embedding_bus()
    out = bus.request(rid(1), model="e")  # a chat request to the embedding model
    assert summary(out) == [(CLIENT, "ERROR", rid(1), "bad_request")]
    assert "model 'e' does not serve 'generate' requests; it serves: embed" in out[0].body["message"]
    out = embed(bus, rid(2), model="g")
    assert summary(out) == [(CLIENT, "ERROR", rid(2), "bad_request")]
    assert "'embed'" in out[0].body["message"] and "generate" in out[0].body["message"]


def test_embed_runs_like_a_request_and_its_answer_frees_the_slot():
    bus = embedding_bus()
    assert summary(embed(bus, rid(1))) == [(EMBEDDER, "EMBED", rid(1))]
    assert summary(embed(bus, rid(2))) == [(EMBEDDER, "EMBED", rid(2))]
    assert summary(embed(bus, rid(3))) == []  # capacity 2: queued
    assert bus.models()["e"].queued == 1
    out = answer(bus, rid(1))
    assert summary(out) == [(CLIENT, "EMBEDDINGS", rid(1)), (EMBEDDER, "EMBED", rid(3))]
    relayed = Embeddings.from_fields(msgpack.unpackb(out[0].body))  # forwarded verbatim, still packed
    assert relayed == Embeddings((bytes(8),), 2, (3,))


def test_an_embed_of_a_lost_worker_goes_to_another_and_cancel_reaches_the_worker():
    bus = embedding_bus()
    embed(bus, rid(1))
    other = b"embedder-2"
    bus.send(other, Command.READY, b"", protocol.Ready("e2", ("e",), 2, tasks=(Task.EMBED,)).to_fields())
    out = bus.send(EMBEDDER, Command.DISCONNECT)
    assert summary(out) == [(other, "EMBED", rid(1))]  # no token was ever sent: safe to run again
    assert summary(bus.send(CLIENT, Command.CANCEL, rid(1))) == [(other, "CANCEL", rid(1))]


def test_one_name_for_both_tasks_queues_each_kind_on_its_own():
    """An EMBED waiting for the full embedding worker holds up no REQUEST while a generating worker
    of the same name is free, and the other way round."""
    bus = Bus()
    bus.send(EMBEDDER, Command.READY, b"", protocol.Ready("e", ("both",), 1, tasks=(Task.EMBED,)).to_fields())
    bus.ready(GENERATOR, "both")
    assert summary(embed(bus, rid(1), model="both")) == [(EMBEDDER, "EMBED", rid(1))]
    assert summary(embed(bus, rid(2), model="both")) == []  # the embedding worker is full
    assert summary(bus.request(rid(3), model="both")) == [(GENERATOR, "REQUEST", rid(3))]
    assert summary(bus.request(rid(4), model="both")) == []  # now the generating worker is full too
    assert summary(answer(bus, rid(1))) == [(CLIENT, "EMBEDDINGS", rid(1)), (EMBEDDER, "EMBED", rid(2))]
    assert summary(bus.done(GENERATOR, rid(3))) == [(CLIENT, "DONE", rid(3)), (GENERATOR, "REQUEST", rid(4))]


def test_requests_queued_while_workers_announce_end_when_the_model_turns_out_not_to_embed():
    bus = Bus()  # in its first heartbeat intervals: requests for unseen models wait
    assert summary(embed(bus, rid(1), model="g")) == []
    out = bus.ready(GENERATOR, "g")
    assert summary(out) == [(CLIENT, "ERROR", rid(1), "bad_request")]


# -- the embedding worker's passes


def pending(request_id: bytes, *lengths: int) -> PendingEmbedding:
    return PendingEmbedding(request_id, [[7] * n for n in lengths], 4)


def test_a_pass_takes_inputs_in_order_within_the_padded_token_budget():
    first, second = pending(rid(1), 10, 10), pending(rid(2), 10, 30, 10)
    plan = plan_pass([first, second], max_tokens=40)
    # 10, 10, 10 fit (3 x 10); the 30-token input would make 4 x 30 = 120: it waits
    assert [(r.request_id, len(taken)) for r, taken in plan] == [(rid(1), 2), (rid(2), 1)]
    second.vectors.append(np.zeros(4))
    assert [(r.request_id, [len(t) for t in taken]) for r, taken in plan_pass([second], 40)] == [(rid(2), [30])]


def test_a_pass_always_runs_the_first_input_whatever_its_length():
    plan = plan_pass([pending(rid(1), 500, 1)], max_tokens=64)
    assert [(r.request_id, [len(t) for t in taken]) for r, taken in plan] == [(rid(1), [500])]


def test_many_small_requests_share_one_pass():
    requests = [pending(rid(n), 12) for n in range(32)]
    assert len(plan_pass(requests, max_tokens=64 * 256)) == 32


# -- the API body and the web chat's list


def test_api_input_shapes_become_embeds_of_at_most_the_bus_limit():
    assert parse_embeddings({"model": "e", "input": "hi"}).requests[0].inputs == ("hi",)
    assert parse_embeddings({"model": "e", "input": [1, 2, 3]}).requests[0].inputs == ((1, 2, 3),)
    assert parse_embeddings({"model": "e", "input": [[1], [2, 3]]}).requests[0].inputs == ((1,), (2, 3))
    call = parse_embeddings({"model": "e", "input": ["t"] * 300, "encoding_format": "base64", "user": "u"})
    assert [len(r.inputs) for r in call.requests] == [32] * 9 + [12] and call.encoding_format == "base64"
    for body, param in [({"model": "e", "input": ""}, "input"), ({"model": "e", "input": []}, "input"),
                        ({"model": "e", "input": [[]]}, "input"), ({"model": "e", "input": ["a", 1]}, "input"),
                        ({"model": "e", "input": ["a"] * 2049}, "input"), ({"model": "e"}, "input"),
                        ({"model": "e", "input": "a", "encoding_format": "int8"}, "encoding_format"),
                        ({"model": "e", "input": "a", "dimensions": True}, "dimensions"),
                        ({"model": "e", "input": "a", "dimensions": 0}, "dimensions"),
                        ({"model": "e", "input": "a", "user": 5}, "user"),
                        ({"model": "e", "input": "a", "stream": True}, "stream")]:
        with pytest.raises(ApiError) as caught:
            parse_embeddings(body)
        assert (caught.value.status, caught.value.param) == (400, param)


def test_the_web_chat_lists_only_models_that_chat():
    infos = [protocol.ModelInfo("g", 1, 1, 0, 0, 64), protocol.ModelInfo("e", 1, 1, 0, 0, 256, ("embed",)),
             protocol.ModelInfo("both", 2, 2, 0, 0, 64, ("embed", "generate"))]
    assert [info.name for info in chat_models(infos)] == ["g", "both"]


# -- the embedding engine, on a runner that needs no model


class CountingRunner:
    """Vectors that say which input they came from: [length, first id, 0, 0]; records each pass."""

    max_length, dimensions, vocab_size, normalized = 8, 4, 100, False

    def __init__(self, fail: bool = False) -> None:
        self.passes: list[int] = []
        self.fail = fail

    def text_ids(self, texts: list[str]) -> list[list[int]]:
        return [[1, *(ord(c) % 90 + 5 for c in text), 2] for text in texts]

    def with_special_tokens(self, ids: list[int]) -> list[int]:
        return [1, *ids, 2]

    def embed(self, batch: list[list[int]]) -> np.ndarray:
        if self.fail:
            raise RuntimeError("out of memory")
        self.passes.append(len(batch))
        return np.array([[len(ids), ids[1], 0, 0] for ids in batch], dtype=np.float32)


def engine(runner: CountingRunner, max_tokens: int = 64, shorten: bool = False):
    from worker.embedder import Embedder
    return Embedder(runner, "e", max_tokens, shorten)


def request(*inputs, dimensions=None) -> EmbeddingRequest:
    return EmbeddingRequest("e", tuple(inputs), dimensions)


def vectors(event) -> np.ndarray:
    answer = event.embeddings
    return np.frombuffer(b"".join(answer.vectors), "<f4").reshape(-1, answer.dimensions)


def test_requests_that_arrive_together_share_a_pass_and_each_gets_one_answer():
    runner = CountingRunner()
    embedder = engine(runner)
    assert embedder.add(rid(1), request("ab", "c")) == [] and embedder.add(rid(2), request((7, 8))) == []
    events = embedder.step()
    assert runner.passes == [3] and not embedder.has_work
    assert [e.request_id for e in events] == [rid(1), rid(2)]
    assert vectors(events[0]).tolist() == [[4, ord("a") % 90 + 5, 0, 0], [3, ord("c") % 90 + 5, 0, 0]]
    assert vectors(events[1]).tolist() == [[4, 7, 0, 0]]  # token ids framed by the special tokens
    assert events[0].embeddings.token_counts == (4, 3)


def test_a_large_request_is_spread_over_passes_and_answered_once_whole():
    runner = CountingRunner()
    embedder = engine(runner, max_tokens=12)  # three 4-token inputs per pass
    embedder.add(rid(1), request(*["ab"] * 7))
    answers = []
    while embedder.has_work:
        answers += embedder.step()
    assert runner.passes == [3, 3, 1] and len(answers) == 1 and len(vectors(answers[0])) == 7


def test_inputs_the_model_cannot_take_are_refused_before_any_pass():
    runner = CountingRunner()
    embedder = engine(runner)
    [error] = embedder.add(rid(1), request("short", "much too long"))
    assert error.error.code is protocol.ErrorCode.CONTEXT_LENGTH_EXCEEDED
    assert "'input[1]' has 15 tokens, more than the maximum of 8" in error.error.message
    [error] = embedder.add(rid(2), request((5, 100)))
    assert error.error.code is protocol.ErrorCode.BAD_REQUEST and "token id 100" in error.error.message
    [error] = embedder.add(rid(3), request("a", dimensions=2))
    assert "cannot shorten" in error.error.message
    [error] = embedder.add(rid(4), request("a", dimensions=5))
    assert error.error.code is protocol.ErrorCode.BAD_REQUEST
    assert not embedder.has_work and runner.passes == []


def test_a_model_that_may_be_shortened_cuts_its_vectors():
    embedder = engine(CountingRunner(), shorten=True)
    embedder.add(rid(1), request("ab", dimensions=2))
    [answer] = embedder.step()
    assert answer.embeddings.dimensions == 2 and vectors(answer).tolist() == [[4, ord("a") % 90 + 5]]


def test_cancel_answers_done_cancelled_and_a_failed_pass_fails_its_requests():
    embedder = engine(CountingRunner())
    embedder.add(rid(1), request("a"))
    [done] = embedder.cancel(rid(1))
    assert done.done.finish_reason is protocol.FinishReason.CANCELLED and not embedder.has_work
    assert embedder.cancel(rid(1)) == []  # already ended: nothing more
    failing = engine(CountingRunner(fail=True))
    failing.add(rid(2), request("a"))
    [error] = failing.step()
    assert error.error.code is protocol.ErrorCode.INTERNAL and "out of memory" in error.error.message
    assert not failing.has_work


def test_inputs_of_a_pass_run_in_groups_of_similar_length():
    from worker.embedder import length_groups

    assert length_groups([]) == []
    assert length_groups([10, 10, 11, 12]) == [slice(0, 4)]  # 48 padded for 43 real: within 20%
    assert length_groups([3, 10, 10, 40]) == [slice(0, 1), slice(1, 3), slice(3, 4)]
    runner = CountingRunner()
    runner.max_length = 64
    embedder = engine(runner, max_tokens=1000)
    embedder.add(rid(1), request("a" * 30, "b", "c" * 29))
    [answer] = embedder.step()
    assert runner.passes == [1, 2]  # the short one alone, the two long ones together
    assert vectors(answer)[:, 0].tolist() == [32, 3, 31]  # answered in input order


# -- where the embedding model comes from


def test_a_zipped_model_is_extracted_once_into_the_cache_and_found_as_sentence_transformers(tmp_path):
    import zipfile

    from worker.embedding_source import extracted_zip, is_sentence_transformers_folder

    archive = tmp_path / "model.zip"
    with zipfile.ZipFile(archive, "w") as files:
        files.writestr("config.json", "{}")
        files.writestr("modules.json", "[]")
    folder = extracted_zip(archive, "small", tmp_path / "cache")
    assert folder.parent == tmp_path / "cache" / "extracted" and (folder / "modules.json").is_file()
    (folder / "marker").write_text("kept")
    assert extracted_zip(archive, "small", tmp_path / "cache") == folder and (folder / "marker").is_file()
    assert is_sentence_transformers_folder(str(folder))
    (tmp_path / "chat").mkdir()
    (tmp_path / "chat" / "config.json").write_text("{}")
    assert not is_sentence_transformers_folder(str(tmp_path / "chat"))
    assert not is_sentence_transformers_folder(None) and not is_sentence_transformers_folder("org/hub-id")
