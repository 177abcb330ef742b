"""Streaming chat handlers: bus streams become chat history updates, bus errors visible messages."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import gradio as gr

from frontends.client import (
    BadRequest,
    BrokerUnreachable,
    BusError,
    ContextLengthExceeded,
    NoWorker,
    Overloaded,
    Stream,
    UnknownModel,
    WorkerLost,
)
from frontends.web.bus import LoopLocalBus
from frontends.web.drain import Draining
from frontends.web.sessions import Sessions

History = list[dict[str, Any]]
NOT_LOGGED_IN = "Log in with the access token first (reload the page to see the login form)."
EMPTY_REPLY = "The model finished without writing anything visible."

# A title and a hint for each kind of bus error; the bus's own message says the details.
ERROR_TITLES: list[tuple[type[BusError], str, str]] = [
    (UnknownModel, "Model not available", "Press Refresh and pick a model that is live."),
    (NoWorker, "No worker for this model", "Its workers are gone; press Refresh or pick another model."),
    (Overloaded, "Model busy", "Every worker is busy: try again in a moment."),
    (WorkerLost, "Worker stopped", "The worker died while answering: try again."),
    (BrokerUnreachable, "Broker unreachable", "The chat server cannot reach the broker: try again later."),
    (ContextLengthExceeded, "Conversation too long", "Clear the chat or lower Max new tokens."),
    (BadRequest, "Request refused", ""),
    (Draining, "Server restarting", "Send the message again in a moment."),
]


def explain(error: BusError) -> tuple[str, str]:
    """(title, text) to show for a bus error."""
    message = error.message.rstrip(".")
    message = message[:1].upper() + message[1:]
    for kind, title, hint in ERROR_TITLES:
        if isinstance(error, kind):
            return title, f"{message}. {hint}".strip()
    return "Error", f"{message}."


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
    """The conversation as the bus wants it: notes shown in the page (errors) are left out."""
    messages = [{"role": "system", "content": system}] if system.strip() else []
    return messages + [{"role": m["role"], "content": message_text(m["content"])} for m in history
                       if m.get("role") in ("user", "assistant") and not m.get("metadata")]


def error_message(text: str, title: str = "Error") -> dict[str, Any]:
    """Shown in the chat, marked so it never goes back to the model as a turn."""
    return {"role": "assistant", "content": f"⚠️ {text}", "metadata": {"title": title}}


async def stream_reply(bus: LoopLocalBus, model: str, messages: list[dict[str, str]],
                       params: dict[str, Any]) -> AsyncIterator[str | BusError]:
    """The reply text as it grows; a bus error ends it. Leaving early cancels on the bus."""
    stream: Stream | None = None
    text = ""
    try:
        if not model:
            raise UnknownModel("no model is selected")
        with bus.drain.reply():
            client = await bus.get()
            stream = await client.chat(model, messages, **params)
            async for delta in stream:
                text += delta.text
                yield text
    except BusError as error:
        yield error
    finally:
        if stream is not None:
            await stream.cancel()


class ChatHandlers:
    """The single-model chat tab."""

    def __init__(self, bus: LoopLocalBus, sessions: Sessions) -> None:
        self.bus = bus
        self.sessions = sessions

    async def respond(self, message: str, history: History, model: str, system: str, temperature: float,
                      top_p: float, max_tokens: int, request: gr.Request) -> AsyncIterator[tuple[History, str]]:
        history = list(history or [])
        if not self.sessions.allows(request):
            yield history + [error_message(NOT_LOGGED_IN, "Not logged in")], message
            return
        if not message.strip():
            yield history, ""
            return
        history.append({"role": "user", "content": message})
        async for update in self._reply(history, model, system, temperature, top_p, max_tokens):
            yield update, ""

    async def regenerate(self, history: History, model: str, system: str, temperature: float, top_p: float,
                         max_tokens: int, request: gr.Request) -> AsyncIterator[History]:
        history = list(history or [])
        while history and history[-1]["role"] == "assistant":
            history.pop()
        if not self.sessions.allows(request):
            yield history + [error_message(NOT_LOGGED_IN, "Not logged in")]
            return
        if not history:
            yield [error_message("Nothing to regenerate yet: send a message first.", "Nothing to regenerate")]
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
                partial = [{"role": "assistant", "content": text}] if text.strip() else []
                title, note = explain(update)
                yield history + partial + [error_message(note, title)]
                return
            text = update
            yield history + [{"role": "assistant", "content": text}]
        if not text.strip():
            # The chat trims whitespace, so a blank answer would look like nothing happened.
            yield history + [error_message(EMPTY_REPLY, title="Empty reply")]
