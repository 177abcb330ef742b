"""The benchmark's outputs, from results made up for the purpose (the sweep itself lives in bench/)."""

from __future__ import annotations

import json

from bench.load import LevelResult
from bench.report import draw_chart, table, write_json

LEVELS = [LevelResult(1, 4, 0, 10.0, 400, 40.0, 0.1, 0.2, 41.0),
          LevelResult(16, 32, 1, 10.0, 2000, 200.0, 0.4, 0.5, 13.0)]


def test_table_compares_with_the_baseline_when_there_is_one():
    text = table(LEVELS, 50.0)
    assert "plain model.generate, one stream: 50.0 tok/s" in text
    assert "5.00" in text  # 16 streams: 200 / 40
    assert "one stream through the stack: 80% of plain generate" in text


def test_table_without_the_baseline_still_reports_every_level():
    text = table(LEVELS, 0.0)
    assert "plain" not in text
    assert len([line for line in text.splitlines() if line.strip().startswith(("1 ", "16 "))]) == 2


def test_json_and_chart_are_written(tmp_path):
    write_json(tmp_path / "bench.json", LEVELS, 0.0, {"max_tokens": 64})
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert [level["concurrency"] for level in saved["levels"]] == [1, 16]
    draw_chart(tmp_path / "bench.png", LEVELS, 0.0, "title")
    assert (tmp_path / "bench.png").read_bytes().startswith(b"\x89PNG")


TWO_WORKERS = [LevelResult(16, 32, 0, 10.0, 1600, 160.0, 0.6, 0.9, 10.0),
               LevelResult(64, 64, 0, 10.0, 3000, 300.0, 0.8, 1.2, 5.0)]


def test_table_gives_two_workers_as_a_share_of_one_at_the_same_concurrency():
    lines = table(LEVELS, 0.0, TWO_WORKERS).splitlines()
    start = lines.index("two workers on one host, together:")
    rows = [line.split() for line in lines[start + 2:]]
    assert rows[0][:5] == ["16", "32", "0", "160.0", "0.80"]  # 160 / 200 tok/s of one worker at 16 streams
    assert rows[1][:5] == ["64", "64", "0", "300.0", "-"]  # no one-worker level at 64 to compare with


def test_two_workers_go_into_the_json_and_the_chart(tmp_path):
    write_json(tmp_path / "bench.json", LEVELS, 0.0, {}, TWO_WORKERS)
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert [level["tokens_per_second"] for level in saved["two_workers"]] == [160.0, 300.0]
    draw_chart(tmp_path / "bench.png", LEVELS, 0.0, "title", TWO_WORKERS)
    assert (tmp_path / "bench.png").read_bytes().startswith(b"\x89PNG")
