"""Shared fixtures; what they are built from lives in `tests/helpers.py`."""

from __future__ import annotations

import os

from worker.threads import prepare_openmp_environment

# Engines built inside the test process wait as a worker's do: before any test module loads torch
# (with OpenMP's default spinning, a busy host made their steps about ten times slower).
prepare_openmp_environment()

# The suite's workers and engines decode eagerly: compiling each one's steps would take it minutes.
# tests/test_compiled_decode.py compiles them on purpose.
os.environ.setdefault("TOKENBUS_WORKER_COMPILE_DECODE", "false")

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import TINY_MODEL, Bus, build_tiny_model, serving
from tests.processes import free_address, start_broker, start_worker, stop


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="module")
def bus(tiny_model_dir) -> Iterator[Bus]:
    """The tiny model served as 'tiny' (capacity 4)."""
    with serving(tiny_model_dir, TINY_MODEL, "--model-names", TINY_MODEL, "--max-batch", "4") as running:
        yield running


@pytest.fixture(scope="session")
def default_bus() -> Iterator[Bus]:
    """The real default model, SmolLM2-135M-Instruct (capacity 64)."""
    from worker.model_source import DEFAULT_MODEL_NAME

    with serving(None, DEFAULT_MODEL_NAME) as running:
        yield running


@pytest.fixture
def stack(tiny_model_dir):
    """Start brokers and workers on demand; everything is stopped at the end of the test."""
    processes = []

    class Stack:
        address = free_address()

        def broker(self, *args):
            processes.append(start_broker(self.address, "--heartbeat-interval", "0.5", *args))
            return processes[-1]

        def worker(self, *args, name=TINY_MODEL):
            processes.append(start_worker(self.address, tiny_model_dir, "--model-names", name,
                                          "--heartbeat-interval", "0.5", *args))
            return processes[-1]

    yield Stack()
    for process in reversed(processes):
        stop(process)
