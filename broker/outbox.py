"""What the broker's core sends: messages collected while it handles an input, for the server to send."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

from broker import protocol
from broker.protocol import Command, ErrorCode


@dataclass(frozen=True, slots=True)
class Outgoing:
    """One message for the server to send to a peer."""

    identity: bytes
    command: Command
    request_id: bytes = b""
    body: dict[str, Any] | bytes | None = None


class Outbox:
    """The messages of one input, in order; every message is counted in `sent`, by command."""

    def __init__(self, sent: Counter[str]) -> None:
        self.sent = sent
        self._messages: list[Outgoing] = []

    def send(self, identity: bytes, command: Command, request_id: bytes = b"",
             body: dict[str, Any] | bytes | None = None) -> None:
        self.sent[command.value] += 1
        self._messages.append(Outgoing(identity, command, request_id, body))

    def error(self, identity: bytes, request_id: bytes, code: ErrorCode, message: str,
              field: str | None = None) -> None:
        self.send(identity, Command.ERROR, request_id, protocol.Error(code, message, field).to_fields())

    def take(self) -> list[Outgoing]:
        """The messages so far, leaving the outbox empty."""
        messages, self._messages = self._messages, []
        return messages
