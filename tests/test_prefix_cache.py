"""The worker's prefix cache: the store on small tensors (longest prefix, least recently used out
first), then the engine on the tiny real model and the default model, caching on against off."""

from __future__ import annotations

import pytest
import torch

from broker.protocol import ChatMessage, FinishReason, GenerationRequest
from broker.settings import load_settings
from worker.__main__ import build_engine
from worker.config import WorkerSettings
from worker.engine import Engine
from worker.engine_api import DoneEvent, TokenEvent
from worker.prefix_cache import BLOCK_SIZE, PrefixStore

LAYERS, HEADS, DIM = 2, 1, 2


def kv_of(token_ids: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Fake per-layer KV whose every entry says which token and layer it belongs to."""
    ids = torch.tensor(token_ids, dtype=torch.float32)
    return [(ids[None, :, None].expand(HEADS, -1, DIM) + 1000 * layer,
             -ids[None, :, None].expand(HEADS, -1, DIM) - 1000 * layer) for layer in range(LAYERS)]


def test_a_prompt_finds_its_longest_cached_prefix_in_whole_blocks():
    store = PrefixStore(budget=10 * BLOCK_SIZE)
    stored = list(range(100, 100 + 3 * BLOCK_SIZE + 5))  # three whole blocks and a bit
    store.insert(stored, kv_of(stored))
    assert store.num_tokens == 3 * BLOCK_SIZE

    prompt = stored[:2 * BLOCK_SIZE + 3] + [7, 7, 7]  # parts from it inside the third block
    prefix = store.match(prompt)
    assert prefix is not None and prefix.num_tokens == 2 * BLOCK_SIZE
    layers = prefix.layers(2 * BLOCK_SIZE - 4)
    assert len(layers) == LAYERS
    keys, values = layers[1]
    assert keys.shape == (HEADS, 2 * BLOCK_SIZE - 4, DIM)
    assert keys[0, :, 0].tolist() == [t + 1000.0 for t in stored[:2 * BLOCK_SIZE - 4]]
    assert values[0, :, 0].tolist() == [-t - 1000.0 for t in stored[:2 * BLOCK_SIZE - 4]]

    assert store.match([1] + stored) is None, "a prefix must start at the first token"
    assert store.match(stored[:BLOCK_SIZE - 1]) is None, "less than a block is never cached"
    other_start = [5] * BLOCK_SIZE + stored[BLOCK_SIZE:]
    assert store.match(other_start) is None, "a block is found only after its own parent"


def test_blocks_already_held_are_shared_not_copied():
    store = PrefixStore(budget=10 * BLOCK_SIZE)
    shared = list(range(2 * BLOCK_SIZE))
    store.insert(shared + [1] * BLOCK_SIZE, kv_of(shared + [1] * BLOCK_SIZE))
    store.insert(shared + [2] * BLOCK_SIZE, kv_of(shared + [2] * BLOCK_SIZE))
    assert store.num_tokens == 4 * BLOCK_SIZE  # two shared blocks and one of each tail
    assert store.match(shared + [2] * BLOCK_SIZE + [9]).num_tokens == 3 * BLOCK_SIZE


def test_the_least_recently_used_blocks_go_first_and_leaves_before_their_prefix():
    store = PrefixStore(budget=4 * BLOCK_SIZE)
    shared = list(range(BLOCK_SIZE))
    first = shared + [1] * (2 * BLOCK_SIZE)
    second = shared + [2] * (2 * BLOCK_SIZE)
    store.insert(first, kv_of(first))
    store.insert(second, kv_of(second))  # five blocks for a budget of four: first's last block goes
    assert store.num_tokens == 4 * BLOCK_SIZE and store.num_evicted == 1
    assert store.match(first).num_tokens == 2 * BLOCK_SIZE
    assert store.match(second).num_tokens == 3 * BLOCK_SIZE
    assert store.match(first).num_tokens == 2 * BLOCK_SIZE  # now first is the more recent
    third = [3] * (2 * BLOCK_SIZE)
    store.insert(third, kv_of(third))  # two more blocks: second's two leaves go, the shared one stays
    assert store.match(second).num_tokens == BLOCK_SIZE
    assert store.match(first).num_tokens == 2 * BLOCK_SIZE
    assert store.match(third).num_tokens == 2 * BLOCK_SIZE
    assert store.num_tokens <= store.budget


def test_a_prefix_in_hand_survives_the_eviction_of_its_blocks():
    store = PrefixStore(budget=BLOCK_SIZE)
    tokens = list(range(BLOCK_SIZE))
    store.insert(tokens, kv_of(tokens))
    prefix = store.match(tokens + [0])
    other = [9] * BLOCK_SIZE
    store.insert(other, kv_of(other))
    assert store.match(tokens + [0]) is None
    keys, _ = prefix.layers(BLOCK_SIZE)[0]
    assert keys[0, :, 0].tolist() == [float(t) for t in tokens]


# -- the engine on real models

SYSTEM = "You are a helpful assistant who answers in one short sentence, politely and clearly. " * 3


def make_engine(model: str | None, cache_tokens: int, max_prefill_tokens: int = 64, max_batch: int = 4) -> Engine:
    args = ["--device", "cpu", "--dtype", "float32", "--max-prefill-tokens", str(max_prefill_tokens),
            "--max-batch", str(max_batch), "--prefix-cache-tokens", str(cache_tokens)]
    if model is not None:
        args += ["--model", model]
    return build_engine(load_settings(WorkerSettings, args))[0]


def run(engine: Engine, requests: dict[bytes, GenerationRequest], cancel_after: dict[bytes, int] | None = None):
    """Run requests to their ends: text and DONE per request id. `cancel_after`: cancel a request
    once it has that many tokens."""
    texts = {rid: "" for rid in requests}
    done = {}
    counts = dict.fromkeys(requests, 0)
    for rid, request in requests.items():
        assert engine.add(rid, request) == []
    while engine.has_work:
        events = engine.step()
        for rid, limit in (cancel_after or {}).items():
            if rid not in done and counts[rid] >= limit:
                events += engine.cancel(rid)
        for event in events:
            if isinstance(event, TokenEvent):
                texts[event.request_id] += event.delta.text
                counts[event.request_id] += event.delta.num_tokens
            elif isinstance(event, DoneEvent):
                done[event.request_id] = event.done
    return texts, done


def converse(engine: Engine, num_conversations: int, num_turns: int, max_tokens: int = 12):
    """Conversations sharing a system prompt, all turns of a round in one batch; per round the
    answers and DONEs."""
    histories = {bytes([i + 1]) * 16: [ChatMessage("system", SYSTEM)] for i in range(num_conversations)}
    rounds = []
    for turn in range(num_turns):
        requests = {}
        for number, (rid, history) in enumerate(histories.items()):
            history.append(ChatMessage("user", f"Question {turn} of talk {number}: what is {number * 7 + turn}?"))
            requests[rid] = GenerationRequest(model="m", messages=tuple(history), temperature=0, max_tokens=max_tokens)
        texts, done = run(engine, requests)
        for rid, history in histories.items():
            history.append(ChatMessage("assistant", texts[rid]))
        rounds.append((texts, done))
    return rounds


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: on a small shared host, two threads that wait on each other cost 10x here."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def engines(tiny_model_dir):
    """The tiny model without and with a prefix cache; prompts over 64 tokens go in chunks."""
    return make_engine(str(tiny_model_dir), 0), make_engine(str(tiny_model_dir), 4096)


def test_conversations_hit_the_cache_and_answer_exactly_as_without_it(engines):
    plain, cached = engines
    without, with_cache = converse(plain, 3, 3), converse(cached, 3, 3)
    for turn, ((texts, done), (cached_texts, cached_done)) in enumerate(zip(without, with_cache)):
        assert cached_texts == texts, f"turn {turn}: greedy answers must not change with the cache"
        for rid in texts:
            assert done[rid].cached_tokens == 0
            assert cached_done[rid].prompt_tokens == done[rid].prompt_tokens
            assert cached_done[rid].cached_tokens < done[rid].prompt_tokens
    first_turn, later_turns = with_cache[0][1], [done for _, done in with_cache[1:]]
    # Turn 1: the first conversation misses; the system prompt, kept as its prompt joined, serves
    # the others (each chunked alone after it), in whole blocks.
    hits = sorted(d.cached_tokens for d in first_turn.values())
    assert hits[0] == 0 and all(h >= BLOCK_SIZE for h in hits[1:])
    # Later turns: the previous prompt and answer are cached (a row in a batch takes from its prefix
    # only what leaves it as many tokens to feed as the batch's longest rest).
    for done in later_turns:
        assert all(d.cached_tokens >= BLOCK_SIZE for d in done.values())
        assert sum(d.cached_tokens for d in done.values()) >= 0.5 * sum(d.prompt_tokens for d in done.values())


def test_rows_in_one_batch_share_a_cached_prefix(tiny_model_dir, engines):
    plain, cached = engines
    shared = ("The same long opening, shared word for word by every request in this batch. " * 3).strip()
    requests = {bytes([i + 60]) * 16: GenerationRequest(model="m", prompt=shared + f" Then part {i}:", temperature=0,
                                                       max_tokens=8) for i in range(3)}
    warm = {b"w" * 16: GenerationRequest(model="m", prompt=shared, temperature=0, max_tokens=2)}
    run(cached, warm)
    engine = make_engine(str(tiny_model_dir), 4096, max_prefill_tokens=512)  # the three prefill together
    engine.runner.prefixes = cached.runner.prefixes
    texts, done = run(engine, requests)
    plain_texts, _ = run(plain, requests)
    assert texts == plain_texts
    prompt_tokens = len(engine.prompts.encode(warm[b"w" * 16]))
    assert all(d.cached_tokens == (prompt_tokens // BLOCK_SIZE) * BLOCK_SIZE for d in done.values())


def test_a_request_cancelled_while_using_a_cached_prefix_harms_nothing(engines):
    plain, cached = engines
    opening = "An opening that a cancelled request and the next one both start with, at some length. " * 2
    first = {b"c" * 16: GenerationRequest(model="m", prompt=opening + "First.", temperature=0, max_tokens=30)}
    run(cached, {b"o" * 16: GenerationRequest(model="m", prompt=opening, temperature=0, max_tokens=1)})
    _, done = run(cached, first, cancel_after={b"c" * 16: 3})
    assert done[b"c" * 16].finish_reason is FinishReason.CANCELLED and done[b"c" * 16].cached_tokens > 0
    assert cached.runner.num_rows == 0
    after = {b"a" * 16: GenerationRequest(model="m", prompt=opening + "First. Again", temperature=0, max_tokens=10)}
    texts, done = run(cached, after)
    assert texts == run(plain, after)[0]
    assert done[b"a" * 16].cached_tokens > 0


def test_a_small_budget_evicts_and_answers_stay_the_same(tiny_model_dir, engines):
    plain, _ = engines
    small = make_engine(str(tiny_model_dir), 3 * BLOCK_SIZE)
    rounds = converse(small, 2, 2)
    assert [texts for texts, _ in rounds] == [texts for texts, _ in converse(plain, 2, 2)]
    assert small.runner.prefixes.num_tokens <= 3 * BLOCK_SIZE and small.runner.prefixes.num_evicted > 0
    assert all(d.cached_tokens <= 3 * BLOCK_SIZE for _, done in rounds for d in done.values())


class FullStore(PrefixStore):
    """A store that runs out of memory whenever it is asked to keep something."""

    def insert(self, token_ids, layers) -> None:
        raise RuntimeError("out of memory")


def test_a_store_out_of_memory_costs_only_speed(tiny_model_dir, engines):
    plain, _ = engines
    engine = make_engine(str(tiny_model_dir), 0)
    engine.runner.prefixes = FullStore(4096)
    rounds = converse(engine, 2, 2)
    assert [texts for texts, _ in rounds] == [texts for texts, _ in converse(plain, 2, 2)]
    assert all(d.cached_tokens == 0 for _, done in rounds for d in done.values())


def test_without_a_budget_nothing_is_cached(engines):
    plain, _ = engines
    assert plain.runner.prefixes is None


def test_the_default_model_hits_and_answers_as_without_the_cache():
    engine = make_engine(None, 2048, max_prefill_tokens=512)
    with_cache = converse(engine, 2, 2, max_tokens=8)
    assert all(d.cached_tokens >= BLOCK_SIZE for d in with_cache[1][1].values())
    assert engine.runner.prefixes.num_tokens > 0
    engine.runner.prefixes = None  # the same weights, without the cache
    without = converse(engine, 2, 2, max_tokens=8)
    assert [texts for texts, _ in with_cache] == [texts for texts, _ in without]
    assert all(d.cached_tokens == 0 for _, done in without for d in done.values())
