"""A decode step of a Llama-family model in a third of the operations of transformers' forward.

A decode step feeds each row one token, so on a CPU with a small model it is made of many small
operations, each costing more to dispatch than to run. transformers' forward builds a mask, runs
hub-kernel hooks, applies rotary embeddings to queries and keys apart and normalises in several
steps; this one reads the same modules' weights (4-bit copies included) and does the same
arithmetic with fewer operations: fused RMS norms, one rotation for queries and keys together, the
boolean mask built once for all layers. In float32 its logits equal transformers' bit for bit
(`tests/test_fast_decode.py`). Prefill, and models of other families, keep transformers' forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import DynamicCache

# Models whose decoder layer is exactly Llama's: RMS norms, rotary attention with grouped keys and
# values, and a gated SiLU MLP.
_FAMILIES = frozenset({"llama"})


class LlamaDecoder:
    """Decode steps of one model: `step` returns the next-token logits of each row."""

    def __init__(self, model: torch.nn.Module) -> None:
        config = model.config
        self.model = model
        self.inner = model.model
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.eps = config.rms_norm_eps

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
        half = head_dim // 2
        hidden = self.inner.embed_tokens(input_ids)  # [B, 1, H]
        width = (hidden.shape[-1],)
        cos, sin = self.inner.rotary_emb(hidden, positions)  # [B, 1, D]
        cos, sin = cos[:, :, None], sin[:, :, None]  # [B, 1, 1, D]: every head alike
        attend = mask.bool()[:, None, None, :]  # [B, 1, 1, L]
        for index, layer in enumerate(self.inner.layers):
            attention, mlp = layer.self_attn, layer.mlp
            normed = F.rms_norm(hidden, width, layer.input_layernorm.weight, self.eps)
            queries = attention.q_proj(normed).view(rows, 1, heads, head_dim)
            keys = attention.k_proj(normed).view(rows, 1, kv_heads, head_dim)
            values = attention.v_proj(normed).view(rows, 1, kv_heads, head_dim)
            rotated = torch.cat([queries, keys], dim=2)  # queries and keys turned together
            rotated = rotated * cos + torch.cat([-rotated[..., half:], rotated[..., :half]], dim=-1) * sin
            all_keys, all_values = cache.update(rotated[:, :, heads:].transpose(1, 2), values.transpose(1, 2), index)
            # One query per row: the query heads of a key head form its rows, so no key is repeated.
            grouped = rotated[:, :, :heads].reshape(rows, kv_heads, heads // kv_heads, head_dim)
            out = F.scaled_dot_product_attention(grouped, all_keys, all_values, attn_mask=attend,
                                                 scale=attention.scaling)
            hidden = hidden + attention.o_proj(out.reshape(rows, 1, heads * head_dim))
            normed = F.rms_norm(hidden, width, layer.post_attention_layernorm.weight, self.eps)
            hidden = hidden + mlp.down_proj(F.silu(mlp.gate_proj(normed)) * mlp.up_proj(normed))
        hidden = F.rms_norm(hidden, width, self.inner.norm.weight, self.eps)
        return self.model.lm_head(hidden[:, -1])
