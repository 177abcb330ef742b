"""The multi-turn benchmark's arithmetic on made-up turns: per-turn numbers and the goals' measures."""

from __future__ import annotations

import pytest

from bench.conversations import Turn, summarize, system_prompt


def test_per_turn_numbers_and_goal_measures():
    turns = [
        Turn(0, 1, 2.0, 1000, 0, "a"), Turn(1, 1, 4.0, 1000, 992, "b"),
        Turn(0, 2, 1.0, 1100, 1000, "a"), Turn(1, 2, 3.0, 1100, 960, "a"),
        Turn(0, 3, 0.0, 0, 0, "", "APIError: boom"),
    ]
    summary = summarize(turns, 3)
    first, second, third = summary["turns"]
    assert first["ttft_p50"] == 3.0 and first["ttft_p95"] == 4.0 and first["workers"] == {"a": 1, "b": 1}
    assert second["prompt_tokens"] == 2200 and second["cached_tokens"] == 1960
    assert (second["same_worker"], second["num_later"]) == (1, 2)  # conversation 1 moved from b to a
    assert third["num_later"] == 0 and summary["failures"] == 1
    assert summary["computed_share"] == pytest.approx((4200 - 2952) / 4200)
    assert summary["same_worker_share"] == 0.5 and summary["busiest_worker_share"] == 0.75


def test_the_system_prompt_has_about_the_length_asked():
    assert 2900 <= len(system_prompt(1000)) <= 3100
