"""CUDA paths: bf16 and bitsandbytes on the GPU. Skipped on machines without one."""

import pytest
import torch

from broker.settings import load_settings
from tests.test_default_model import FRANCE, run_engine
from worker.__main__ import build_engine
from worker.config import WorkerSettings

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("flags", [["--dtype", "bfloat16"], ["--load-8bit"], ["--load-4bit"]])
def test_default_model_on_cuda(flags):
    engine, _ = build_engine(load_settings(WorkerSettings, ["--device", "cuda", *flags]))
    assert engine.runner.device.type == "cuda"
    assert "Paris" in run_engine(engine, {b"g" * 16: FRANCE[0]["content"]}, {}, 16)[b"g" * 16]
