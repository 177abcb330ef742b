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


def check_tight(runner) -> None:
    """One cache row per running sequence, as wide as the longest one needs and no wider."""
    layout = runner.layout()
    assert layout.mask_shape[0] == len(layout.rows) == layout.num_positions
    assert all(row.generator is not None for row in layout.rows)  # each row samples with its own
    if layout.rows:
        assert layout.mask_shape[1] == layout.longest_row
        assert all(shape == layout.mask_shape for shape in layout.layer_shapes)
    else:
        assert layout.layer_shapes == ()


def test_rows_that_finish_or_are_cancelled_free_their_place(engine):
    runner = engine.runner
    for rid, (prompt, max_tokens) in PROMPTS.items():
        request = GenerationRequest(model="m", prompt=prompt, max_tokens=max_tokens, temperature=0.7, seed=1)
        assert engine.add(rid, request) == []
    seen_widths = []
    cancelled = chunked = False
    while engine.has_work:
        engine.step()
        check_tight(runner)
        assert list(runner.layout().rows) == engine.scheduler.running  # the scheduler's running sequences, in row order
        chunked |= runner.layout().num_partial > 0  # the long prompt is prefilled 16 tokens at a time
        seen_widths.append(runner.layout().mask_shape[1] if runner.num_rows else 0)
        if not cancelled and b"l" * 16 in {s.request_id for s in runner.layout().rows}:
            engine.cancel(b"l" * 16)  # the longest row leaves: its columns go with it
            cancelled = True
            check_tight(runner)
            assert b"m" * 16 in {s.request_id for s in runner.layout().rows}
            assert runner.layout().mask_shape[1] < seen_widths[-1]
    assert cancelled and chunked
    assert runner.layout().rows == () and runner.layout().num_partial == 0


def test_decode_takes_exactly_the_cached_rows_in_any_order(engine):
    runner = engine.runner
    for rid, logprobs in ((b"x" * 16, True), (b"y" * 16, False)):
        engine.add(rid, GenerationRequest(model="m", prompt="Hello there", max_tokens=8, logprobs=logprobs))
    engine.step()
    x, y = engine.scheduler.running
    assert [c.logprob is None for c in runner.decode([y, x])] == [True, False]  # in the order asked
    with pytest.raises(RuntimeError, match="cache holds"):
        runner.decode([x])
    engine.drop_all()
    assert runner.num_rows == 0
