"""Constrained decoding: a request's `constraint` as a grammar, and each constrained row's token mask.

llguidance computes the mask of tokens a grammar allows next, lazily and per row (about 0.1 ms for a
row of this vocabulary on a CPU), so constrained and free rows share one batch: the sampler applies
the masks of the constrained rows to their logits and leaves the others untouched. A schema is
checked once, when its first request is admitted, and its grammar cached by the schema's canonical
text; each row then gets a matcher of its own (about a millisecond, ten for a large schema, spent
between two steps). A copy of a cached matcher (`deep_copy`) starts faster, but the first copy
computed each of its masks in over 100 ms when measured: a fresh matcher is the safe choice.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from typing import Any

import llguidance
import llguidance.hf
import llguidance.torch
import torch
from transformers import PreTrainedTokenizerBase

from broker.protocol import Constraint, ProtocolError

# This many distinct schemas stay cached (a grammar is a few kilobytes of text).
MAX_CACHED_GRAMMARS = 256
# The compact separators OpenAI's own structured outputs use; a flexible whitespace pattern would
# let a sampled row spend its tokens on blank lines.
_JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class GrammarCompiler:
    """Turns constraints into grammars for one tokenizer, and starts a matcher per constrained row."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, end_of_turn_ids: frozenset[int]) -> None:
        # The model's end of turn is where a grammar may end: the matcher allows it once the output is complete.
        self.tokenizer = llguidance.hf.from_tokenizer(tokenizer, eos_token=sorted(end_of_turn_ids))
        self.vocab_size = self.tokenizer.vocab_size
        self._grammars: OrderedDict[str, str] = OrderedDict()  # checked grammars, by constraint key
        self._warm_up()

    def _warm_up(self) -> None:
        """The first mask for a tokenizer costs about a second (llguidance builds its token tables):
        spend it now rather than in a request's step."""
        matcher = self.start(Constraint("json_object"))
        mask_logits(torch.zeros(1, self.vocab_size), [0], [matcher])

    def grammar(self, constraint: Constraint) -> str:
        """`constraint`'s grammar, checked by compiling it once; ProtocolError says why it cannot be."""
        key = constraint.key
        if key in self._grammars:
            self._grammars.move_to_end(key)
            return self._grammars[key]
        schema = {"type": "object"} if constraint.schema is None else closed_objects(constraint.schema)
        try:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults=_JSON_OPTIONS)
            failed, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, self.tokenizer)
        except (ValueError, TypeError, RuntimeError) as exc:
            failed, messages = True, [str(exc)]
        if failed:
            raise ProtocolError(f"the JSON schema cannot be compiled: {'; '.join(messages)}", "constraint.schema")
        self._grammars[key] = grammar
        while len(self._grammars) > MAX_CACHED_GRAMMARS:
            self._grammars.popitem(last=False)
        return grammar

    def start(self, constraint: Constraint) -> RowGrammar:
        """A matcher at the start of `constraint`'s grammar, for one row."""
        matcher = llguidance.LLMatcher(self.tokenizer, self.grammar(constraint))
        if matcher.is_error():  # checked with the grammar already; a limit of the engine's could still bite
            raise ProtocolError(f"the JSON schema cannot be compiled: {matcher.get_error()}", "constraint.schema")
        return RowGrammar(matcher, self.vocab_size)


# Keywords whose values are schemas, lists of schemas, or maps of names to schemas.
_SUBSCHEMA = ("items", "additionalItems", "contains", "not", "if", "then", "else", "propertyNames",
              "additionalProperties", "unevaluatedItems")
_SUBSCHEMA_LISTS = ("prefixItems", "anyOf", "oneOf")  # not allOf: its parts describe one object together
_SUBSCHEMA_MAPS = ("properties", "$defs", "definitions", "patternProperties", "dependentSchemas")
_OPEN_KEYWORDS = ("additionalProperties", "patternProperties", "unevaluatedProperties")


def closed_objects(schema: Any) -> Any:
    """`schema` with every object that lists its properties, and says nothing of others, closed to
    them (as in OpenAI's strict mode and xgrammar's default): whatever it generates still validates
    against the schema as sent, and a sampled row does not wander off into keys nobody asked for."""
    if not isinstance(schema, dict):
        return schema
    closed = dict(schema)
    for key in _SUBSCHEMA:
        if isinstance(closed.get(key), dict):
            closed[key] = closed_objects(closed[key])
    for key in _SUBSCHEMA_LISTS:
        if isinstance(closed.get(key), list):
            closed[key] = [closed_objects(item) for item in closed[key]]
    for key in _SUBSCHEMA_MAPS:
        if isinstance(closed.get(key), dict):
            closed[key] = {name: closed_objects(item) for name, item in closed[key].items()}
    if isinstance(closed.get("properties"), dict) and not any(k in closed for k in _OPEN_KEYWORDS):
        closed["additionalProperties"] = False
    return closed


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
    """`scores` ([B, V]) with every token its grammar forbids at -inf in each of `rows`; a new tensor
    when any row is masked. Columns past the tokenizer's vocabulary (padding of the embedding) are never allowed."""
    vocab_size = grammars[0].vocab_size
    bitmask = llguidance.torch.allocate_token_bitmask(len(rows), vocab_size)  # [R, ceil(V/32)] int32
    for index, grammar in enumerate(grammars):
        llguidance.torch.fill_next_token_bitmask(grammar.matcher, bitmask, index)
    # Unpacked with plain tensor ops: llguidance's own kernel goes through torch.compile, which wants
    # a C++ compiler on a CPU host and compiles for seconds on first use.
    bits = (bitmask.to(scores.device).unsqueeze(-1) >> _BIT_SHIFTS.to(scores.device)) & 1  # [R, W, 32]
    allowed = torch.zeros(len(rows), scores.shape[1], dtype=torch.bool, device=scores.device)  # [R, V]
    width = min(vocab_size, scores.shape[1])
    allowed[:, :width] = bits.flatten(1)[:, :width].bool()
    scores = scores.clone()
    index = torch.tensor(rows, device=scores.device)
    scores[index] = scores[index].masked_fill(~allowed, float("-inf"))
    return scores


_BIT_SHIFTS = torch.arange(32, dtype=torch.int32)
