"""What the worker's server needs of an engine: typed requests in, typed events out, one step at a time.

`worker/server.py` drives any `WorkerEngine` from its engine thread, and turns each event into the
bus message of the same name. The generation engine (`worker/engine.py`) and the embedding engine
(`worker/embedder.py`) are two; another (a different runtime, a remote accelerator) plugs in by
implementing this protocol, without touching the server.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from broker import protocol
from broker.protocol import EmbeddingRequest, FinishReason, GenerationRequest, TokenizeRequest


@dataclass(frozen=True, slots=True)
class TokenEvent:
    """New text (or only logprobs, or only a token count) for one request."""

    request_id: bytes
    delta: protocol.TokenDelta


@dataclass(frozen=True, slots=True)
class DoneEvent:
    """A request ended normally: its last event."""

    request_id: bytes
    done: protocol.Done


@dataclass(frozen=True, slots=True)
class ErrorEvent:
    """A request failed or could not start: its last event."""

    request_id: bytes
    error: protocol.Error


@dataclass(frozen=True, slots=True)
class TokensEvent:
    """The answer to a TOKENIZE: its only event."""

    request_id: bytes
    tokens: protocol.Tokens


@dataclass(frozen=True, slots=True)
class EmbeddingsEvent:
    """A request's vectors: its only event."""

    request_id: bytes
    embeddings: protocol.Embeddings


Event = TokenEvent | DoneEvent | ErrorEvent | TokensEvent | EmbeddingsEvent
Request = GenerationRequest | TokenizeRequest | EmbeddingRequest


class WorkerEngine(Protocol):
    """An engine the worker's server can drive. Every request it accepts ends with exactly one last
    event (DoneEvent, ErrorEvent, TokensEvent or EmbeddingsEvent), from `add`, `step` or `cancel`."""

    @property
    def has_work(self) -> bool:
        """Whether `step` has anything to do."""

    def add(self, request_id: bytes, request: Request) -> list[Event]:
        """Take a request (one the server's announced tasks cover); answers at once when it cannot run
        or needs no step (a TOKENIZE). A request id already held means the broker sent it again:
        start it over."""

    def step(self) -> list[Event]:
        """Run one batched step over the requests held; a failure ends those it touched with an
        ErrorEvent, never the engine."""

    def cancel(self, request_id: bytes, reason: FinishReason = FinishReason.CANCELLED) -> list[Event]:
        """Stop a request now; nothing for one that already ended. `reason` DEADLINE: its time ran out."""

    def drop_all(self) -> None:
        """Forget every request without a word: the broker that sent them has forgotten them too."""
