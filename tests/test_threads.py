"""The worker's OpenMP defaults: set before torch loads, never over the user's own choice."""

from __future__ import annotations

import os
import subprocess
import sys

from worker.threads import WAIT_SETTINGS, prepare_openmp_environment


def test_defaults_fill_an_environment_without_wait_settings():
    environ = {"PATH": "/bin"}
    prepare_openmp_environment(environ)
    assert environ == {"PATH": "/bin", "GOMP_SPINCOUNT": "1000"}


def test_any_wait_setting_of_the_user_keeps_all_defaults_out():
    for name, value in [("OMP_WAIT_POLICY", "ACTIVE"), ("GOMP_SPINCOUNT", "300000"), ("KMP_BLOCKTIME", "200")]:
        environ = {name: value}
        prepare_openmp_environment(environ)
        assert environ == {name: value}


def _run(code: str) -> str:
    env = {name: value for name, value in os.environ.items() if name not in WAIT_SETTINGS}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
                          check=True).stdout.strip()


def test_the_defaults_can_be_set_before_torch_is_loaded():
    assert _run("import sys, worker.threads; print('torch' in sys.modules)") == "False"


def test_the_worker_entry_point_sets_them():
    assert _run("import os, worker.__main__; print(os.environ.get('GOMP_SPINCOUNT'))") == "1000"


def test_small_steps_leave_a_core_to_the_bus_unless_the_threads_are_set():
    code = """
import torch
from worker.threads import StepThreads
torch.set_num_threads(2)
seen = []
for threads in (0, 2):
    steps = StepThreads(threads, small_step_rows=8)
    for rows in (1, 8, 9, 1):
        steps.use(rows)
        seen.append(torch.get_num_threads())
print(seen)
"""
    assert _run(code) == "[1, 1, 2, 1, 2, 2, 2, 2]"


def test_the_output_layer_takes_every_thread_then_the_step_goes_on_as_before():
    code = """
import torch
from worker.threads import StepThreads
torch.set_num_threads(2)
steps = StepThreads(0, small_step_rows=8)
steps.use(1)
seen = [torch.get_num_threads()]
with steps.all_threads():
    seen.append(torch.get_num_threads())
seen.append(torch.get_num_threads())
steps.use(9)
with steps.all_threads():
    seen.append(torch.get_num_threads())
seen.append(torch.get_num_threads())
print(seen)
"""
    assert _run(code) == "[1, 2, 1, 2, 2]"
