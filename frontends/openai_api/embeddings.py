"""`/v1/embeddings` bodies to EMBED requests: the shape of `input` and the OpenAI-only fields.

OpenAI takes up to 2,048 inputs in one call; an EMBED's answer must fit in one bus message, so a
call becomes EMBEDs of `INPUTS_PER_EMBED` inputs each, sent at once and answered together (the
worker runs EMBEDs that arrive together in shared passes: splitting costs no speed).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from broker.protocol import MAX_EMBED_INPUTS, EmbeddingRequest, ProtocolError, is_token_id
from frontends.openai_api.errors import bad_request
from frontends.openai_api.body import object_body
from frontends.openai_api.requests import IGNORED_FIELDS, _required

EMBEDDING_FIELDS = {"model", "input", "encoding_format", "dimensions", "user"}
MAX_INPUTS = 2048  # OpenAI's own limit per call
# 32 vectors of up to 8,192 float32 dimensions stay under the bus's 1 MiB body limit.
INPUTS_PER_EMBED = min(32, MAX_EMBED_INPUTS)
ENCODING_FORMATS = ("float", "base64")


@dataclass(frozen=True, slots=True)
class EmbeddingCall:
    """A parsed `/v1/embeddings` call: the EMBEDs to send, in input order, and how to answer."""

    model: str
    requests: list[EmbeddingRequest]
    encoding_format: str

    @property
    def offsets(self) -> list[int]:
        """Where each request's inputs start among the call's."""
        return [index * INPUTS_PER_EMBED for index in range(len(self.requests))]


def parse_embeddings(body: Any) -> EmbeddingCall:
    body = object_body(body, EMBEDDING_FIELDS, IGNORED_FIELDS)
    model = _required(body, "model", str)
    inputs = _inputs(_required(body, "input", (str, list)))
    encoding_format = body.get("encoding_format", "float")
    if encoding_format not in ENCODING_FORMATS:
        raise bad_request("'encoding_format' must be 'float' or 'base64'", "encoding_format")
    dimensions = body.get("dimensions")
    if dimensions is not None and (type(dimensions) is not int or dimensions < 1):
        raise bad_request("'dimensions' must be a positive integer", "dimensions")
    if not isinstance(body.get("user", ""), str):
        raise bad_request("'user' must be a string", "user", "invalid_type")
    try:
        requests = [EmbeddingRequest(model, tuple(inputs[start:start + INPUTS_PER_EMBED]), dimensions)
                    for start in range(0, len(inputs), INPUTS_PER_EMBED)]
    except ProtocolError as exc:
        raise bad_request(str(exc), exc.field) from None
    return EmbeddingCall(model, requests, encoding_format)


def _inputs(value: str | list) -> list[str] | list[tuple[int, ...]]:
    """A string, a list of strings, a list of token ids or a list of such lists; never empty."""
    shapes = "a non-empty string, a list of them, a list of token ids, or a list of such lists"
    if isinstance(value, str):
        value = [value]
    if not value or len(value) > MAX_INPUTS:
        raise bad_request(f"'input' must be {shapes}, with 1 to {MAX_INPUTS} entries", "input")
    if all(isinstance(item, str) for item in value):
        texts = value
    elif all(is_token_id(item) for item in value):
        return [tuple(value)]
    elif all(isinstance(item, list) and item and all(is_token_id(t) for t in item) for item in value):
        return [tuple(item) for item in value]
    else:
        raise bad_request(f"'input' must be {shapes}", "input")
    empty = next((index for index, text in enumerate(texts) if not text), None)
    if empty is not None:
        raise bad_request(f"'input[{empty}]' is empty: an empty string has no embedding", "input")
    return texts

