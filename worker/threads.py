"""CPU threading: defaults that let several workers share one host's cores, and threads per step.

torch's CPU wheels run their thread pool on GNU OpenMP (libgomp). After each parallel region its
idle threads spin for about 300,000 iterations (milliseconds) before they sleep: free for a lone
process, but two workers on one host then burn the cores the other one needs. OpenMP reads its
settings once, when torch loads it, so `prepare_openmp_environment` must run before any import of
torch: `python -m worker` calls it first thing.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, MutableMapping
from contextlib import contextmanager

# Idle threads spin briefly, then sleep. Measured on 2 cores (README, "Speed"): 300,000 spins (the
# default) let two workers together make a quarter of one worker's tokens/s; 1,000 about three
# quarters. OMP_WAIT_POLICY=PASSIVE (no spinning) shares as well but costs a lone worker 40%.
OPENMP_DEFAULTS = {"GOMP_SPINCOUNT": "1000"}

# Any of these set by the user means they chose how OpenMP waits: leave all of it alone.
WAIT_SETTINGS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")


def prepare_openmp_environment(environ: MutableMapping[str, str] = os.environ) -> None:
    """Set the OpenMP wait defaults unless the user already chose one."""
    if not any(name in environ for name in WAIT_SETTINGS):
        environ.update(OPENMP_DEFAULTS)


def set_torch_threads(threads: int) -> None:
    """`threads` 0 keeps torch's default, one thread per physical core."""
    import torch  # only once OpenMP's environment is set

    if threads:
        torch.set_num_threads(threads)


# Measured on 2 cores through the whole stack (bfloat16, 4-bit weights for small steps): one stream
# made 29.5 tok/s on one thread against 21-22 on two; 16 streams 233-239 on two against 216-218 on
# one; 32 streams 247 on two against 212 on one.
SMALL_STEP_ROWS = 8


class StepThreads:
    """How many threads each forward pass runs on. A step of few rows does little work per kernel: on
    a small host, threads waiting for each other and for the cores that the worker's socket thread, the
    broker and the API need cost more than they add, so such steps leave one core to them."""

    def __init__(self, threads: int, small_step_rows: int = SMALL_STEP_ROWS) -> None:
        import torch  # only once OpenMP's environment is set

        self._torch = torch
        self.threads = threads or torch.get_num_threads()  # 0: torch's default, one per physical core
        self.small_step_threads = self.threads if threads else max(1, self.threads - 1)
        self.small_step_rows = small_step_rows
        self._current = 0

    def use(self, rows: int) -> None:
        """Before a pass over `rows` rows (tokens)."""
        self._set(self.small_step_threads if rows <= self.small_step_rows else self.threads)

    @contextmanager
    def all_threads(self) -> Iterator[None]:
        """Every thread, whatever the pass's rows, for one product large enough to be worth waking them
        for (the output layer: 4.7 ms on one thread at one row, 2.1 on two); then as before."""
        before = self._current
        self._set(self.threads)
        try:
            yield
        finally:
            if before:  # 0: no pass has chosen yet
                self._set(before)

    def _set(self, wanted: int) -> None:
        if wanted != self._current:
            self._torch.set_num_threads(wanted)
            self._current = wanted
