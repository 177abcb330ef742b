"""bfloat16 linear layers on packed oneDNN weights compute what torch's own linear does."""

from __future__ import annotations

import pytest
import torch

from worker.onednn import PackedLinear, onednn_packing_supported, pack_linear_layers

pytestmark = pytest.mark.skipif(not onednn_packing_supported(torch.device("cpu"), torch.bfloat16),
                                reason="this torch has no oneDNN packed linear")


def test_packed_layers_give_the_same_products_and_free_only_untied_weights():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 96, bias=False), torch.nn.Linear(96, 32),
                                torch.nn.Embedding(96, 64)).to(torch.bfloat16)
    model[0].weight = model[2].weight  # tied, as an output layer to its token embeddings
    plain = [model[0].weight.clone(), model[1].weight.clone()]
    assert pack_linear_layers(model) == 2
    assert isinstance(model[0], PackedLinear) and isinstance(model[1], PackedLinear)
    assert model[0].weight is model[2].weight and torch.equal(model[0].weight, plain[0])  # still shared
    assert model[1].weight.numel() == 0  # nobody else reads it: freed
    with torch.inference_mode():
        for shape in [(1, 64), (9, 64), (3, 70, 64)]:  # a decode step, a batch, a prefill
            x = torch.randn(*shape, dtype=torch.bfloat16)
            first = model[0](x)
            assert torch.equal(first, torch.nn.functional.linear(x, plain[0]))
            want = torch.nn.functional.linear(first.float(), plain[1].float(), model[1].bias.float())
            assert torch.allclose(model[1](first).float(), want, rtol=0.02, atol=0.05)  # bias added in one rounding
