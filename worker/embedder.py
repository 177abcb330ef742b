"""The embedding engine: EMBED requests in, one EMBEDDINGS event per request out.

Requests that arrive together share forward passes: each step takes the waiting inputs, oldest
request first, while the pass stays within a budget of padded tokens (rows x the longest row), so
many users' texts run as one batch and a huge request is spread over several passes. Inside a pass,
inputs are sorted by length and run in groups of similar length (as `SentenceTransformer.encode`
sorts its inputs): a batch is padded to its longest row, and padding is work thrown away. Inputs
over the model's maximum length are refused before any work, never cut short.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from broker import protocol
from broker.protocol import EmbeddingRequest, ErrorCode, FinishReason
from worker.engine_api import DoneEvent, EmbeddingsEvent, ErrorEvent, Event, Request

if TYPE_CHECKING:  # sentence-transformers loads slowly: only an embedding worker imports it
    from worker.embedding_runner import EmbeddingRunner

log = logging.getLogger(__name__)

_ANSWER_OVERHEAD = 1024  # bytes of an EMBEDDINGS body besides its vectors (msgpack headers, counts)
# A group's padded tokens may exceed its real tokens by this share. Unsorted, a pass of short texts
# (6 to 40 words) ran at 62% of `encode`; one big padded batch wastes about a third of its work.
MAX_PADDING_SHARE = 0.2


@dataclass(slots=True, eq=False)
class PendingEmbedding:
    """One admitted request: its inputs as token ids, and the vectors made so far."""

    request_id: bytes
    inputs: list[list[int]]
    dimensions: int
    vectors: list[np.ndarray] = field(default_factory=list)  # for inputs[:len(vectors)]

    @property
    def num_done(self) -> int:
        return len(self.vectors)

    @property
    def finished(self) -> bool:
        return self.num_done == len(self.inputs)


def plan_pass(pending: list[PendingEmbedding], max_tokens: int) -> list[tuple[PendingEmbedding, list[int]]]:
    """The next pass: for each request, in order, the token ids of the inputs it runs. Inputs are
    taken in arrival order while rows x the longest row stays within `max_tokens`; the first input
    always runs, whatever its length."""
    plan: list[tuple[PendingEmbedding, list[int]]] = []
    rows, longest = 0, 0
    for request in pending:
        taken: list[int] = []
        for ids in request.inputs[request.num_done:]:
            if rows and (rows + 1) * max(longest, len(ids)) > max_tokens:
                if taken:
                    plan.append((request, taken))
                return plan
            taken.append(ids)
            rows, longest = rows + 1, max(longest, len(ids))
        if taken:
            plan.append((request, taken))
    return plan


def length_groups(lengths: list[int], max_padding: float = MAX_PADDING_SHARE) -> list[slice]:
    """Cut lengths sorted in ascending order into runs whose padded size (rows x the last, longest
    length) stays within `max_padding` of their real size."""
    groups, start, total = [], 0, 0
    for index, length in enumerate(lengths):
        if index > start and (index - start + 1) * length > (1 + max_padding) * (total + length):
            groups.append(slice(start, index))
            start, total = index, 0
        total += length
    if lengths:
        groups.append(slice(start, len(lengths)))
    return groups


class Embedder:
    """Admits EMBED requests, runs passes on the runner, and answers each request once, whole."""

    def __init__(self, runner: EmbeddingRunner, model_name: str, max_pass_tokens: int,
                 shorten: bool = False) -> None:
        self.runner = runner
        self.model_name = model_name
        self.max_pass_tokens = max_pass_tokens
        self.shorten = shorten  # the model was trained to be cut short (Matryoshka): `dimensions` may be smaller
        self.pending: dict[bytes, PendingEmbedding] = {}

    @property
    def has_work(self) -> bool:
        return bool(self.pending)

    def add(self, request_id: bytes, request: Request) -> list[Event]:
        """Queue a request; one this model cannot answer is refused at once."""
        if not isinstance(request, EmbeddingRequest):
            return [ErrorEvent(request_id, protocol.Error(ErrorCode.BAD_REQUEST,
                                                          "this worker embeds: it does not generate"))]
        try:
            inputs = self._token_ids(request)
            dimensions = self._dimensions(request)
        except _Refusal as refusal:
            return [ErrorEvent(request_id, protocol.Error(refusal.code, str(refusal)))]
        self.pending.pop(request_id, None)  # the broker sent it again: start over
        self.pending[request_id] = PendingEmbedding(request_id, inputs, dimensions)
        return []

    def cancel(self, request_id: bytes, reason: FinishReason = FinishReason.CANCELLED) -> list[Event]:
        """Stop a request; its vectors come whole or not at all, so a deadline cancels it like any other."""
        request = self.pending.pop(request_id, None)
        if request is None:
            return []  # answered already: its EMBEDDINGS crossed the CANCEL
        tokens = sum(len(ids) for ids in request.inputs)
        return [DoneEvent(request_id, protocol.Done(FinishReason.CANCELLED, tokens, 0))]

    def drop_all(self) -> None:
        self.pending.clear()

    def step(self) -> list[Event]:
        """One forward pass; a failure ends the requests in it with an explicit error."""
        plan = plan_pass(list(self.pending.values()), self.max_pass_tokens)
        try:
            vectors = self._run([ids for _, taken in plan for ids in taken])
        except Exception as exc:
            log.exception("embedding pass failed; failing the %d requests in it", len(plan))
            for request, _ in plan:
                del self.pending[request.request_id]
            return [ErrorEvent(r.request_id, protocol.Error(ErrorCode.INTERNAL, f"the worker failed: {exc}"))
                    for r, _ in plan]
        events: list[Event] = []
        row = 0
        for request, taken in plan:
            request.vectors.extend(vectors[row:row + len(taken)])
            row += len(taken)
            if request.finished:
                del self.pending[request.request_id]
                events.append(EmbeddingsEvent(request.request_id, self._answer(request)))
        return events

    def _run(self, inputs: list[list[int]]) -> np.ndarray:
        """Vectors for `inputs`, in their order, run in groups of similar length."""
        order = sorted(range(len(inputs)), key=lambda i: len(inputs[i]))
        vectors = np.empty((len(inputs), self.runner.dimensions), dtype=np.float32)
        for group in length_groups([len(inputs[i]) for i in order]):
            rows = order[group]
            vectors[rows] = self.runner.embed([inputs[i] for i in rows])
        return vectors

    # -- admission

    def _token_ids(self, request: EmbeddingRequest) -> list[list[int]]:
        runner = self.runner
        if request.token_input:
            for index, ids in enumerate(request.inputs):
                bad = next((t for t in ids if t >= runner.vocab_size), None)
                if bad is not None:
                    raise _Refusal(ErrorCode.BAD_REQUEST, f"'input[{index}]' holds token id {bad}, outside the "
                                   f"vocabulary of '{self.model_name}' (0 to {runner.vocab_size - 1})")
            inputs = [runner.with_special_tokens(list(ids)) for ids in request.inputs]
        else:
            inputs = runner.text_ids(list(request.inputs))
        for index, ids in enumerate(inputs):
            if len(ids) > runner.max_length:
                raise _Refusal(ErrorCode.CONTEXT_LENGTH_EXCEEDED,
                               f"'input[{index}]' has {len(ids)} tokens, more than the maximum of "
                               f"{runner.max_length} tokens of '{self.model_name}'; shorten it")
        return inputs

    def _dimensions(self, request: EmbeddingRequest) -> int:
        native = self.runner.dimensions
        wanted = request.dimensions or native
        if wanted > native or (wanted < native and not self.shorten):
            can = f"1 to {native}" if self.shorten else f"{native} (this model cannot shorten its embeddings)"
            raise _Refusal(ErrorCode.BAD_REQUEST, f"'dimensions' must be {can} for '{self.model_name}', got {wanted}")
        if len(request.inputs) * wanted * 4 + _ANSWER_OVERHEAD > protocol.MAX_MESSAGE_SIZE:
            most = (protocol.MAX_MESSAGE_SIZE - _ANSWER_OVERHEAD) // (wanted * 4)
            raise _Refusal(ErrorCode.BAD_REQUEST, f"at most {most} inputs per request for '{self.model_name}' "
                           f"({wanted} dimensions): the answer must fit in one message")
        return wanted

    def _answer(self, request: PendingEmbedding) -> protocol.Embeddings:
        vectors = np.stack(request.vectors)[:, :request.dimensions]
        if request.dimensions < self.runner.dimensions and self.runner.normalized:
            vectors = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)  # a cut vector is no longer unit length
        little_endian = vectors.astype("<f4", copy=False)
        return protocol.Embeddings(tuple(v.tobytes() for v in little_endian), request.dimensions,
                                   tuple(len(ids) for ids in request.inputs))


class _Refusal(Exception):
    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
