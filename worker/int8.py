"""An 8-bit copy of the output layer for steps of few rows, on a CPU.

A decode step of one row reads every weight once. With the projections on their 4-bit codes
(`worker/int4.py`), half of what it reads is the output layer (49,152 x 576 for SmolLM2), which a
Q4_1 GGUF stores in 8 bits (Q8_0) and the model holds in bfloat16. An 8-bit copy, one scale per
output row, for torch's packed 8-bit kernel, reads half as much: on 2 cores 2.1 ms a step against
4.5. Rounding the GGUF's 8-bit blocks again to one scale per row moves the next-token distribution
by a KL of 0.0011-0.0024 on the quality test's prompts (bfloat16 alone: 0.0004-0.0007).
"""

from __future__ import annotations

import torch

_LEVELS = 127  # codes -127..127


def int8_supported(device: torch.device) -> bool:
    """Whether this torch has the CPU kernel for 8-bit weights."""
    return device.type == "cpu" and hasattr(torch.ops.aten, "_weight_int8pack_mm")


class Int8Linear(torch.nn.Module):
    """A linear layer with its float weight and an 8-bit copy: calls of at most `max_rows` rows use
    the copy, computed in `dtype`."""

    def __init__(self, linear: torch.nn.Linear, max_rows: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.linear = linear
        self.max_rows = max_rows
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach().float()
        scales = (weight.abs().amax(1) / _LEVELS).clamp(min=torch.finfo(torch.float32).tiny)
        codes = (weight / scales[:, None]).round().clamp(-_LEVELS, _LEVELS).to(torch.int8)
        self.register_buffer("codes", codes, persistent=False)  # [out, in]
        self.register_buffer("scales", scales.to(dtype), persistent=False)  # [out]

    @property
    def weight(self) -> torch.Tensor:  # what other code (tied embeddings, generation utils) reads
        return self.linear.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        if rows > self.max_rows:
            return self.linear(x)
        flat = x.reshape(rows, self.in_features).to(self.scales.dtype).contiguous()
        out = torch.ops.aten._weight_int8pack_mm(flat, self.codes, self.scales)
        if self.linear.bias is not None:
            out = out + self.linear.bias
        return out.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
