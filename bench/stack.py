"""A throwaway local stack for the benchmark: broker, one or more workers and the OpenAI API."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

from broker.auth import CurveKeys
from frontends.client import SyncBusClient


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, deadline: float, alive: Callable[[], bool]) -> bool:
    """Until `url` answers 200 (True) or `alive()` turns false (False); TimeoutError at `deadline`."""
    while time.monotonic() < deadline:
        if not alive():
            return False
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer in time")


class LocalStack:
    """`num_workers` identical workers on this host, as when two models share one machine.

    `keys_dir`: a key folder from `broker.keys` with a `worker` and a `client` key: the bus uses CURVE."""

    def __init__(self, worker_args: list[str], num_workers: int = 1, keys_dir: Path | None = None) -> None:
        self._bus = f"tcp://127.0.0.1:{free_port()}"
        port = free_port()
        self.api_url = f"http://127.0.0.1:{port}/v1"
        self.num_workers = num_workers
        self._curve = None if keys_dir is None else CurveKeys.load(keys_dir / "issued" / "client.key_secret",
                                                                    keys_dir / "broker.key")
        broker_keys, worker_keys, client_keys = [], [], []
        if keys_dir is not None:
            broker_keys = ["--keys-dir", str(keys_dir)]
            worker_keys, client_keys = (["--curve-key", str(keys_dir / "issued" / f"{name}.key_secret"),
                                         "--broker-key", str(keys_dir / "broker.key")] for name in ("worker", "client"))
        self._commands = [
            ["broker", "--bind", self._bus, "--metrics-port", "0", *broker_keys],
            *[["worker", "--broker", self._bus, *worker_args, *worker_keys] for _ in range(num_workers)],
            ["frontends.openai_api", "--broker", self._bus, "--port", str(port), *client_keys],
        ]
        self._processes: list[subprocess.Popen] = []

    def __enter__(self) -> LocalStack:
        for command in self._commands:
            self._processes.append(subprocess.Popen([sys.executable, "-m", *command], stdout=subprocess.DEVNULL,
                                                    stderr=subprocess.DEVNULL))
        self._wait_healthy(timeout=600)
        self._wait_for_workers(timeout=600)  # a cold start compiles the decode steps
        return self

    def worker_memory_mib(self) -> list[float]:
        """Resident memory of each worker process now."""
        import psutil

        return [psutil.Process(p.pid).memory_info().rss / 2**20 for p in self._processes[1:1 + self.num_workers]]

    def __exit__(self, *exc: object) -> None:
        for process in reversed(self._processes):
            process.terminate()
        for process in self._processes:
            process.wait(10)

    def _wait_healthy(self, timeout: float) -> None:
        if not wait_healthy(self.api_url.removesuffix("/v1") + "/health", time.monotonic() + timeout,
                            lambda: all(p.poll() is None for p in self._processes)):
            raise RuntimeError("a stack process exited during start-up")

    def _wait_for_workers(self, timeout: float) -> None:
        """Health needs one live worker; a level that starts before the others would measure one."""
        deadline = time.monotonic() + timeout
        bus = SyncBusClient(self._bus, curve=self._curve)
        try:
            while len(bus.workers()) < self.num_workers:
                if time.monotonic() > deadline or any(p.poll() is not None for p in self._processes):
                    raise TimeoutError(f"fewer than {self.num_workers} workers joined the stack")
                time.sleep(0.5)
        finally:
            bus.close()
