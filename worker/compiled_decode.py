"""Decode steps as compiled graphs (torch.compile with inductor), on a CPU.

An eager decode step of a small model is hundreds of small operations, each dispatched from Python
and each a pass over memory. Compiled, the operations between the products (norms, rotation,
residual adds, the gated activation, the mask) become a few fused loops of generated C++, and the
products (4-bit, oneDNN) are called without Python in between. Measured on 2 cores, bfloat16,
SmolLM2-135M, the layers of one step (the output layer aside): 1 row 15.2 ms eager against 10.8
compiled on one thread; 16 rows 51 against 34 ms and 32 rows 65 against 53 on two.

Sizes vary symbolically (rows, cached columns, the buffers' room), so the batch growing, shrinking
and getting longer compiles nothing again. What does choose another graph is which products a step
uses: one row, up to the 4-bit copies' rows, and more (`row_counts`). The worker compiles them all
before it serves: on 2 cores about 3 minutes the first time, 40 s later, as torch keeps the generated
code on disk and only traces the model again.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

from worker.int4 import DualLinear
from worker.llama_forward import LlamaForward


class CompiledDecode:
    """`LlamaForward.last_hidden` for decode steps, on a cache of `HeadroomLayer`s."""

    def __init__(self, forward: LlamaForward) -> None:
        self._forward = forward
        self._step = torch.compile(forward.decode_into, dynamic=True, fullgraph=True)

    def __call__(self, input_ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor,
                 cache: DynamicCache) -> torch.Tensor:
        """`input_ids` [B, 1], `mask` [B, L + 1], `positions` [B, 1] over a cache of L columns: the
        hidden state [B, H]; the new keys and values join the cache. The graphs are for tensors of
        their own (their strides are guarded), as the runner makes them: a view of a wider tensor
        would compile another."""
        rooms = [layer.room_for(1) for layer in cache.layers]
        if rooms[0][2] != mask.shape[1] - 1:
            raise RuntimeError(f"a mask of {mask.shape[1]} columns over a cache of {rooms[0][2]}")
        hidden = self._step(input_ids, mask, positions, [room[0] for room in rooms], [room[1] for room in rooms])
        for layer in cache.layers:
            layer.grow(mask.shape[1])
        return hidden

    def warm_up(self, rows: int, cache: DynamicCache) -> None:
        """Compile the graph for steps of `rows` rows, on an empty `cache` of the runner's kind."""
        model = self._forward.model
        config = model.config
        parameter = next(model.parameters())
        cached = 5  # any length will do: it is symbolic
        for index in range(config.num_hidden_layers):
            keys = parameter.new_zeros(rows, self._forward.num_kv_heads, cached, self._forward.head_dim)
            cache.update(keys, keys.clone(), index)
        mask = torch.ones(rows, cached + 1, dtype=torch.long, device=parameter.device)
        input_ids = torch.zeros(rows, 1, dtype=torch.long, device=parameter.device)
        positions = torch.full((rows, 1), cached, device=parameter.device)
        # Floats (the attention's scale, the norms' epsilon) are constants: taken as symbols, they would
        # make the tracer start over once they are found to be.
        with torch._dynamo.config.patch(specialize_float=True):
            self(input_ids, mask, positions, cache)


def row_counts(model: torch.nn.Module, max_rows: int) -> list[int]:
    """Row counts, at most `max_rows`, that between them need every graph a decode step can: one row
    (a size of 1 is its own graph), two, and one more than each `DualLinear`'s limit."""
    limits = {module.max_rows for module in model.modules() if isinstance(module, DualLinear)}
    return sorted(rows for rows in {1, 2} | {limit + 1 for limit in limits} if rows <= max_rows)
