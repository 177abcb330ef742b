"""The model dropdowns: which models the broker serves now, and how long their answers may be."""

from __future__ import annotations

from typing import Any

import gradio as gr

from broker.protocol import ModelInfo
from frontends.client import BusError
from frontends.web.bus import LoopLocalBus
from frontends.web.sessions import Sessions


def describe(info: Any) -> str:
    """A dropdown label that says the model is live and how busy it is."""
    workers = f"{info.workers} worker{'s' * (info.workers != 1)}"
    return f"{info.name} — {workers}, {info.in_flight}/{info.capacity} busy"


def chat_models(infos: list[ModelInfo]) -> list[ModelInfo]:
    """The models that can chat: embedding models are listed by the broker too."""
    return [info for info in infos if info.can_chat]


class ModelList:
    """Fills the dropdowns from the broker and keeps each model's context length for the sliders."""

    def __init__(self, bus: LoopLocalBus, sessions: Sessions) -> None:
        self.bus = bus
        self.sessions = sessions
        self.context_lengths: dict[str, int] = {}

    async def refresh(self, request: gr.Request, *current: str) -> list:
        """One update per dropdown in `current` (the choice kept when still served), then a status line."""
        if not self.sessions.allows(request):
            return [*(gr.update() for _ in current), ""]
        try:
            infos = chat_models(await (await self.bus.get()).models())
        except BusError as error:
            # Keep the old choices: the broker may be back in a moment, and Refresh tries again.
            return [*(gr.update() for _ in current), f"⚠️ Broker unreachable: {error.message}"]
        # 0 means the worker did not say; such a model leaves the slider as it is.
        self.context_lengths = {info.name: info.context_length for info in infos if info.context_length > 0}
        choices = [(describe(info), info.name) for info in infos]
        names = [info.name for info in infos]
        updates = [gr.update(choices=choices, value=value if value in names else (names[0] if names else None))
                   for value in current]
        status = f"{len(infos)} model{'s' * (len(infos) != 1)} live" if infos else "⚠️ No model is served right now."
        return [*updates, status]

    def limit_max_tokens(self, max_tokens: float, *models: str) -> dict:
        """The max-tokens slider for the chosen models: at most their context, and room left for a prompt."""
        known = [self.context_lengths[name] for name in models if name in self.context_lengths]
        if not known:
            return gr.update()
        context = min(known)
        return gr.update(maximum=context, value=min(int(max_tokens), context // 2))
