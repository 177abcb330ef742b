"""4-bit weights for the steps that read more weights than they compute: few rows, on a CPU.

A decode step of a few rows is bound by memory: it reads every weight once per step and does
little with each. Reading 4-bit codes (one affine code per group of 32 weights, as GGUF's Q4_1
stores them) instead of 16 or 32-bit floats makes such a step several times faster; with many
rows the step is bound by compute, and the float weights' kernels are faster. So each linear layer
keeps both, and every call picks by its number of rows.

Quantizing the float32 weights that a Q4_0/Q4_1 GGUF dequantizes to finds that file's own codes
again (each group's smallest and largest weight are its codes 0 and 15). By default only such
layers get a 4-bit copy, so no weight is rounded to 4 bits twice: a Q4_1 file's tensors do, its
8-bit token embeddings (the output layer too, when tied) and any float model's do not. Scales and
offsets are held in the type the kernel computes in (bfloat16), like the model's other weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

GROUP_SIZE = 32  # weights sharing one scale and offset: GGUF's Q4_0/Q4_1 block
_LEVELS = 15  # codes 0..15
# A weight further than this from its group's 4-bit grid (in steps of the grid) is not on it.
_ON_GRID = 1e-3


def int4_supported(device: torch.device) -> bool:
    """Whether this torch has the CPU kernel for packed 4-bit weights."""
    return device.type == "cpu" and hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")


class DualLinear(torch.nn.Module):
    """A linear layer with its float weight and a 4-bit copy: calls of at most `max_rows` rows use
    the copy."""

    def __init__(self, linear: torch.nn.Linear, codes: Int4Codes, max_rows: int) -> None:
        super().__init__()
        self.linear = linear
        self.max_rows = max_rows
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("packed", codes.packed, persistent=False)
        self.register_buffer("scales_and_zeros", codes.scales_and_zeros, persistent=False)
        self.grid_error = codes.grid_error
        self._direct = linear.bias is None

    @property
    def weight(self) -> torch.Tensor:  # what other code (tied embeddings, generation utils) reads
        return self.linear.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        if rows > self.max_rows:
            return self.linear(x)
        if self._direct and x.dim() == 2 and x.dtype == self.scales_and_zeros.dtype and x.is_contiguous():
            return int4_matmul(x, self.packed, self.scales_and_zeros)  # a decode step's rows: nothing to adapt
        # the kernel takes contiguous rows only, in the type of its scales
        flat = x.reshape(rows, self.in_features).contiguous().to(self.scales_and_zeros.dtype)
        out = int4_matmul(flat, self.packed, self.scales_and_zeros)
        if self.linear.bias is not None:
            out = out + self.linear.bias
        return out.to(x.dtype).reshape(*x.shape[:-1], self.out_features)


def int4_matmul(x: torch.Tensor, packed: torch.Tensor, scales_and_zeros: torch.Tensor) -> torch.Tensor:
    """`x` [rows, in] (contiguous, in the scales' type) times a 4-bit weight: [rows, out]."""
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, GROUP_SIZE, scales_and_zeros)


@dataclass(frozen=True, slots=True)
class Int4Codes:
    packed: torch.Tensor  # the codes, packed for the CPU kernel
    scales_and_zeros: torch.Tensor  # [groups, out, 2]
    grid_error: float  # how far the weights are from the codes' values, in steps of their grid


def quantize(weight: torch.Tensor, dtype: torch.dtype) -> Int4Codes:
    """Affine 4-bit codes per group of GROUP_SIZE input weights, with scales and zero points in
    `dtype` (the type the kernel computes in)."""
    out_features, in_features = weight.shape
    groups = weight.float().reshape(out_features, in_features // GROUP_SIZE, GROUP_SIZE)
    low, high = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
    scale = (high - low) / _LEVELS
    safe_scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # a constant group: every code 0
    steps = (groups - low) / safe_scale
    codes = steps.round().clamp(0, _LEVELS)
    grid_error = float((steps - codes).abs().max())
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(
        codes.to(torch.int32).reshape(out_features, in_features), 1)
    zero = low + 8 * scale  # the kernel computes (code - 8) * scale + zero
    scales_and_zeros = torch.stack([scale.squeeze(-1).t(), zero.squeeze(-1).t()], dim=-1).contiguous().to(dtype)
    return Int4Codes(packed, scales_and_zeros, grid_error)


def add_int4_weights(model: torch.nn.Module, max_rows: int, dtype: torch.dtype, on_grid_only: bool) -> tuple[int, int]:
    """Give linear layers a 4-bit copy used for calls of at most `max_rows` rows, computed in `dtype`;
    `on_grid_only`: only layers whose weights are 4-bit codes already (read them in float32). Returns
    how many of the layers whose shape the kernel takes got one, and how many there were."""
    replaced = eligible = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is not torch.nn.Linear or child.in_features % GROUP_SIZE or child.out_features % 16:
                continue
            eligible += 1
            codes = quantize(child.weight.detach(), dtype)
            if on_grid_only and codes.grid_error > _ON_GRID:
                continue
            setattr(parent, name, DualLinear(child, codes, max_rows))
            replaced += 1
    return replaced, eligible
