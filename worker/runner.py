"""The model's side of the worker: a continuously batched forward pass over one KV cache.

The sequences the scheduler runs are the rows of one left-padded batch. A step may first prefill
new prompts (as their own padded batch), whose cache is then padded to the running cache's length
and stacked under it; then the rows decode one token each. Rows that finish leave at once, and
columns of padding that no row needs any more are cut off the left. Which sequences run is the
scheduler's decision, and the scheduler's `running` list is the batch: the runner keeps only the
tensors, row for row in that list's order, and is handed the list whenever it needs it.

With a `PrefixStore`, the runner keeps the KV of each prompt as it joins and of each prompt and
answer as its row leaves, and a prompt that starts with a stored prefix prefills only the rest.
"""

from __future__ import annotations

import logging
from contextlib import nullcontext

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from worker import llama_forward
from worker.compiled_decode import CompiledDecode, row_counts
from worker.llama_forward import LlamaForward
from worker.prefix_cache import PrefixStore
from worker.sampling import Sampler, TokenChoice
from worker.sequence import Sequence
from worker.threads import StepThreads

log = logging.getLogger(__name__)


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
        key_buffer, value_buffer, length = self.room_for(key_states.shape[-2])
        end = length + key_states.shape[-2]
        key_buffer[:, :, length:end] = key_states
        value_buffer[:, :, length:end] = value_states
        return self.grow(end)

    def room_for(self, new: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Buffers for keys and values whose first columns are the cached ones, with room for `new`
        more, and how many are cached. Whoever writes the new columns then calls `grow`."""
        length = self.keys.shape[-2]
        # A column to spare, always: a compiled step's graph holds for buffers wider than the cache it
        # makes (one exactly as wide would compile another).
        if not self._backed() or length + new >= self._key_buffer.shape[-2]:
            self._key_buffer = _with_room(self.keys, length + new + self._GROWTH)
            self._value_buffer = _with_room(self.values, length + new + self._GROWTH)
        return self._key_buffer, self._value_buffer, length

    def grow(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The buffers' first `length` columns are now the cache: [B, H, L, D] views."""
        self.keys = self._key_buffer[:, :, :length]
        self.values = self._value_buffer[:, :, :length]
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


def new_cache() -> DynamicCache:
    """An empty cache for the runner's passes, its layers `HeadroomLayer`s."""
    cache = DynamicCache()
    cache.layer_class_to_replicate = HeadroomLayer  # layers are created on first use, of this class
    return cache


class ModelRunner:
    """Owns the model and the batch's KV cache; samples through a `Sampler`."""

    def __init__(self, model: torch.nn.Module, pad_token_id: int, unpenalized_ids: frozenset[int] = frozenset(),
                 prefixes: PrefixStore | None = None, threads: StepThreads | None = None) -> None:
        self.model = model
        self.threads = threads  # CPU only: threads per pass by its size
        # Llama-family models run through the worker's own forward pass, others through transformers'.
        self._llama = LlamaForward(model) if llama_forward.supports(model) else None
        self._compiled: CompiledDecode | None = None  # see `compile_decode`
        self.prefixes = prefixes
        self.device = next(model.parameters()).device
        self.pad_token_id = pad_token_id
        self.sampler = Sampler(self.device, unpenalized_ids)
        self._cache: DynamicCache | None = None
        self._mask = torch.zeros(0, 0, dtype=torch.long, device=self.device)  # [B, L]: 1 where a token is cached
        self._positions = torch.zeros(0, dtype=torch.long, device=self.device)  # [B]: next position id
        self._chunked: tuple[Sequence, DynamicCache] | None = None  # a long prompt, prefilled chunk by chunk so far

    @property
    def num_rows(self) -> int:
        """Rows in the batch's cache."""
        return int(self._mask.shape[0])

    @torch.inference_mode()
    def compile_decode(self, max_rows: int) -> bool:
        """Compile the decode steps of up to `max_rows` rows (a Llama-family model): every graph they
        need, now. Returns whether they will run compiled; if compiling fails (no C++ compiler, say),
        they stay eager, and the log says why."""
        if self._llama is None:
            return False
        try:
            compiled = CompiledDecode(self._llama)
            for rows in row_counts(self.model, max_rows):
                self._use_threads(rows)
                compiled.warm_up(rows, new_cache())
        except Exception:  # noqa: BLE001 - any failure of the compiler leaves the eager steps, which work
            log.exception("decode steps stay eager: compiling them failed")
            return False
        self._compiled = compiled
        return True

    # -- cached prefixes

    def find_prefix(self, sequence: Sequence) -> None:
        """Look up the longest stored prefix of a waiting sequence's prompt (at least its last token is
        always prefilled, for its logits); sets `prefix` and `num_cached_tokens`."""
        prefix = self.prefixes.match(sequence.prompt_ids) if self.prefixes is not None else None
        sequence.prefix = prefix
        sequence.num_cached_tokens = min(prefix.num_tokens, len(sequence.prompt_ids) - 1) if prefix else 0

    def _keep(self, token_ids: list[int], cache: DynamicCache, row: int, end: int) -> None:
        """Store the KV of `token_ids`, which fill columns [end - len(token_ids), end) of `row` in `cache`."""
        if self.prefixes is not None and token_ids:
            start = end - len(token_ids)
            try:
                self.prefixes.insert(token_ids, [(layer.keys[row, :, start:end], layer.values[row, :, start:end])
                                                 for layer in cache.layers])
            except RuntimeError:  # out of memory: the cache only saves time, so the requests go on without it
                log.exception("could not keep %d tokens in the prefix cache", len(token_ids))

    # -- batch membership

    @torch.inference_mode()
    def prefill(self, sequences: list[Sequence]) -> list[TokenChoice]:
        """Run the prompts of `sequences`, add them as rows, and sample each one's first token.

        Each row feeds the model as many tokens as the longest uncached rest: a row with a cached
        prefix takes from it only what keeps its tokens one contiguous run (the rest of the padded
        width it recomputes, at no extra cost), so no row has holes."""
        width = max(s.num_uncached_tokens for s in sequences)
        for sequence in sequences:  # what each row really takes from its prefix
            sequence.num_cached_tokens = min(sequence.num_cached_tokens, max(0, len(sequence.prompt_ids) - width))
        cached_width = max(s.num_cached_tokens for s in sequences)
        input_ids = torch.full((len(sequences), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(sequences), cached_width + width), dtype=torch.long)  # [B, C + R]
        for row, sequence in enumerate(sequences):
            rest = sequence.prompt_ids[sequence.num_cached_tokens:]
            input_ids[row, width - len(rest):] = torch.tensor(rest)
            mask[row, mask.shape[1] - len(sequence.prompt_ids):] = 1
        input_ids, mask = input_ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, cached_width:]
        cache = self._cache_from_prefixes(sequences, cached_width)
        self._use_threads(input_ids.numel())
        logits = self._forward(input_ids, mask, positions, cache)
        _check_filled(cache, cached_width + width)
        for row, sequence in enumerate(sequences):
            self._keep(sequence.prompt_ids, cache, row, mask.shape[1])
        return self._join(sequences, logits, cache, mask, mask.sum(-1))

    def _cache_from_prefixes(self, sequences: list[Sequence], width: int) -> DynamicCache:
        """A new cache `width` columns wide, each row's cached prefix right-aligned in it."""
        cache = new_cache()
        if width == 0:
            return cache
        rows = [(row, s.prefix.layers(s.num_cached_tokens)) for row, s in enumerate(sequences)
                if s.num_cached_tokens and s.prefix is not None]
        for index, (sample_keys, _) in enumerate(rows[0][1]):
            heads, _, head_dim = sample_keys.shape
            keys = sample_keys.new_zeros(len(sequences), heads, width, head_dim)  # [B, H, C, D]
            values = keys.clone()
            for row, layers in rows:
                row_keys, row_values = layers[index]
                keys[row, :, width - row_keys.shape[1]:] = row_keys
                values[row, :, width - row_values.shape[1]:] = row_values
            cache.update(keys, values, index)
        for sequence in sequences:  # copied into the cache: the store alone decides how long blocks live
            sequence.prefix = None
        return cache

    @torch.inference_mode()
    def prefill_chunk(self, sequence: Sequence, start: int, end: int) -> TokenChoice | None:
        """Prefill prompt tokens [start, end) of one sequence in a cache of its own. With the last
        chunk the sequence joins the batch, and its first token is returned."""
        cache = self._chunked[1] if self._chunked is not None and self._chunked[0] is sequence else None
        self._chunked = None
        if cache is None:  # its first chunk: it starts after its cached prefix, if any
            sequence.num_cached_tokens = start
            cache = self._cache_from_prefixes([sequence], start)
        input_ids = torch.tensor([sequence.prompt_ids[start:end]], device=self.device)
        mask = torch.ones((1, end), dtype=torch.long, device=self.device)  # [1, L]: the chunks so far
        positions = torch.arange(start, end, device=self.device)[None]
        self._use_threads(end - start)
        logits = self._forward(input_ids, mask, positions, cache)
        _check_filled(cache, end)
        if end < len(sequence.prompt_ids):
            self._chunked = (sequence, cache)
            return None
        self._keep(sequence.prompt_ids, cache, 0, end)
        return self._join([sequence], logits, cache, mask, torch.tensor([end], device=self.device))[0]

    @torch.inference_mode()
    def release(self, batch: list[Sequence], leaving: list[Sequence], keep: bool = True) -> None:
        """Forget `leaving` (finished or cancelled): the rows of those in `batch` (the running sequences,
        in row order), and padding columns no row needs any more. With `keep` (not after a failure)
        the prefix store keeps what their rows cached."""
        gone = set(leaving)
        if self._chunked is not None and self._chunked[0] in gone:
            self._chunked = None
        kept = [row for row, sequence in enumerate(batch) if sequence not in gone]
        if len(kept) == len(batch):
            return
        if keep and self.prefixes is not None:
            self._check_batch(batch)
            self._keep_rows(batch, gone)
        if not kept:  # after a failure too, whatever state it left
            self._cache, self._mask, self._positions = None, self._mask[:0, :0], self._positions[:0]
            return
        self._check_batch(batch)
        index = torch.tensor(kept, device=self.device)
        self._mask, self._positions = self._mask[index], self._positions[index]
        first_used = int(self._mask.any(0).int().argmax())
        self._mask = self._mask[:, first_used:]
        assert self._cache is not None
        for layer in self._cache.layers:
            _replace_tensors(layer, layer.keys[index, :, first_used:], layer.values[index, :, first_used:])

    @torch.inference_mode()
    def _keep_rows(self, batch: list[Sequence], gone: set[Sequence]) -> None:
        """Store the prompt and answer of each leaving row: every token it has fed the model, i.e.
        all but the last one sampled."""
        assert self._cache is not None
        lengths = self._mask.sum(-1).tolist()
        for row, sequence in enumerate(batch):
            if sequence in gone:
                fed = (sequence.prompt_ids + sequence.output_ids)[:lengths[row]]
                if len(fed) == lengths[row]:
                    self._keep(fed, self._cache, row, self._mask.shape[1])

    # -- decoding

    @torch.inference_mode()
    def decode(self, batch: list[Sequence]) -> list[TokenChoice]:
        """Feed each row of `batch` (the running sequences, in row order) its last token and sample its
        next one; one choice per row."""
        self._check_batch(batch)
        last = torch.tensor([s.output_ids[-1] for s in batch], device=self.device)[:, None]  # [B, 1]
        self._mask = torch.cat([self._mask, self._mask.new_ones(len(batch), 1)], dim=1)
        self._use_threads(len(batch))
        logits = self._forward(last, self._mask, self._positions[:, None], self._cache, self._compiled)
        self._positions = self._positions + 1
        return self.sampler.sample(logits, batch)

    def _forward(self, input_ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor,
                 cache: DynamicCache, compiled: CompiledDecode | None = None) -> torch.Tensor:
        """Feed each row its new tokens (`input_ids` [B, T], the last T columns of `mask` [B, L]); the
        logits [B, V] of each row's last one. `compiled`: a decode step's layers, compiled."""
        if self._llama is not None:
            layers = compiled if compiled is not None else self._llama.last_hidden
            hidden = layers(input_ids, mask, positions, cache)
            with self.threads.all_threads() if self.threads is not None else nullcontext():
                return self._llama.logits(hidden)
        return self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions,
                          cache=cache, use_cache=True, logits_to_keep=1).logits[:, -1]

    def _check_batch(self, batch: list[Sequence]) -> None:
        if len(batch) != self.num_rows:
            raise RuntimeError(f"handed a batch of {len(batch)} sequences, but the cache holds {self.num_rows} rows")

    def _use_threads(self, rows: int) -> None:
        if self.threads is not None:
            self.threads.use(rows)

    def _join(self, sequences: list[Sequence], logits: torch.Tensor, cache: DynamicCache, mask: torch.Tensor,
              positions: torch.Tensor) -> list[TokenChoice]:
        """Sample the first token of each of `sequences`, then stack their cache under the batch's:
        a failure leaves the batch as it was, without them."""
        self.sampler.add(sequences)
        choices = self.sampler.sample(logits, sequences)
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
