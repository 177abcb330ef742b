"""4-bit copies of the weights for steps of few rows: which layers get one, and what they compute."""

from __future__ import annotations

import pytest
import torch

from broker.settings import load_settings
from worker.config import WorkerSettings
from worker.int4 import GROUP_SIZE, DualLinear, add_int4_weights
from worker.llama_forward import LlamaForward
from worker.loader import load_model
from worker.runner import new_cache

pytestmark = pytest.mark.skipif(not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"),
                                reason="this torch has no packed 4-bit CPU kernel")


def on_grid_linear(out_features: int = 64, in_features: int = 96) -> torch.nn.Linear:
    """A layer whose weights are 4-bit codes, as a Q4_1 GGUF dequantizes them: code * scale + low per group."""
    torch.manual_seed(0)
    groups = in_features // GROUP_SIZE
    codes = torch.randint(0, 16, (out_features, groups, GROUP_SIZE)).float()
    codes[..., 0], codes[..., 1] = 0, 15  # every group spans its whole grid, as Q4_1's do
    scale = torch.rand(out_features, groups, 1) * 0.01 + 0.001
    low = torch.randn(out_features, groups, 1) * 0.05
    linear = torch.nn.Linear(in_features, out_features, bias=False)
    linear.weight.data = (codes * scale + low).reshape(out_features, in_features)
    return linear


def test_only_layers_on_a_4_bit_grid_get_a_copy_unless_every_layer_is_asked_for():
    model = torch.nn.Sequential(on_grid_linear(), torch.nn.Linear(64, 64), torch.nn.Linear(64, 10))
    assert add_int4_weights(model, 4, torch.bfloat16, on_grid_only=True) == (1, 2)  # 10 outputs: not a kernel shape
    assert isinstance(model[0], DualLinear) and type(model[1]) is torch.nn.Linear

    model = torch.nn.Sequential(on_grid_linear(), torch.nn.Linear(64, 64))
    assert add_int4_weights(model, 4, torch.bfloat16, on_grid_only=False) == (2, 2)


def test_the_copy_holds_the_layers_own_weights_and_serves_only_small_calls():
    linear = on_grid_linear()
    model = torch.nn.Sequential(linear)
    add_int4_weights(model, 4, torch.float32, on_grid_only=True)
    dual = model[0]
    with torch.inference_mode():
        # Through the 4-bit kernel, the identity gives back the weights themselves: codes found again, unrounded.
        eye = torch.eye(linear.in_features)
        read = torch.cat([dual(eye[i:i + 4]) for i in range(0, linear.in_features, 4)]).t()
        assert torch.allclose(read, linear.weight, atol=1e-6)
        x = torch.randn(2, 3, linear.in_features)  # 6 rows: more than 4, the float weights
        assert torch.equal(dual(x), linear(x))
        small = torch.randn(1, 3, linear.in_features)
        assert dual(small).shape == (1, 3, linear.out_features)
        assert torch.allclose(dual(small), linear(small), atol=1e-5)


def test_a_bfloat16_copy_computes_in_bfloat16():
    model = torch.nn.Sequential(on_grid_linear())
    add_int4_weights(model, 4, torch.bfloat16, on_grid_only=True)
    model.to(torch.bfloat16)
    x = torch.randn(2, 96, dtype=torch.bfloat16)
    with torch.inference_mode():
        out = model(x)
        want = x.float() @ model[0].linear.weight.float().t()
    assert out.dtype == torch.bfloat16
    assert torch.allclose(out.float(), want, rtol=0.02, atol=0.02)


PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.", "List three prime numbers.", "Hi",
           "Translate 'good morning' into Spanish."]
# Measured over PROMPTS: bfloat16 alone strays from float32 by KL 0.0004-0.004 and at most 0.21 nats on
# the likeliest ten tokens; with the 4-bit layers by KL 0.0007-0.004 and 0.17. Every layer in 4 bits
# (the 8-bit embeddings rounded again) strays by KL 0.03-0.04 and 0.65: these bounds tell them apart.
MAX_KL = 0.01
MAX_LOGPROB_GAP = 0.3


def next_token_logprobs(settings_args: list[str]) -> tuple[list[torch.Tensor], torch.nn.Module]:
    """Per prompt, the log-probabilities of the first answer token, its last prompt token decoded as one row."""
    loaded = load_model(load_settings(WorkerSettings, settings_args))
    result = []
    with torch.inference_mode():
        for text in PROMPTS:
            ids = loaded.tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                       return_tensors="pt", return_dict=True)["input_ids"]
            cache, forward, length = new_cache(), LlamaForward(loaded.model), ids.shape[1]
            forward(ids[:, :-1], torch.ones(1, length - 1, dtype=torch.long), torch.arange(length - 1)[None], cache)
            logits = forward(ids[:, -1:], torch.ones(1, length, dtype=torch.long), torch.tensor([[length - 1]]), cache)[0]
            result.append(torch.log_softmax(logits.float(), -1))
    return result, loaded.model


@pytest.mark.slow
def test_the_default_models_fast_path_stays_close_to_the_float_model():
    reference, _ = next_token_logprobs(["--dtype", "float32"])
    fast, model = next_token_logprobs(["--dtype", "bfloat16"])  # by default: 4-bit copies of the GGUF's 4-bit layers
    dual = [m for m in model.modules() if isinstance(m, DualLinear)]
    assert len(dual) == 4 * model.config.num_hidden_layers  # every projection, joined; not the 8-bit embeddings
    for want, got in zip(reference, fast):
        assert int(got.argmax()) == int(want.argmax())
        top = want.topk(10).indices
        assert float((want[top] - got[top]).abs().max()) < MAX_LOGPROB_GAP
        assert float(torch.sum(want.exp() * (want - got))) < MAX_KL
