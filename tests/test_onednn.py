"""bfloat16 linear layers on packed oneDNN weights compute what torch's own linear does."""

from __future__ import annotations

import pytest
import torch

from worker.onednn import PackedLinear, onednn_packing_supported, pack_linear_layers

pytestmark = pytest.mark.skipif(not onednn_packing_supported(torch.device("cpu"), torch.bfloat16),
                                reason="this torch has no oneDNN packed linear")


def test_packed_layers_give_the_same_products():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 96, bias=False), torch.nn.Linear(96, 32)).to(torch.bfloat16)
    plain = [model[0].weight.clone(), model[1].weight.clone()]
    assert pack_linear_layers(model) == 2
    assert all(isinstance(layer, PackedLinear) for layer in model)
    assert torch.equal(model[0].weight, plain[0])  # what tied embeddings read is still the weight
    with torch.inference_mode():
        for shape in [(1, 64), (9, 64), (3, 70, 64)]:  # a decode step, a batch, a prefill
            x = torch.randn(*shape, dtype=torch.bfloat16)
            first = model[0](x)
            assert torch.equal(first, torch.nn.functional.linear(x, plain[0]))
            want = torch.nn.functional.linear(first.float(), plain[1].float(), model[1].bias.float())
            assert torch.allclose(model[1](first).float(), want, rtol=0.02, atol=0.05)  # bias added in one rounding
