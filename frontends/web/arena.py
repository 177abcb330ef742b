"""Side by side: one prompt, two models (or two settings) answering at once, and a vote."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from pathlib import Path
from typing import Any

import gradio as gr

from frontends.client import BusError
from frontends.streams import merged
from frontends.web.bus import LoopLocalBus
from frontends.web.chat import EMPTY_REPLY, NOT_LOGGED_IN, explain, stream_reply
from frontends.web.sessions import Sessions

VOTES = {"left": "A is better", "right": "B is better", "tie": "Tie", "bad": "Both are bad"}
NOTHING_TO_VOTE_ON = "Nothing to vote on: compare two answers first (one vote per comparison)."
NO_PROMPT = "Type a prompt first."

# What the page shows for one comparison, and the record a vote needs (None: no vote possible).
Comparison = tuple[str, str, dict[str, Any] | None]


class Arena:
    """Runs comparisons and appends votes to a JSON-lines file."""

    def __init__(self, bus: LoopLocalBus, sessions: Sessions, votes_file: Path) -> None:
        self.bus = bus
        self.sessions = sessions
        self.votes_file = votes_file

    async def compare(self, prompt: str, model_a: str, model_b: str, temperature_a: float, temperature_b: float,
                      max_tokens: int, request: gr.Request) -> AsyncIterator[Comparison]:
        """Both answers as they grow; once both are complete, the record a vote will store."""
        if not self.sessions.allows(request):
            yield f"⚠️ {NOT_LOGGED_IN}", f"⚠️ {NOT_LOGGED_IN}", None
            return
        if not prompt.strip():
            yield f"⚠️ {NO_PROMPT}", f"⚠️ {NO_PROMPT}", None
            return
        sides = [(model_a, float(temperature_a)), (model_b, float(temperature_b))]
        answers = ["", ""]
        failed = [False, False]

        async def updates(side: int) -> AsyncIterator[str | BusError | None]:
            """One side's reply as it grows, then None at its end."""
            model, temperature = sides[side]
            params = {"temperature": temperature, "max_tokens": int(max_tokens)}
            async for update in stream_reply(self.bus, model, [{"role": "user", "content": prompt}], params):
                yield update
            yield None

        yield "", "", None  # a new comparison: the old record can no longer be voted on
        # Stop on the page (or a closed tab) closes this generator: both bus requests are cancelled.
        async with aclosing(merged([updates(0), updates(1)])) as both:
            async for side, update in both:
                if update is None:
                    if not failed[side] and not answers[side].strip():
                        answers[side] = f"⚠️ {EMPTY_REPLY}"
                        failed[side] = True
                elif isinstance(update, BusError):
                    answers[side], failed[side] = "⚠️ {}: {}".format(*explain(update)), True
                else:
                    answers[side] = update
                yield answers[0], answers[1], None
        record = None if any(failed) else {
            "prompt": prompt,
            "a": {"model": model_a, "temperature": sides[0][1], "answer": answers[0]},
            "b": {"model": model_b, "temperature": sides[1][1], "answer": answers[1]},
        }
        yield answers[0], answers[1], record

    def voter(self, choice: str) -> Callable[[dict[str, Any] | None, gr.Request], tuple[str, None]]:
        """The handler of one vote button."""
        def vote(record: dict[str, Any] | None, request: gr.Request) -> tuple[str, None]:
            return self.vote(choice, record, request)
        return vote

    def vote(self, choice: str, record: dict[str, Any] | None, request: gr.Request) -> tuple[str, None]:
        """Append one vote to the JSON-lines file; returns a line for the page and clears the record."""
        if not self.sessions.allows(request):
            return NOT_LOGGED_IN, None
        if record is None:
            return NOTHING_TO_VOTE_ON, None
        line = json.dumps({"time": time.time(), "vote": choice, **record}, ensure_ascii=False)
        self.votes_file.parent.mkdir(parents=True, exist_ok=True)
        with self.votes_file.open("a", encoding="utf-8") as votes:
            votes.write(line + "\n")
        return f"Thanks! Recorded: {VOTES[choice]}.", None
