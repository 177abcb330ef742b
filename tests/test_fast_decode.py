"""The runner's own decode step for Llama-family models gives transformers' logits, bit for bit in float32."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from worker.fast_decode import LlamaDecoder
from worker.int4 import DualLinear, add_int4_weights
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
        decoder = LlamaDecoder(model) if use_decoder else None
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
                if decoder is not None:
                    logits = decoder.step(last, mask, next_position, cache)
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


@pytest.mark.parametrize("key_value_heads", [4, 2])  # keys and values 64 wide (fused) or 32 (not: blocks of 64)
def test_fused_4_bit_weights_give_the_separate_layers_logits(tiny_model_dir, key_value_heads):
    config = AutoConfig.from_pretrained(tiny_model_dir, num_key_value_heads=key_value_heads)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    layers, _ = add_int4_weights(model, max_rows=4, dtype=torch.float32, on_grid_only=False)
    assert layers == 7 * model.config.num_hidden_layers + 1  # and the output layer
    theirs, ours = decode_both_ways(model)  # transformers' forward first, on each layer's own 4-bit copy
    # fused: the decoder took the copies over, and the fused layers keep their floats alone
    attention = model.model.layers[0].self_attn
    assert isinstance(attention.q_proj, DualLinear) is (key_value_heads == 2) and isinstance(attention.o_proj, DualLinear)
    for a, b in zip(theirs, ours):  # equal to the 4-bit logits, so not computed on the float weights
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
