"""Loading a causal LM and its tokenizer on the requested device, dtype and quantization."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    PreTrainedTokenizerBase,
)

from worker import llama_forward
from worker.config import WorkerSettings
from worker.int4 import add_int4_weights, int4_supported
from worker.model_source import resolve
from worker.onednn import onednn_packing_supported, pack_linear_layers

log = logging.getLogger(__name__)

# Measured on 2 cores, bfloat16: one row decodes 3x faster on 4-bit weights, 8 rows 1.3x, 16 rows
# as fast as on bfloat16 weights, which are faster beyond.
DEFAULT_INT4_ROWS = 8

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(slots=True)
class LoadedModel:
    model: torch.nn.Module
    tokenizer: PreTrainedTokenizerBase
    names: tuple[str, ...]
    context_length: int


def pick_device(requested: str) -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def pick_dtype(requested: str, device: torch.device) -> torch.dtype:
    if requested != "auto":
        return _DTYPES[requested]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    # Where the CPU computes in bfloat16 natively, it decodes 1.3x (one row) to 1.7x (32 rows) faster
    # than float32, reading half the bytes; elsewhere bfloat16 is emulated, and slow.
    return torch.bfloat16 if cpu_has_bfloat16() else torch.float32


def cpu_has_bfloat16() -> bool:
    """Whether this CPU has bfloat16 instructions: AMX tiles (Intel Sapphire Rapids and later) or
    AVX-512 BF16 (Intel Cooper Lake, AMD Zen 4 and later)."""
    checks = (getattr(torch.cpu, name, None) for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"))
    return any(check is not None and check() for check in checks)  # private in torch 2.x, hence the care


def pick_int4_rows(requested: int | None, device: torch.device, dtype: torch.dtype, stored: torch.dtype | None) -> int:
    """Rows up to which a step reads 4-bit weights. By default only where the kernel computes in the
    model's own type (bfloat16 on a CPU; never float32, whose results are exact across batches) and
    the stored weights are float32, as a converted GGUF's are: 4-bit codes can only be found again in
    those, and a half-precision model is not loaded at twice its size for nothing."""
    if not int4_supported(device):
        if requested:
            raise ValueError("--int4-rows needs a CPU device and torch's packed 4-bit kernel")
        return 0
    if requested is None:
        return DEFAULT_INT4_ROWS if dtype == torch.bfloat16 and stored == torch.float32 else 0
    return requested


def quantization(settings: WorkerSettings, dtype: torch.dtype) -> BitsAndBytesConfig | None:
    if settings.load_8bit and settings.load_4bit:
        raise ValueError("choose one of --load-8bit and --load-4bit")
    if settings.load_8bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    if settings.load_4bit:
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
    return None


def load_model(settings: WorkerSettings) -> LoadedModel:
    source = resolve(settings.model, settings.cache_dir)
    device = pick_device(settings.device)
    dtype = pick_dtype(settings.dtype, device)
    quantization_config = quantization(settings, dtype)
    log.info("loading %s on %s as %s%s", source.location, device, dtype,
             f" ({'8' if settings.load_8bit else '4'}-bit)" if quantization_config else "")
    tokenizer = AutoTokenizer.from_pretrained(source.location)
    stored = getattr(AutoConfig.from_pretrained(source.location), "dtype", None)
    if isinstance(stored, str):
        stored = _DTYPES.get(stored)
    int4_rows = pick_int4_rows(settings.int4_rows, device, dtype, stored) if quantization_config is None else 0
    # 4-bit codes are read off float32 weights (a GGUF's own, unrounded); the model then runs in `dtype`.
    load_dtype = torch.float32 if int4_rows and stored == torch.float32 else dtype
    model = AutoModelForCausalLM.from_pretrained(
        source.location, dtype=load_dtype, quantization_config=quantization_config,
        device_map=str(device) if quantization_config else None,
    )
    if llama_forward.supports(model) and llama_forward.fuse_projections(model):
        log.info("queries, keys and values, and gate and up, each one product")
    if int4_rows:
        # Explicitly asked for: every layer; by default only those a GGUF stored in 4 bits.
        layers, eligible = add_int4_weights(model, int4_rows, dtype, on_grid_only=settings.int4_rows is None)
        log.info("decode steps of up to %d rows read 4-bit weights in %d of %d layers", int4_rows, layers, eligible)
    if quantization_config is None:
        model.to(device, dtype)
        if onednn_packing_supported(device, dtype):
            log.info("%d linear layers on packed oneDNN weights", pack_linear_layers(model))
    model.eval()
    context_length = getattr(model.config, "max_position_embeddings", None) or tokenizer.model_max_length
    names = tuple(settings.model_names) or (source.default_name,)
    return LoadedModel(model, tokenizer, names, int(context_length))
