"""Real processes for end-to-end tests: brokers and workers on random loopback ports."""

from __future__ import annotations

import atexit
import os
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_spawned: list[subprocess.Popen] = []
_log_paths: dict[int, Path] = {}  # pid -> where its output goes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_address() -> str:
    return f"tcp://127.0.0.1:{free_port()}"


def spawn(module: str, *args: str, log_name: str | None = None, env: dict | None = None,
          wrapper: tuple[str, ...] = ()) -> subprocess.Popen:
    """Start `python -m module args...` in the project root; output goes to test-artifacts/logs/.
    `wrapper`: a command that runs it, e.g. `ip netns exec NAME` (it must exec, not fork)."""
    logs = ROOT / "test-artifacts" / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    log_path = logs / f"{log_name or module}-{os.getpid()}-{time.monotonic_ns()}.log"
    log = open(log_path, "wb")
    process = subprocess.Popen([*wrapper, sys.executable, "-m", module, *args], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                               env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
    _spawned.append(process)
    _log_paths[process.pid] = log_path
    return process


def output_of(process: subprocess.Popen) -> str:
    """What a spawned process has written so far."""
    return _log_paths[process.pid].read_text(errors="replace")


def start_broker(address: str, *args: str, wrapper: tuple[str, ...] = ()) -> subprocess.Popen:
    """A broker on `address`, without a metrics server unless `args` ask for one."""
    metrics = () if "--metrics-port" in args else ("--metrics-port", "0")
    return spawn("broker", "--bind", address, *metrics, *args, log_name="broker", wrapper=wrapper)


def start_worker(address: str, model: str | os.PathLike | None, *args: str,
                 wrapper: tuple[str, ...] = ()) -> subprocess.Popen:
    model_args = ["--model", str(model)] if model is not None else []
    return spawn("worker", "--broker", address, *model_args, *args, log_name="worker", wrapper=wrapper)


@atexit.register
def _stop_leftovers() -> None:
    """A safety net: no process of the suite outlives it, even when a test forgets one."""
    for process in _spawned:
        if process.poll() is None:
            process.kill()


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


def start_web(address: str, *args: str, context: ssl.SSLContext | None = None) -> tuple[subprocess.Popen, str]:
    """`python -m frontends.web` on a free port, and its URL once it answers HTTP.
    `context`: a client TLS context, for a web chat given a certificate in `args`."""
    port = free_port()
    process = spawn("frontends.web", "--broker", address, "--port", str(port), *args, log_name="web")
    url = f"{'https' if context else 'http'}://127.0.0.1:{port}/"
    deadline = time.monotonic() + 120
    while True:
        assert process.poll() is None, "the web process exited; see test-artifacts/logs/web-*.log"
        try:
            with urllib.request.urlopen(url, timeout=2, context=context):
                return process, url
        except OSError:
            if time.monotonic() > deadline:
                stop(process)
                raise TimeoutError(f"{url} never answered") from None
            time.sleep(0.1)


@contextmanager
def running_web(address: str, *args: str, context: ssl.SSLContext | None = None) -> Iterator[str]:
    """`start_web`, stopped on exit; yields its URL."""
    process, url = start_web(address, *args, context=context)
    try:
        yield url
    finally:
        stop(process)
