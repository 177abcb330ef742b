"""The KV cache of earlier prompts and answers, kept after their rows leave, for prompts that start alike.

Tokens are cut into blocks of `BLOCK_SIZE`; a block is found by its parent block and its own tokens,
so a prompt's longest cached prefix is one dictionary walk from its first block. Each block holds
its tokens' keys and values for every layer. The store keeps at most `budget` tokens and evicts the
least recently used block first; a prefix is always used (and stamped) from its first block to its
last, and stamped last to first, so a block is never older than its descendants and eviction only
ever takes leaves.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch

BLOCK_SIZE = 16  # tokens per block: a prefix is reused in whole blocks

_ROOT = 0  # the parent id of a first block
_ids = itertools.count(1)


@dataclass(frozen=True, slots=True, eq=False)
class Block:
    id: int
    keys: torch.Tensor  # [layers, H, BLOCK_SIZE, D]
    values: torch.Tensor


@dataclass(frozen=True, slots=True)
class CachedPrefix:
    """The blocks a prompt starts with. It holds their tensors, so eviction cannot pull them away
    while a request waits to use them."""

    blocks: tuple[Block, ...]

    @property
    def num_tokens(self) -> int:
        return len(self.blocks) * BLOCK_SIZE

    def layers(self, num_tokens: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Keys and values of the first `num_tokens` tokens, per layer: [(keys [H, T, D], values), ...]."""
        keys = torch.cat([b.keys for b in self.blocks], dim=2)[:, :, :num_tokens]  # [layers, H, T, D]
        values = torch.cat([b.values for b in self.blocks], dim=2)[:, :, :num_tokens]
        return list(zip(keys.unbind(0), values.unbind(0)))


class PrefixStore:
    """At most `budget` tokens of KV cache, in blocks chained by their tokens; least recently used out first."""

    def __init__(self, budget: int) -> None:
        if budget < BLOCK_SIZE:
            raise ValueError(f"a prefix cache needs room for one block of {BLOCK_SIZE} tokens")
        self.budget = budget
        self._blocks: OrderedDict[tuple[int, tuple[int, ...]], Block] = OrderedDict()  # oldest first
        self.num_evicted = 0  # blocks evicted so far

    @property
    def num_tokens(self) -> int:
        return len(self._blocks) * BLOCK_SIZE

    def match(self, token_ids: Sequence[int]) -> CachedPrefix | None:
        """The longest cached run of whole blocks that `token_ids` starts with."""
        keys, blocks = self._walk(token_ids)
        if not blocks:
            return None
        self._stamp(keys)
        return CachedPrefix(tuple(blocks))

    def insert(self, token_ids: Sequence[int], layers: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Keep the KV of `token_ids` (per layer: keys and values [H, T, D], T = len(token_ids)) in
        whole blocks; blocks already held are only stamped."""
        keys, blocks = self._walk(token_ids)
        num_full = len(token_ids) // BLOCK_SIZE
        if len(blocks) < num_full:
            start = len(blocks) * BLOCK_SIZE
            # One copy of the new tokens' rows for all layers; each block then takes its own slice.
            new_keys = torch.stack([k[:, start:num_full * BLOCK_SIZE] for k, _ in layers])  # [layers, H, T', D]
            new_values = torch.stack([v[:, start:num_full * BLOCK_SIZE] for _, v in layers])
            parent = blocks[-1].id if blocks else _ROOT
            for index in range(len(blocks), num_full):
                tokens = tuple(token_ids[index * BLOCK_SIZE:(index + 1) * BLOCK_SIZE])
                columns = slice((index * BLOCK_SIZE) - start, (index + 1) * BLOCK_SIZE - start)
                block = Block(next(_ids), new_keys[:, :, columns].clone(), new_values[:, :, columns].clone())
                key = (parent, tokens)
                self._blocks[key] = block
                keys.append(key)
                parent = block.id
        self._stamp(keys)
        self._evict()

    def clear(self) -> None:
        self._blocks.clear()

    def _walk(self, token_ids: Sequence[int]) -> tuple[list[tuple[int, tuple[int, ...]]], list[Block]]:
        keys: list[tuple[int, tuple[int, ...]]] = []
        blocks: list[Block] = []
        parent = _ROOT
        for start in range(0, len(token_ids) - BLOCK_SIZE + 1, BLOCK_SIZE):
            key = (parent, tuple(token_ids[start:start + BLOCK_SIZE]))
            block = self._blocks.get(key)
            if block is None:
                break
            keys.append(key)
            blocks.append(block)
            parent = block.id
        return keys, blocks

    def _stamp(self, keys: list[tuple[int, tuple[int, ...]]]) -> None:
        for key in reversed(keys):  # the first block ends up the most recent
            self._blocks.move_to_end(key)

    def _evict(self) -> None:
        while self.num_tokens > self.budget:
            self._blocks.popitem(last=False)
            self.num_evicted += 1
