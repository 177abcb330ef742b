"""The reference: one stream through plain `model.generate`, no bus, no server."""

from __future__ import annotations

import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from bench.load import prompt


def generate_tokens_per_second(model_dir: str, max_tokens: int, device: torch.device, dtype: torch.dtype,
                               repeats: int = 3) -> float:
    """Greedy `generate` of `max_tokens` new tokens for a chat prompt; the best of `repeats` runs."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt(0)}], tokenize=False,
                                         add_generation_prompt=True)
    inputs = tokenizer(text, return_tensors="pt", add_special_tokens=False).to(device)
    best = 0.0
    with torch.inference_mode():
        model.generate(**inputs, max_new_tokens=4, do_sample=False)  # warm-up
        for _ in range(repeats):
            start = time.perf_counter()
            output = model.generate(**inputs, max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False)
            elapsed = time.perf_counter() - start
            best = max(best, (output.shape[1] - inputs.input_ids.shape[1]) / elapsed)
    return best
