"""EMBED and its answer, EMBEDDINGS."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from broker.protocol.frames import ProtocolError
from broker.protocol.fields import MAX_COUNT, _check_range, _get, _reject_unknown, is_token_id


MAX_EMBED_INPUTS = 128  # inputs of one EMBED; its answer (inputs x dimensions x 4 bytes) must fit in a body


@dataclass(frozen=True, slots=True)
class EmbeddingRequest:
    """Body of EMBED: texts, or token-id lists, to turn into vectors in one answer."""

    model: str
    inputs: tuple[str, ...] | tuple[tuple[int, ...], ...]
    dimensions: int | None = None  # shorter vectors, for a model that can give them

    def __post_init__(self) -> None:
        if not self.model:
            raise ProtocolError.about("model", "must be a non-empty string")
        if not 1 <= len(self.inputs) <= MAX_EMBED_INPUTS:
            raise ProtocolError.about("input", f"must hold 1 to {MAX_EMBED_INPUTS} entries")
        for index, item in enumerate(self.inputs):
            if not item:  # an empty text or token list means nothing; OpenAI refuses it too
                raise ProtocolError(f"'input[{index}]' must not be empty", "input")
        if self.dimensions is not None:
            _check_range("dimensions", self.dimensions, 1, MAX_COUNT)

    @property
    def token_input(self) -> bool:
        return not isinstance(self.inputs[0], str)

    @classmethod
    def from_fields(cls, fields: dict[str, Any]) -> EmbeddingRequest:
        _reject_unknown(fields, ("model", "input", "dimensions"))
        raw = _get(fields, "input", list, required=True)
        if all(isinstance(item, str) for item in raw):
            inputs: tuple = tuple(raw)
        elif all(isinstance(item, list) and all(is_token_id(t) for t in item) for item in raw):
            inputs = tuple(tuple(item) for item in raw)
        else:
            raise ProtocolError.about("input", "must be an array of strings or an array of arrays of token ids "
                                      "(integers 0 to 2^31-1)")
        return cls(_get(fields, "model", str, required=True), inputs, _get(fields, "dimensions", int))

    def to_fields(self) -> dict[str, Any]:
        fields: dict[str, Any] = {"model": self.model, "input": [i if isinstance(i, str) else list(i)
                                                                  for i in self.inputs]}
        if self.dimensions is not None:
            fields["dimensions"] = self.dimensions
        return fields


@dataclass(frozen=True, slots=True)
class Embeddings:
    """Body of EMBEDDINGS: one vector per input, in order, each `dimensions` little-endian float32
    values packed as msgpack bin, with the tokens each input took."""

    vectors: tuple[bytes, ...]
    dimensions: int
    token_counts: tuple[int, ...]

    @property
    def prompt_tokens(self) -> int:
        return sum(self.token_counts)

    def to_fields(self) -> dict[str, Any]:
        return {"embeddings": list(self.vectors), "dimensions": self.dimensions,
                "token_counts": list(self.token_counts)}

    @classmethod
    def from_fields(cls, fields: dict[str, Any]) -> Embeddings:
        vectors = _get(fields, "embeddings", list, required=True)
        dimensions = _get(fields, "dimensions", int, required=True)
        counts = _get(fields, "token_counts", list, required=True)
        if not all(isinstance(v, bytes) and len(v) == 4 * dimensions for v in vectors):
            raise ProtocolError(f"each embedding must be {dimensions} float32 values as bin", "embeddings")
        if len(counts) != len(vectors) or not all(isinstance(c, int) and not isinstance(c, bool) for c in counts):
            raise ProtocolError.about("token_counts", "must hold one integer per embedding")
        return cls(tuple(vectors), dimensions, tuple(counts))
