"""Constrained decoding: a request's `constraint` as a grammar, and each constrained row's token mask.

llguidance computes the mask of tokens a grammar allows next, lazily and per row (about 0.1 ms for a
row of this vocabulary on a CPU), so constrained and free rows share one batch: the sampler applies
the masks of the constrained rows to their logits and leaves the others untouched. A schema is
compiled once, when its first request is admitted between two steps (about a millisecond, ten for a
large schema), and the matcher cached by the schema's canonical text; each row starts from a copy
(tens of microseconds), and copies share what the matcher has learnt of its lexer: 8 rows' masks
took 0.2-0.6 ms a step from copies against 0.5-1.1 ms from matchers compiled afresh.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING

import llguidance
import llguidance.hf
import llguidance.numpy  # not llguidance.torch: importing it loads torch.compile's machinery, 2 s a worker start
import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from broker.protocol import Constraint, ProtocolError, Tools
from worker.json_schema import JSON_STYLE, closed_objects

if TYPE_CHECKING:
    from worker.tool_formats import ToolFormat

# This many distinct schemas stay compiled.
MAX_CACHED_GRAMMARS = 256


class GrammarCompiler:
    """Turns constraints into grammars for one tokenizer, and starts a matcher per constrained row."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, end_of_turn_ids: frozenset[int]) -> None:
        # The model's end of turn is where a grammar may end: the matcher allows it once the output is complete.
        self.tokenizer = llguidance.hf.from_tokenizer(tokenizer, eos_token=sorted(end_of_turn_ids))
        self.vocab_size = self.tokenizer.vocab_size
        self._compiled: OrderedDict[str, llguidance.LLMatcher] = OrderedDict()  # by constraint key, never advanced
        self._warm_up()

    def _warm_up(self) -> None:
        """The first mask for a tokenizer costs about a second (llguidance builds its token tables):
        spend it now rather than in a request's step."""
        matcher = self.start(Constraint("json_object"))
        mask_logits(torch.zeros(1, self.vocab_size), [0], [matcher])

    def compiled(self, constraint: Constraint) -> llguidance.LLMatcher:
        """`constraint` compiled, from the cache when it was seen before; ProtocolError says why it cannot be."""

        def grammar() -> str:
            schema = {"type": "object"} if constraint.schema is None else closed_objects(constraint.schema)
            return llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults=JSON_STYLE)

        return self._compiled_grammar(constraint.key, grammar, "the JSON schema", "constraint.schema")

    def start(self, constraint: Constraint) -> RowGrammar:
        """A matcher at the start of `constraint`'s grammar, for one row."""
        return RowGrammar(self.compiled(constraint).deep_copy(), self.vocab_size)

    def start_tools(self, tools: Tools, tool_format: ToolFormat) -> RowGrammar:
        """A matcher at the start of the grammar of answers that may call `tools`, in `tool_format`."""
        matcher = self._compiled_grammar(f"tools:{tool_format.name}:{tools.key}", lambda: tool_format.grammar(tools),
                                         "the tools' parameters", "tools")
        return RowGrammar(matcher.deep_copy(), self.vocab_size)

    def _compiled_grammar(self, key: str, grammar: Callable[[], str], what: str, field: str) -> llguidance.LLMatcher:
        if key in self._compiled:
            self._compiled.move_to_end(key)
            return self._compiled[key]
        try:
            matcher = llguidance.LLMatcher(self.tokenizer, grammar())
            error = matcher.get_error() if matcher.is_error() else None
        except (ValueError, TypeError, RuntimeError) as exc:
            error = str(exc)
        if error is not None:
            raise ProtocolError(f"{what} cannot be compiled: {error}", field)
        self._compiled[key] = matcher
        while len(self._compiled) > MAX_CACHED_GRAMMARS:
            self._compiled.popitem(last=False)
        return matcher


class GrammarRefused(RuntimeError):
    """A row's sampled token was not one its grammar allows (the mask should have made that impossible)."""


class RowGrammar:
    """Where one row stands in its grammar: which tokens may come next, and whether it may end."""

    def __init__(self, matcher: llguidance.LLMatcher, vocab_size: int) -> None:
        self.matcher = matcher
        self.vocab_size = vocab_size  # the tokens its masks cover

    def advance(self, token_id: int) -> None:
        """Take the sampled token (always one the mask allowed)."""
        if not self.matcher.consume_token(token_id):
            raise GrammarRefused(f"the grammar refused token {token_id}: {self.matcher.get_error()}")

    @property
    def complete(self) -> bool:
        """Nothing may follow: the output is whole, and the row ends without waiting for an end-of-turn token."""
        return self.matcher.is_stopped()


def mask_logits(scores: torch.Tensor, rows: list[int], grammars: list[RowGrammar]) -> torch.Tensor:
    """Set to -inf, in place, every token its grammar forbids in each of `rows` of `scores` ([B, V]);
    the other rows are untouched. Columns past the tokenizer's vocabulary (padding of the embedding)
    are never allowed. Returns `scores`."""
    vocab_size = grammars[0].vocab_size
    bitmask = llguidance.numpy.allocate_token_bitmask(len(rows), vocab_size)  # [R, ceil(V/32)] int32
    for index, grammar in enumerate(grammars):
        llguidance.numpy.fill_next_token_bitmask(grammar.matcher, bitmask, index)
    # Unpacked by numpy (bit i of word w is token 32w + i, little-endian) and applied row by row in
    # place: 0.3 ms for 8 rows, where gathering and scattering the rows in torch took 2 ms (a third
    # of a decode step), and llguidance's own kernel goes through torch.compile, which wants a C++
    # compiler on a CPU host.
    width = min(vocab_size, scores.shape[1])
    bits = np.unpackbits(bitmask.view(np.uint8), axis=1, count=width, bitorder="little")  # [R, width]
    forbidden = torch.ones(len(rows), scores.shape[1], dtype=torch.bool)  # [R, V]: past the vocabulary too
    forbidden[:, :width] = torch.from_numpy(bits == 0)
    # A grammar in error allows nothing: its row is left as it is (sampling from all -inf would fail
    # the whole batch), and its matcher then refuses whatever token comes, which fails that row alone.
    allows_some = (~forbidden.all(dim=1)).tolist()
    forbidden = forbidden.to(scores.device)
    for index, row in enumerate(rows):
        if allows_some[index]:
            scores[row].masked_fill_(forbidden[index], float("-inf"))
    return scores
