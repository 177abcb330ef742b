"""The runner's own decode step for Llama-family models gives transformers' logits, bit for bit in float32."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from worker.fast_decode import LlamaDecoder
from worker.model_source import default_model_dir
from worker.runner import _new_cache


def decode_both_ways(model: torch.nn.Module, steps: int = 6) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Greedy decode steps over a left-padded batch of three rows, once with transformers' forward and
    once with `LlamaDecoder`, each from the same prefill; the logits of every step of each."""
    torch.manual_seed(1)
    prompt = torch.randint(10, 1000, (3, 12))
    lengths = torch.tensor([12, 7, 3])  # rows padded on the left
    results = []
    for use_decoder in (False, True):
        mask = (torch.arange(12)[None] >= 12 - lengths[:, None]).long()
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = _new_cache()
        with torch.inference_mode():
            logits = model(input_ids=prompt, attention_mask=mask, position_ids=positions, cache=cache,
                           use_cache=True).logits[:, -1]
            next_position = mask.sum(-1, keepdim=True)
            seen = []
            for _ in range(steps):
                last = logits.argmax(-1, keepdim=True)
                mask = torch.cat([mask, mask.new_ones(3, 1)], dim=1)
                if use_decoder:
                    logits = LlamaDecoder(model).step(last, mask, next_position, cache)
                else:
                    logits = model(input_ids=last, attention_mask=mask, position_ids=next_position, cache=cache,
                                   use_cache=True).logits[:, -1]
                next_position = next_position + 1
                seen.append(logits.clone())
        results.append(seen)
    return results[0], results[1]


def test_the_tiny_models_steps_equal_transformers(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    assert LlamaDecoder.supports(model)
    theirs, ours = decode_both_ways(model)
    for a, b in zip(theirs, ours):
        assert torch.equal(a, b)


@pytest.mark.slow
def test_the_default_models_steps_equal_transformers():
    model = AutoModelForCausalLM.from_pretrained(default_model_dir(), dtype=torch.float32).eval()
    theirs, ours = decode_both_ways(model)
    for a, b in zip(theirs, ours):
        assert torch.equal(a, b)


def test_other_families_keep_transformers_forward(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    model.config.model_type = "gemma"  # a family with another layer: the runner must not take it
    assert not LlamaDecoder.supports(model)
