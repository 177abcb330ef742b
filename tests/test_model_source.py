"""The default model's GGUF file, converted once into a cache folder."""

from __future__ import annotations

import os
import time

import pytest

from worker.model_source import converted_gguf, default_gguf, resolve


@pytest.mark.slow
def test_gguf_is_converted_once_and_killed_conversions_are_cleared(tmp_path):
    gguf = default_gguf()
    first = converted_gguf(gguf, tmp_path)
    assert (first / "config.json").is_file() and list(first.glob("*.safetensors"))
    # What a conversion killed an hour ago left behind, and one still running now.
    dead, live = (first.parent / f".{first.name}-{suffix}" for suffix in ("dead", "live"))
    for folder in (dead, live):
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"partial")
    an_hour_ago = time.time() - 3700
    os.utime(dead, (an_hour_ago, an_hour_ago))
    (first / "config.json").unlink()  # as if the cache were lost: convert again
    second = converted_gguf(gguf, tmp_path)
    assert second == first and (second / "config.json").is_file()
    assert not dead.exists() and live.exists()
    assert resolve(str(gguf), tmp_path).location == str(second)  # a .gguf path finds the same copy
