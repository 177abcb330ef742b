"""CPU threading defaults that let several workers share one host's cores.

torch's CPU wheels run their thread pool on GNU OpenMP (libgomp). After each parallel region its
idle threads spin for about 300,000 iterations (milliseconds) before they sleep: free for a lone
process, but two workers on one host then burn the cores the other one needs. OpenMP reads its
settings once, when torch loads it, so `prepare_openmp_environment` must run before any import of
torch: `python -m worker` calls it first thing.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

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
