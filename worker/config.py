"""The worker's options."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from broker import protocol
from broker.settings import DEFAULT_BROKER_ADDRESS, BusPeerSettings, cli_config


class WorkerSettings(BusPeerSettings):
    model_config = cli_config("worker", "python -m worker")

    broker: str = Field(DEFAULT_BROKER_ADDRESS, description="ZeroMQ address of the broker")
    model: str | None = Field(None, description="local folder, .gguf file or hub id (default: SmolLM2-135M-Instruct; "
                                                "with --task embed, all-MiniLM-L6-v2)")
    task: Literal["auto", "generate", "embed"] = Field(
        "auto", description="what the model does: generate text, or embed (a sentence-transformers model); "
                            "auto: embed for a sentence-transformers folder, else generate")
    shorten_embeddings: bool = Field(False, description="the embedding model was trained to be cut short (Matryoshka): "
                                                        "accept 'dimensions' below its own")
    chat_template: Path | None = Field(None, description="a Jinja chat template file to use instead of the model's own "
                                                         "(one that takes tools gets them natively)")
    model_names: list[str] = Field(default_factory=list, description="names to serve the model under (default: from the model)")
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$", description="auto, cpu, cuda or cuda:N")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("auto", description="weights and activations type")
    load_8bit: bool = Field(False, description="quantize weights to 8 bits with bitsandbytes")
    load_4bit: bool = Field(False, description="quantize weights to 4 bits (NF4) with bitsandbytes")
    int4_rows: int | None = Field(None, ge=0, description="decode steps of at most this many rows read 4-bit copies of "
                                                           "the weights (CPU; several times faster for few streams); "
                                                           "default: 8 in bfloat16 on a CPU for models stored in float32 "
                                                           "(converted GGUFs), else 0 (off)")
    compile_decode: bool = Field(True, description="compile decode steps into fused graphs before serving "
                                                   "(torch.compile, CPU, Llama-family models; needs a C++ compiler, "
                                                   "else steps stay eager): steps 0.79-0.97 the time of eager ones, "
                                                   "for about 3 minutes more at the first start on 2 cores, 40 s later")
    max_batch: int = Field(64, ge=1, description="sequences run at once: the capacity announced to the broker")
    max_batch_tokens: int = Field(0, ge=0, description="KV cache budget in tokens: rows x the longest prompt + max_tokens; 0 = max-batch x context. "
                                                       "Embedding workers: padded tokens per forward pass; 0 = 2048 on a CPU, 16384 on a GPU")
    max_prefill_tokens: int = Field(0, ge=0, description="prompt tokens prefilled per step, longer prompts in chunks; 0 = 512 on a CPU, 4096 on a GPU")
    prefix_cache_tokens: int = Field(8192, ge=0, description="tokens of finished prompts' and answers' KV cache kept "
                                                            "for prompts that start alike (least recently used out first); 0 = off")
    cache_dir: Path | None = Field(None, description="where converted GGUF models are kept (default: ~/.cache/tokenbus)")
    threads: int = Field(0, ge=0, description="torch CPU threads; 0 = one per physical core (torch's default), one "
                                               "fewer for steps of at most 8 rows (but their output layer); 1 when several "
                                               "workers share a small host")
    heartbeat_interval: float = Field(protocol.HEARTBEAT_INTERVAL, gt=0, description="seconds between heartbeats")
    drain_timeout: float = Field(30.0, ge=0, description="on SIGTERM or SIGINT, seconds to finish the requests held "
                                 "(the broker sends no new ones) before leaving; those still running then resume "
                                 "on another worker. A second signal leaves at once")
    log_level: str = Field("INFO", description="logging level")
