"""The only module that touches torch: a continuously batched forward pass over one KV cache.

The running sequences are the rows of one left-padded batch. A step may first prefill new
prompts (as their own padded batch), whose cache is then padded to the running cache's length
and stacked under it; then every row decodes one token. Rows that finish leave at once, and
columns of padding that no row needs any more are cut off the left.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from worker.sequence import Sequence

# Below this a temperature is greedy: dividing by it would overflow the logits to inf.
MIN_TEMPERATURE = 1e-5


class HeadroomLayer(DynamicLayer):
    """A cache layer whose tensors are views into buffers with room to grow, so a decode step writes
    one column in place instead of copying the whole cache (a plain `DynamicLayer` concatenates).
    Whenever the runner replaces the tensors (rows joining or leaving), the next update copies them
    into a new buffer."""

    _GROWTH = 64  # columns of room added with each new buffer

    _key_buffer: torch.Tensor | None = None
    _value_buffer: torch.Tensor | None = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized or self.keys.numel() == 0:
            return super().update(key_states, value_states, *args, **kwargs)
        length, new = self.keys.shape[-2], key_states.shape[-2]
        if not self._backed() or length + new > self._key_buffer.shape[-2]:
            self._key_buffer = _with_room(self.keys, length + new + self._GROWTH)
            self._value_buffer = _with_room(self.values, length + new + self._GROWTH)
        self._key_buffer[:, :, length:length + new] = key_states
        self._value_buffer[:, :, length:length + new] = value_states
        self.keys = self._key_buffer[:, :, :length + new]  # [B, H, L, D] views
        self.values = self._value_buffer[:, :, :length + new]
        return self.keys, self.values

    def _backed(self) -> bool:
        """Whether the tensors are still the views this layer made (not replaced by the runner)."""
        buffer = self._key_buffer
        return (buffer is not None and self.keys.data_ptr() == buffer.data_ptr()
                and self.keys.shape[0] == buffer.shape[0] and self.keys.stride() == buffer.stride()
                and self.values.data_ptr() == self._value_buffer.data_ptr())


def _with_room(tensor: torch.Tensor, columns: int) -> torch.Tensor:
    buffer = tensor.new_empty(tensor.shape[0], tensor.shape[1], columns, tensor.shape[3])
    buffer[:, :, :tensor.shape[2]] = tensor
    return buffer


def _new_cache() -> DynamicCache:
    cache = DynamicCache()
    cache.layer_class_to_replicate = HeadroomLayer  # layers are created on first use, of this class
    return cache


@dataclass(frozen=True, slots=True)
class TokenChoice:
    """The token sampled for one row, with log-probabilities when the request asked for them."""

    token_id: int
    logprob: float | None = None
    top: tuple[tuple[int, float], ...] = ()


class ModelRunner:
    """Owns the model, the batch's KV cache and the per-row sampling state."""

    def __init__(self, model: torch.nn.Module, pad_token_id: int, unpenalized_ids: frozenset[int] = frozenset()) -> None:
        self.model = model
        # Penalising end-of-turn tokens (they are in every chat prompt) would keep answers from ending.
        self.unpenalized_ids = unpenalized_ids
        self.device = next(model.parameters()).device
        self.pad_token_id = pad_token_id
        self.rows: list[Sequence] = []
        self._cache: DynamicCache | None = None
        self._mask = torch.zeros(0, 0, dtype=torch.long, device=self.device)  # [B, L]: 1 where a token is cached
        self._positions = torch.zeros(0, dtype=torch.long, device=self.device)  # [B]: next position id
        self._generators: dict[Sequence, torch.Generator] = {}  # per row, so a seed fixes its own output
        self._partial: dict[Sequence, DynamicCache] = {}  # caches of long prompts prefilled so far

    # -- batch membership

    @torch.inference_mode()
    def prefill(self, sequences: list[Sequence]) -> list[TokenChoice]:
        """Run the prompts of `sequences`, add them as rows, and sample each one's first token."""
        length = max(len(s.prompt_ids) for s in sequences)
        input_ids = torch.full((len(sequences), length), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(sequences), length), dtype=torch.long)
        for row, sequence in enumerate(sequences):
            input_ids[row, length - len(sequence.prompt_ids):] = torch.tensor(sequence.prompt_ids)
            mask[row, length - len(sequence.prompt_ids):] = 1
        input_ids, mask = input_ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = _new_cache()
        logits = self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions,
                            cache=cache, use_cache=True, logits_to_keep=1).logits[:, -1]
        _check_filled(cache, length)
        self._append_rows(sequences, cache, mask, mask.sum(-1))
        return self._sample(logits, sequences)

    @torch.inference_mode()
    def prefill_chunk(self, sequence: Sequence, start: int, end: int) -> TokenChoice | None:
        """Prefill prompt tokens [start, end) of one sequence in a cache of its own. With the last
        chunk the sequence joins the batch, and its first token is returned."""
        cache = self._partial.pop(sequence, None) or _new_cache()
        input_ids = torch.tensor([sequence.prompt_ids[start:end]], device=self.device)
        mask = torch.ones((1, end), dtype=torch.long, device=self.device)  # [1, L]: the chunks so far
        positions = torch.arange(start, end, device=self.device)[None]
        logits = self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions,
                            cache=cache, use_cache=True, logits_to_keep=1).logits[:, -1]
        _check_filled(cache, end)
        if end < len(sequence.prompt_ids):
            self._partial[sequence] = cache
            return None
        self._append_rows([sequence], cache, mask, torch.tensor([end], device=self.device))
        return self._sample(logits, [sequence])[0]

    def release(self, sequences: list[Sequence]) -> None:
        """Drop rows (finished or cancelled), and padding columns no row needs any more."""
        gone = set(sequences)
        for sequence in sequences:
            self._generators.pop(sequence, None)
            self._partial.pop(sequence, None)
        keep = [i for i, s in enumerate(self.rows) if s not in gone]
        if len(keep) == len(self.rows):
            return
        self.rows = [self.rows[i] for i in keep]
        if not self.rows:
            self._cache, self._mask, self._positions = None, self._mask[:0, :0], self._positions[:0]
            return
        index = torch.tensor(keep, device=self.device)
        self._mask, self._positions = self._mask[index], self._positions[index]
        first_used = int(self._mask.any(0).int().argmax())
        self._mask = self._mask[:, first_used:]
        assert self._cache is not None
        for layer in self._cache.layers:
            _replace_tensors(layer, layer.keys[index, :, first_used:], layer.values[index, :, first_used:])

    # -- decoding

    @torch.inference_mode()
    def decode(self) -> list[TokenChoice]:
        """Feed every row its last token and sample the next one; returns one choice per row."""
        last = torch.tensor([s.output_ids[-1] for s in self.rows], device=self.device)[:, None]  # [B, 1]
        self._mask = torch.cat([self._mask, self._mask.new_ones(len(self.rows), 1)], dim=1)
        logits = self.model(input_ids=last, attention_mask=self._mask, position_ids=self._positions[:, None],
                            cache=self._cache, use_cache=True).logits[:, -1]
        self._positions = self._positions + 1
        return self._sample(logits, self.rows)

    def _append_rows(self, sequences: list[Sequence], cache: DynamicCache, mask: torch.Tensor,
                     positions: torch.Tensor) -> None:
        generators = {}
        for sequence in sequences:
            generator = generators[sequence] = torch.Generator(device=self.device)
            if sequence.request.seed is None:
                generator.seed()
            else:
                generator.manual_seed(sequence.request.seed)
        if self._cache is None:
            self._cache, self._mask, self._positions = cache, mask, positions
        else:
            # Every new tensor first, so a failure (out of memory) leaves the batch as it was.
            width = max(self._mask.shape[1], mask.shape[1])
            stacked = [(torch.cat([_pad_left(old.keys, width), _pad_left(new.keys, width)]),
                        torch.cat([_pad_left(old.values, width), _pad_left(new.values, width)]))
                       for old, new in zip(self._cache.layers, cache.layers)]
            self._mask = torch.cat([_pad_left(self._mask, width), _pad_left(mask, width)])
            self._positions = torch.cat([self._positions, positions])
            for layer, (keys, values) in zip(self._cache.layers, stacked):
                _replace_tensors(layer, keys, values)
        self._generators.update(generators)
        self.rows.extend(sequences)

    # -- sampling

    def _sample(self, logits: torch.Tensor, sequences: list[Sequence]) -> list[TokenChoice]:
        """Each row with its own parameters; greedy rows take the argmax."""
        logits = logits.float()  # [B, V]
        raw_logprobs = None
        if any(s.request.logprobs for s in sequences):
            raw_logprobs = F.log_softmax(logits, dim=-1)
        scores = _apply_penalties(logits, sequences, self.unpenalized_ids)
        greedy = scores.argmax(dim=-1).tolist()  # one call for the whole batch
        choices = []
        for row, sequence in enumerate(sequences):
            request = sequence.request
            if request.temperature < MIN_TEMPERATURE:
                token = greedy[row]
            else:
                probs = _filtered_probs(scores[row] / request.temperature, request.top_k, request.top_p)
                token = int(torch.multinomial(probs, 1, generator=self._generators[sequence]))
            choices.append(_choice(token, raw_logprobs[row] if request.logprobs else None, request.top_logprobs))
        return choices


def _check_filled(cache: DynamicCache, length: int) -> None:
    """A model that ignored the cache would decode garbage without a word: refuse instead."""
    if cache.get_seq_length() != length:
        raise RuntimeError(f"the model left {cache.get_seq_length()} of {length} positions in the KV cache; "
                           "it must accept `cache=` (transformers 5.24 or later)")


def _replace_tensors(layer: DynamicLayer, keys: torch.Tensor, values: torch.Tensor) -> None:
    """Give a cache layer new tensors; a `HeadroomLayer` lets go of its old buffers at once."""
    layer.keys, layer.values = keys, values
    if isinstance(layer, HeadroomLayer):
        layer._key_buffer = layer._value_buffer = None


def _pad_left(tensor: torch.Tensor, width: int) -> torch.Tensor:
    """Pad the sequence dimension (dim 2 of a [B, H, L, D] cache, dim 1 of a [B, L] mask) on the left."""
    dim = 2 if tensor.dim() == 4 else 1
    missing = width - tensor.shape[dim]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


def _apply_penalties(logits: torch.Tensor, sequences: list[Sequence], unpenalized_ids: frozenset[int]) -> torch.Tensor:
    """Repetition (prompt and output, as in transformers), presence and frequency (output only);
    never on `unpenalized_ids`."""
    scores = logits
    for row, sequence in enumerate(sequences):
        request = sequence.request
        if request.repetition_penalty == 1.0 and not request.presence_penalty and not request.frequency_penalty:
            continue
        if scores is logits:
            scores = logits.clone()
        if request.repetition_penalty != 1.0:
            seen = torch.tensor(sorted({*sequence.prompt_ids, *sequence.output_ids} - unpenalized_ids),
                                device=logits.device, dtype=torch.long)
            values = scores[row, seen]
            scores[row, seen] = torch.where(values > 0, values / request.repetition_penalty,
                                            values * request.repetition_penalty)
        if sequence.output_ids and (request.presence_penalty or request.frequency_penalty):
            counts = torch.bincount(torch.tensor(sequence.output_ids, device=logits.device), minlength=scores.shape[1])
            counts[[i for i in unpenalized_ids if i < counts.shape[0]]] = 0
            scores[row] -= request.frequency_penalty * counts + request.presence_penalty * (counts > 0)
    return scores


def _filtered_probs(scores: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    if top_k:
        kth = torch.topk(scores, min(top_k, scores.shape[-1])).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        # keep the smallest prefix whose mass reaches top_p (always at least one token)
        drop = sorted_probs.cumsum(-1) - sorted_probs >= top_p
        probs = probs.scatter(0, order, sorted_probs.masked_fill(drop, 0.0))
    return probs


def _choice(token: int, logprobs: torch.Tensor | None, num_top: int) -> TokenChoice:
    if logprobs is None:
        return TokenChoice(token)
    top = ()
    if num_top:
        values, ids = torch.topk(logprobs, num_top)
        top = tuple(zip(ids.tolist(), values.tolist()))
    return TokenChoice(token, float(logprobs[token]), top)
