"""Side by side: one prompt, two models (or two settings) answering at once, and a vote."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from frontends.client import BusError
from frontends.web.bus import LoopLocalBus
from frontends.web.chat import NOT_LOGGED_IN, stream_reply

VOTES = {"left": "A is better", "right": "B is better", "tie": "Tie", "bad": "Both are bad"}


class Arena:
    def __init__(self, bus: LoopLocalBus, votes_file: Path) -> None:
        self.bus = bus
        self.votes_file = votes_file

    async def compare(self, prompt: str, model_a: str, model_b: str, temperature_a: float, temperature_b: float,
                      max_tokens: int, logged_in: bool) -> AsyncIterator[tuple[str, str]]:
        """Both answers as they grow, side by side."""
        if not logged_in:
            yield f"⚠️ {NOT_LOGGED_IN}", f"⚠️ {NOT_LOGGED_IN}"
            return
        answers = ["", ""]
        updates: asyncio.Queue[tuple[int, str | BusError | None]] = asyncio.Queue()

        async def pump(side: int, model: str, temperature: float) -> None:
            params = {"temperature": float(temperature), "max_tokens": int(max_tokens)}
            try:
                async for update in stream_reply(self.bus, model, [{"role": "user", "content": prompt}], params):
                    updates.put_nowait((side, update))
            finally:
                updates.put_nowait((side, None))

        tasks = [asyncio.create_task(pump(0, model_a, temperature_a)),
                 asyncio.create_task(pump(1, model_b, temperature_b))]
        try:
            running = 2
            while running:
                side, update = await updates.get()
                if update is None:
                    running -= 1
                    continue
                answers[side] = f"⚠️ {update.message}" if isinstance(update, BusError) else update
                yield answers[0], answers[1]
        finally:
            for task in tasks:
                task.cancel()

    def vote(self, choice: str, prompt: str, model_a: str, model_b: str, temperature_a: float,
             temperature_b: float, answer_a: str, answer_b: str, logged_in: bool) -> str:
        """Append one vote to the JSON-lines file; returns a line for the page."""
        if not logged_in:
            return NOT_LOGGED_IN
        if not answer_a or not answer_b:
            return "Ask both models something first."
        record: dict[str, Any] = {
            "time": time.time(), "vote": choice, "prompt": prompt,
            "a": {"model": model_a, "temperature": temperature_a, "answer": answer_a},
            "b": {"model": model_b, "temperature": temperature_b, "answer": answer_b},
        }
        self.votes_file.parent.mkdir(parents=True, exist_ok=True)
        with self.votes_file.open("a", encoding="utf-8") as votes:
            votes.write(json.dumps(record, ensure_ascii=False) + "\n")
        return f"Thanks! Recorded: {VOTES[choice]}."
