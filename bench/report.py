"""The benchmark's outputs: a table on stdout, JSON, and a chart."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from bench.load import LevelResult


def table(levels: list[LevelResult], generate_tps: float, two_workers: list[LevelResult] = ()) -> str:
    """`generate_tps` 0: the plain generate baseline was skipped; `two_workers`: levels of two workers on one host."""
    single = next((level.tokens_per_second for level in levels if level.concurrency == 1), None)
    lines = [f"plain model.generate, one stream: {generate_tps:.1f} tok/s", ""] if generate_tps else []
    lines += [
        f"{'streams':>7} {'requests':>8} {'fail':>4} {'tok/s':>7} {'x one':>6} {'TTFT p50':>9} {'TTFT p95':>9} "
        f"{'stream tok/s':>12}",
    ]
    for level in levels:
        speedup = f"{level.tokens_per_second / single:.2f}" if single else "-"
        lines.append(f"{level.concurrency:>7} {level.requests:>8} {level.failures:>4} {level.tokens_per_second:>7.1f} "
                     f"{speedup:>6} {level.ttft_p50:>8.2f}s {level.ttft_p95:>8.2f}s {level.decode_rate_p50:>12.1f}")
    if single and generate_tps:
        lines += ["", f"one stream through the stack: {100 * single / generate_tps:.0f}% of plain generate"]
    if two_workers:
        lines += ["", "two workers on one host, together:", f"{'streams':>7} {'requests':>8} {'fail':>4} {'tok/s':>7} "
                  f"{'x one worker':>12} {'TTFT p50':>9} {'TTFT p95':>9} {'stream tok/s':>12}"]
        one_worker = {level.concurrency: level.tokens_per_second for level in levels}
        for level in two_workers:
            alone = one_worker.get(level.concurrency)  # the ratio needs one worker at the same concurrency
            ratio = f"{level.tokens_per_second / alone:.2f}" if alone else "-"
            lines.append(f"{level.concurrency:>7} {level.requests:>8} {level.failures:>4} "
                         f"{level.tokens_per_second:>7.1f} {ratio:>12} "
                         f"{level.ttft_p50:>8.2f}s {level.ttft_p95:>8.2f}s {level.decode_rate_p50:>12.1f}")
    return "\n".join(lines)


def write_json(path: Path, levels: list[LevelResult], generate_tps: float, settings: dict,
               two_workers: list[LevelResult] = (), worker_rss_mib: float | None = None) -> None:
    path.write_text(json.dumps({"settings": settings, "generate_tokens_per_second": generate_tps,
                                "worker_rss_mib": worker_rss_mib,
                                "levels": [asdict(level) for level in levels],
                                "two_workers": [asdict(level) for level in two_workers]}, indent=2))


def draw_chart(path: Path, levels: list[LevelResult], generate_tps: float, title: str,
               two_workers: list[LevelResult] = ()) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    concurrency = [level.concurrency for level in levels]
    figure, (throughput, latency) = plt.subplots(1, 2, figsize=(11, 4.2))
    throughput.plot(concurrency, [level.tokens_per_second for level in levels], "o-", label="tokenbus, one worker")
    if two_workers:
        throughput.plot([level.concurrency for level in two_workers],
                        [level.tokens_per_second for level in two_workers], "^-", label="two workers, together")
    if generate_tps:
        throughput.axhline(generate_tps, color="gray", linestyle="--", label="plain generate, one stream")
    throughput.set(xscale="log", xlabel="concurrent streams", ylabel="tokens/s", title="Throughput")
    latency.plot(concurrency, [level.ttft_p50 for level in levels], "o-", label="p50")
    latency.plot(concurrency, [level.ttft_p95 for level in levels], "s--", label="p95")
    if two_workers:
        latency.plot([level.concurrency for level in two_workers], [level.ttft_p50 for level in two_workers], "^-",
                     label="p50, two workers")
    latency.set(xscale="log", xlabel="concurrent streams", ylabel="seconds", title="Time to first token")
    for axes in (throughput, latency):
        axes.set_xticks(concurrency, [str(c) for c in concurrency])
        axes.grid(alpha=0.3)
        axes.legend()
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
