"""Streaming chat handlers: bus streams become chat history updates, bus errors visible messages."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from frontends.client import BusError, Stream
from frontends.web.bus import LoopLocalBus

History = list[dict[str, Any]]
NOT_LOGGED_IN = "Log in with the access token first."


def message_text(content: Any) -> str:
    """Chat history content as plain text (Gradio may hand back a list of parts)."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return str(content.get("text", content.get("value", "")))
    if isinstance(content, list):
        return "".join(message_text(part) for part in content)
    return ""


def bus_messages(history: History, system: str) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": system}] if system.strip() else []
    return messages + [{"role": m["role"], "content": message_text(m["content"])} for m in history
                       if m.get("role") in ("user", "assistant") and not m.get("metadata")]


def error_message(text: str) -> dict[str, Any]:
    """Shown in the chat, marked so it never goes back to the model as a turn."""
    return {"role": "assistant", "content": f"⚠️ {text}", "metadata": {"title": "Error"}}


async def stream_reply(bus: LoopLocalBus, model: str, messages: list[dict[str, str]],
                       params: dict[str, Any]) -> AsyncIterator[str | BusError]:
    """The reply text as it grows; a bus error ends it. Leaving early cancels on the bus."""
    stream: Stream | None = None
    text = ""
    try:
        if not model:
            raise BusError("No model is selected (press Refresh to list the models served).")
        client = await bus.get()
        stream = await client.chat(model, messages, **params)
        async for delta in stream:
            text += delta.text
            yield text
        if not text:
            yield ""
    except BusError as error:
        yield error
    finally:
        if stream is not None:
            await stream.cancel()


class ChatHandlers:
    """The single-model chat tab."""

    def __init__(self, bus: LoopLocalBus) -> None:
        self.bus = bus

    async def respond(self, message: str, history: History, model: str, system: str, temperature: float,
                      top_p: float, max_tokens: int, logged_in: bool) -> AsyncIterator[tuple[History, str]]:
        history = list(history or [])
        if not logged_in:
            yield history + [error_message(NOT_LOGGED_IN)], message
            return
        if not message.strip():
            yield history, ""
            return
        history.append({"role": "user", "content": message})
        async for update in self._reply(history, model, system, temperature, top_p, max_tokens):
            yield update, ""

    async def regenerate(self, history: History, model: str, system: str, temperature: float, top_p: float,
                         max_tokens: int, logged_in: bool) -> AsyncIterator[History]:
        history = list(history or [])
        while history and history[-1]["role"] == "assistant":
            history.pop()
        if not logged_in or not history:
            yield history + [error_message(NOT_LOGGED_IN if not logged_in else "Nothing to regenerate yet.")]
            return
        async for update in self._reply(history, model, system, temperature, top_p, max_tokens):
            yield update

    async def _reply(self, history: History, model: str, system: str, temperature: float, top_p: float,
                     max_tokens: int) -> AsyncIterator[History]:
        params = {"temperature": float(temperature), "top_p": float(top_p), "max_tokens": int(max_tokens)}
        text = ""
        yield history + [{"role": "assistant", "content": ""}]
        async for update in stream_reply(self.bus, model, bus_messages(history, system), params):
            if isinstance(update, BusError):
                partial = [{"role": "assistant", "content": text}] if text else []
                yield history + partial + [error_message(update.message)]
                return
            text = update
            yield history + [{"role": "assistant", "content": text or "(empty reply)"}]
