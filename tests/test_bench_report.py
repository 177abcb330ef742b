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
