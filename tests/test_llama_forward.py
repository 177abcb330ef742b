"""The worker's own forward pass for Llama-family models gives transformers' logits, prefill and decode,
with its projections joined or not, on float or 4-bit weights."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from worker import llama_forward
from worker.int4 import DualLinear, add_int4_weights
from worker.llama_forward import LlamaForward, fuse_projections
from worker.model_source import default_model_dir
from worker.runner import new_cache

# In float32: attention over grouped queries, and products of joined weights, may add up in another
# order than transformers' (measured: 3e-7 at most on the tiny model)
CLOSE = {"rtol": 1e-5, "atol": 1e-5}


def run_both_ways(model: torch.nn.Module, ours: torch.nn.Module, steps: int = 6) -> tuple[list, list]:
    """A left-padded batch of three rows prefilled, then greedy decode steps, once through transformers'
    forward on `model` and once through `LlamaForward` on `ours`; the logits of the prefill and of each step."""
    torch.manual_seed(1)
    prompt = torch.randint(10, 1000, (3, 12))
    lengths = torch.tensor([12, 7, 3])  # rows padded on the left
    results = []
    for forward in (None, LlamaForward(ours)):
        mask = (torch.arange(12)[None] >= 12 - lengths[:, None]).long()
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache, input_ids, seen = new_cache(), prompt, []
        with torch.inference_mode():
            for _ in range(steps + 1):
                if forward is None:
                    logits = model(input_ids=input_ids, attention_mask=mask, position_ids=positions, cache=cache,
                                   use_cache=True, logits_to_keep=1).logits[:, -1]
                else:
                    logits = forward(input_ids, mask, positions, cache)
                seen.append(logits.clone())
                input_ids = logits.argmax(-1, keepdim=True)
                mask = torch.cat([mask, mask.new_ones(3, 1)], dim=1)
                positions = positions[:, -1:] + 1
        results.append(seen)
    return results[0], results[1]


def tiny(tiny_model_dir, **overrides) -> torch.nn.Module:
    config = AutoConfig.from_pretrained(tiny_model_dir, **overrides)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def joined(model: torch.nn.Module) -> torch.nn.Module:
    ours = copy.deepcopy(model)
    assert fuse_projections(ours)
    attention, mlp = ours.model.layers[0].self_attn, ours.model.layers[0].mlp
    assert not hasattr(attention, "q_proj") and not hasattr(mlp, "up_proj")
    return ours


def assert_same(theirs: list, ours: list, **tolerance) -> None:
    for step, (a, b) in enumerate(zip(theirs, ours)):
        assert torch.equal(a.argmax(-1), b.argmax(-1)), step
        assert torch.allclose(a, b, **tolerance), (step, float((a - b).abs().max()))


def test_the_tiny_models_logits_equal_transformers_on_its_own_layers(tiny_model_dir):
    model = tiny(tiny_model_dir)
    assert llama_forward.supports(model)
    theirs, ours = run_both_ways(model, model)
    assert_same(theirs, ours, **CLOSE)


def test_joined_projections_give_the_separate_layers_logits(tiny_model_dir):
    model = tiny(tiny_model_dir)
    theirs, ours = run_both_ways(model, joined(model))
    assert_same(theirs, ours, **CLOSE)


@pytest.mark.parametrize("key_value_heads", [4, 2])
def test_joined_4_bit_weights_give_the_separate_4_bit_layers_logits(tiny_model_dir, key_value_heads):
    model = tiny(tiny_model_dir, num_key_value_heads=key_value_heads)
    ours = joined(model)
    assert add_int4_weights(model, max_rows=4, dtype=torch.float32, on_grid_only=False)[0] == 7 * 2 + 1
    assert add_int4_weights(ours, max_rows=4, dtype=torch.float32, on_grid_only=False)[0] == 4 * 2 + 1
    assert isinstance(ours.model.layers[0].self_attn.qkv_proj, DualLinear)
    # The prefill (3 x 12 tokens) reads the float weights, the 3-row steps the 4-bit codes: 4-bit logits
    # both ways.
    theirs, ours_logits = run_both_ways(model, ours)
    assert_same(theirs, ours_logits, **CLOSE)


def test_a_prompt_prefilled_in_two_passes_gives_the_logits_of_one(tiny_model_dir):
    model = joined(tiny(tiny_model_dir))
    forward = LlamaForward(model)
    prompt = torch.randint(10, 1000, (1, 10))
    with torch.inference_mode():
        whole = forward(prompt, torch.ones(1, 10, dtype=torch.long), torch.arange(10)[None], new_cache())
        cache = new_cache()
        forward(prompt[:, :6], torch.ones(1, 6, dtype=torch.long), torch.arange(6)[None], cache)
        rest = forward(prompt[:, 6:], torch.ones(1, 10, dtype=torch.long), torch.arange(6, 10)[None], cache)
    assert torch.allclose(whole, rest, **CLOSE)


@pytest.mark.slow
def test_the_default_models_logits_equal_transformers():
    model = AutoModelForCausalLM.from_pretrained(default_model_dir(), dtype=torch.float32).eval()
    theirs, ours = run_both_ways(model, joined(model))
    assert_same(theirs, ours, rtol=1e-4, atol=1e-4)


def test_other_families_keep_transformers_forward(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    model.config.model_type = "gemma"  # a family with another layer: the runner must not take it
    assert not llama_forward.supports(model)


def test_projections_that_are_not_plain_linear_layers_stay_apart(tiny_model_dir):
    model = tiny(tiny_model_dir)
    add_int4_weights(model, max_rows=4, dtype=torch.float32, on_grid_only=False)  # as a quantizing library would
    assert not fuse_projections(model)
    assert isinstance(model.model.layers[0].self_attn.q_proj, DualLinear)
