"""python -m frontends.cli: a terminal chat over the bus.

Type a message to chat. Commands: /models, /model NAME, /system TEXT, /reset, /quit.
Ctrl-C while a reply streams cancels it on the bus; Ctrl-C or Ctrl-D at the prompt quits.
"""

from __future__ import annotations

import signal
import sys

from pydantic import Field

from broker.protocol import TEMPERATURE_RANGE
from broker.settings import (
    DEFAULT_BROKER_ADDRESS,
    BusPeerSettings,
    cli_config,
    load_settings,
)
from frontends.client import BusError, SyncBusClient, SyncStream

HELP = "commands: /models, /model NAME, /system TEXT, /reset, /quit"


class CliSettings(BusPeerSettings):
    model_config = cli_config("cli", "python -m frontends.cli")

    broker: str = Field(DEFAULT_BROKER_ADDRESS, description="ZeroMQ address of the broker")
    model: str | None = Field(None, description="model to chat with (default: the first one served)")
    system: str | None = Field(None, description="system prompt")
    temperature: float = Field(0.7, ge=TEMPERATURE_RANGE[0], le=TEMPERATURE_RANGE[1],
                               description="sampling temperature (0 = greedy)")
    max_tokens: int = Field(512, ge=1, description="longest reply, in tokens")


class Chat:
    """The conversation and its settings; one method per command."""

    def __init__(self, client: SyncBusClient, settings: CliSettings) -> None:
        self.client = client
        self.settings = settings
        self.model = settings.model
        self.system = settings.system
        self.history: list[dict[str, str]] = []

    def handle(self, line: str) -> bool:
        """Act on one line of input; False means quit."""
        command, _, argument = line.partition(" ")
        if command in ("/quit", "/exit"):
            return False
        if command == "/reset":
            self.history.clear()
            print("(history cleared)")
        elif command == "/system":
            self.system = argument.strip() or None
            self.history.clear()
            print(f"(system prompt {'set' if self.system else 'cleared'}; history cleared)")
        elif command == "/models":
            for info in self.client.models():
                print(f"  {info.name}  workers={info.workers} capacity={info.capacity} busy={info.in_flight}")
        elif command == "/model":
            self.model = argument.strip() or self.model
            print(f"(model: {self.model})")
        elif command.startswith("/"):
            print(HELP)
        elif line.strip():
            self.reply(line)
        return True

    def reply(self, text: str) -> None:
        self.history.append({"role": "user", "content": text})
        messages = ([{"role": "system", "content": self.system}] if self.system else []) + self.history
        parts: list[str] = []
        stream: SyncStream | None = None
        try:
            stream = self.client.chat(self.ensure_model(), messages, temperature=self.settings.temperature,
                                      max_tokens=self.settings.max_tokens)
            print(f"{self.model}> ", end="", flush=True)
            for delta in stream:
                parts.append(delta.text)
                print(delta.text, end="", flush=True)
            print()
        except KeyboardInterrupt:  # while streaming, or still waiting for the model list or the send
            if stream is not None:
                stream.cancel()
            print(" [cancelled]")
            self.history.pop()
            return
        except BusError as exc:
            print(f"\n[error: {exc.message}]")
            self.history.pop()
            return
        self.history.append({"role": "assistant", "content": "".join(parts)})

    def ensure_model(self) -> str:
        if self.model is None:
            # The first model that chats: embedding models are listed too.
            served = [info for info in self.client.models() if info.can_chat]
            if not served:
                raise BusError("no model is served right now")
            self.model = served[0].name
        return self.model


def main() -> None:
    # Ctrl-C cancels a reply even when the chat was started with SIGINT ignored (from a background job).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    settings = load_settings(CliSettings)
    with SyncBusClient(settings.broker, curve=settings.curve()) as client:
        chat = Chat(client, settings)
        try:
            print(f"tokenbus chat with {chat.ensure_model()}; {HELP}")
        except BusError as exc:
            sys.exit(f"cannot reach a model at {settings.broker}: {exc.message}")
        while True:
            try:
                line = input("you> ")
            except (EOFError, KeyboardInterrupt):
                print()
                break
            try:
                if not chat.handle(line):
                    break
            except BusError as exc:  # e.g. /models while the broker is away: say so and carry on
                print(f"[error: {exc.message}]")
            except KeyboardInterrupt:  # Ctrl-C outside a reply (a reply handles its own)
                print()


if __name__ == "__main__":
    main()
