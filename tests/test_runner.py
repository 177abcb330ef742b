"""The real runner on the tiny model: rows that leave give back their cache and padding."""

from __future__ import annotations

import pytest

from broker.protocol import GenerationRequest
from broker.settings import load_settings
from worker.__main__ import build_engine
from worker.config import WorkerSettings

PROMPTS = {b"s" * 16: ("Hi", 3), b"m" * 16: ("Tell me about the sea and its shores.", 40),
           b"l" * 16: ("A much longer request, one that goes on and on about many things at once, " * 3, 12)}


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    engine, _ = build_engine(load_settings(WorkerSettings, ["--model", str(tiny_model_dir), "--device", "cpu",
                                                            "--dtype", "float32", "--max-prefill-tokens", "16"]))
    return engine


def check_tight(engine) -> None:
    """One cache row per running sequence, in its order, as wide as the longest one needs and no wider."""
    runner, batch = engine.runner, engine.scheduler.running
    mask, positions, cache = runner._mask, runner._positions, runner._cache
    assert runner.num_rows == mask.shape[0] == len(batch) == positions.shape[0]
    assert all(row.generator is not None for row in batch)  # each row samples with its own
    if batch:
        assert mask.shape[1] == int(mask.sum(-1).max())
        assert all(tuple(layer.keys.shape[::2]) == tuple(mask.shape) for layer in cache.layers)
        # row i holds sequence i: its cached tokens are its prompt and all its answer but the last token
        assert mask.sum(-1).tolist() == [len(s.prompt_ids) + len(s.output_ids) - 1 for s in batch]
    else:
        assert cache is None


def test_rows_that_finish_or_are_cancelled_free_their_place(engine):
    runner = engine.runner
    for rid, (prompt, max_tokens) in PROMPTS.items():
        request = GenerationRequest(model="m", prompt=prompt, max_tokens=max_tokens, temperature=0.7, seed=1)
        assert engine.add(rid, request) == []
    seen_widths = []
    cancelled = chunked = False
    while engine.has_work:
        engine.step()
        check_tight(engine)
        chunked |= runner._chunked is not None  # the long prompt is prefilled 16 tokens at a time
        seen_widths.append(runner._mask.shape[1])
        if not cancelled and b"l" * 16 in {s.request_id for s in engine.scheduler.running}:
            engine.cancel(b"l" * 16)  # the longest row leaves: its columns go with it
            cancelled = True
            check_tight(engine)
            assert b"m" * 16 in {s.request_id for s in engine.scheduler.running}
            assert runner._mask.shape[1] < seen_widths[-1]
    assert cancelled and chunked
    assert runner.num_rows == 0 and runner._chunked is None


def test_decode_takes_the_whole_batch_in_row_order(engine):
    runner = engine.runner
    for rid, logprobs in ((b"x" * 16, True), (b"y" * 16, False)):
        engine.add(rid, GenerationRequest(model="m", prompt="Hello there", max_tokens=8, logprobs=logprobs))
    engine.step()
    x, y = engine.scheduler.running
    assert [c.logprob is None for c in runner.decode([x, y])] == [False, True]  # one choice per row, in order
    with pytest.raises(RuntimeError, match="cache holds 2 rows"):
        runner.decode([x])
    engine.drop_all()
    assert runner.num_rows == 0
