"""A decode step of a Llama-family model in a third of the operations of transformers' forward.

A decode step feeds each row one token, so on a CPU with a small model it is made of many small
operations, each costing more to dispatch than to run. transformers' forward builds a mask, runs
hub-kernel hooks, applies rotary embeddings to queries and keys apart and normalises in several
steps; this one reads the same modules' weights (4-bit copies included) and does the same
arithmetic with fewer operations: fused RMS norms, one rotation for queries and keys together, the
boolean mask built once for all layers. In float32 its logits equal transformers' bit for bit
(`tests/test_fast_decode.py`). Prefill, and models of other families, keep transformers' forward.

Steps of few rows on 4-bit weights (`worker/int4.py`) call the 4-bit kernel directly, on one fused
weight for queries, keys and values and one for gate and up: 7 projections per layer in 4 calls,
with their outputs bit for bit those of the separate layers (one row: 23 ms a step against 19 on 2
cores).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from worker.int4 import DualLinear, Int4Codes, can_fuse, fused_codes, int4_matmul

# Models whose decoder layer is exactly Llama's: RMS norms, rotary attention with grouped keys and
# values, and a gated SiLU MLP.
_FAMILIES = frozenset({"llama"})


@dataclass(frozen=True, slots=True)
class _Int4Layer:
    """One layer's projections as 4-bit codes."""

    qkv: Int4Codes  # queries, keys and values, side by side
    o: Int4Codes
    gate_up: Int4Codes  # gate and up, side by side
    down: Int4Codes


class LlamaDecoder:
    """Decode steps of one model: `step` returns the next-token logits of each row.

    Where every projection has a 4-bit copy, the decoder takes those copies over as fused weights
    (the layers keep only their float weights, for prefill and larger steps)."""

    def __init__(self, model: torch.nn.Module) -> None:
        config = model.config
        self.model = model
        self.inner = model.model
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.eps = config.rms_norm_eps
        self.int4_rows, self._int4_layers = _take_int4_copies(self.inner.layers)

    @staticmethod
    def supports(model: torch.nn.Module) -> bool:
        config = model.config
        return (config.model_type in _FAMILIES and getattr(config, "hidden_act", "silu") == "silu"
                and getattr(config, "pretraining_tp", 1) == 1 and hasattr(model, "model")
                and hasattr(model.model, "rotary_emb"))

    def step(self, input_ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor,
             cache: DynamicCache) -> torch.Tensor:
        """`input_ids` [B, 1], `mask` [B, L] (1 where a token is cached, the new one included),
        `positions` [B, 1]; returns logits [B, V]."""
        rows = input_ids.shape[0]
        heads, kv_heads, head_dim = self.num_heads, self.num_kv_heads, self.head_dim
        half, keys_end = head_dim // 2, (heads + kv_heads) * head_dim
        int4 = self._int4_layers if rows <= self.int4_rows else None
        hidden = self.inner.embed_tokens(input_ids)[:, 0]  # [B, H]
        width = (hidden.shape[-1],)
        cos, sin = self.inner.rotary_emb(hidden, positions)  # [B, 1, D]
        cos, sin = cos[:, :, None], sin[:, :, None]  # [B, 1, 1, D]: every head alike
        attend = mask.bool()[:, None, None, :]  # [B, 1, 1, L]
        for index, layer in enumerate(self.inner.layers):
            attention, mlp = layer.self_attn, layer.mlp
            normed = F.rms_norm(hidden, width, layer.input_layernorm.weight, self.eps)
            if int4 is not None:
                projected = int4_matmul(normed, int4[index].qkv)
                queries_keys = projected[:, :keys_end].view(rows, 1, heads + kv_heads, head_dim)
                values = projected[:, keys_end:].view(rows, 1, kv_heads, head_dim)
            else:
                queries_keys = torch.cat([attention.q_proj(normed).view(rows, 1, heads, head_dim),
                                          attention.k_proj(normed).view(rows, 1, kv_heads, head_dim)], dim=2)
                values = attention.v_proj(normed).view(rows, 1, kv_heads, head_dim)
            turned = torch.cat([-queries_keys[..., half:], queries_keys[..., :half]], dim=-1)
            rotated = queries_keys * cos + turned * sin  # queries and keys turned together
            all_keys, all_values = cache.update(rotated[:, :, heads:].transpose(1, 2), values.transpose(1, 2), index)
            # One query per row: the query heads of a key head form its rows, so no key is repeated.
            grouped = rotated[:, :, :heads].reshape(rows, kv_heads, heads // kv_heads, head_dim)
            out = F.scaled_dot_product_attention(grouped, all_keys, all_values, attn_mask=attend,
                                                 scale=attention.scaling).reshape(rows, heads * head_dim)
            hidden = hidden + (int4_matmul(out, int4[index].o) if int4 is not None else attention.o_proj(out))
            normed = F.rms_norm(hidden, width, layer.post_attention_layernorm.weight, self.eps)
            if int4 is not None:
                gate_up = int4_matmul(normed, int4[index].gate_up)
                intermediate = gate_up.shape[-1] // 2
                activated = F.silu(gate_up[:, :intermediate]) * gate_up[:, intermediate:]
                hidden = hidden + int4_matmul(activated, int4[index].down)
            else:
                hidden = hidden + mlp.down_proj(F.silu(mlp.gate_proj(normed)) * mlp.up_proj(normed))
        hidden = F.rms_norm(hidden, width, self.inner.norm.weight, self.eps)
        return self.model.lm_head(hidden)


def _take_int4_copies(layers: torch.nn.ModuleList) -> tuple[int, list[_Int4Layer] | None]:
    """Fused 4-bit weights of every layer, and the rows up to which steps use them; (0, None) unless
    every projection has a 4-bit copy. The copies of the fused projections leave their layers."""
    duals = [(layer.self_attn, layer.mlp) for layer in layers]
    if not duals or not all(isinstance(getattr(module, name), DualLinear)
                            for attention, mlp in duals for module, names in ((attention, _ATTENTION), (mlp, _MLP))
                            for name in names):
        return 0, None
    if not all(can_fuse([attention.q_proj, attention.k_proj, attention.v_proj])
               and can_fuse([mlp.gate_proj, mlp.up_proj]) for attention, mlp in duals):
        return 0, None  # the layers' own copies serve, one call each
    fused = []
    for attention, mlp in duals:
        fused.append(_Int4Layer(fused_codes([attention.q_proj, attention.k_proj, attention.v_proj]),
                                attention.o_proj.codes, fused_codes([mlp.gate_proj, mlp.up_proj]),
                                mlp.down_proj.codes))
        for module, name in ((attention, "q_proj"), (attention, "k_proj"), (attention, "v_proj"),
                             (mlp, "gate_proj"), (mlp, "up_proj")):
            setattr(module, name, getattr(module, name).linear)
    rows = min(module.max_rows for attention, mlp in duals for module in (attention.o_proj, mlp.down_proj))
    return rows, fused


_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")
