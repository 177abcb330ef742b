"""Per-row sampling: penalties, temperature, top-k, top-p, seeded generators and logprobs.

Every row of a batch keeps its own request's parameters and its own `torch.Generator`, so what a
row draws never depends on the other rows. A seeded row's generator is seeded again at every token
from the seed and the token's place in the answer, so a request resumed elsewhere after a fault
draws what it would have drawn.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from worker.grammar import mask_logits
from worker.sequence import Sequence

# Below this a temperature is greedy: dividing by it would overflow the logits to inf.
MIN_TEMPERATURE = 1e-5


@dataclass(frozen=True, slots=True)
class TokenChoice:
    """The token sampled for one row, with log-probabilities when the request asked for them."""

    token_id: int
    logprob: float | None = None
    top: tuple[tuple[int, float], ...] = ()


class Sampler:
    """Draws each row's next token with that row's parameters and generator."""

    def __init__(self, device: torch.device, unpenalized_ids: frozenset[int] = frozenset()) -> None:
        self.device = device
        # Penalising end-of-turn tokens (they are in every chat prompt) would keep answers from ending.
        self.unpenalized_ids = unpenalized_ids

    def add(self, sequences: list[Sequence]) -> None:
        """Give each new row its own generator, which it carries (a seeded one is seeded at each draw)."""
        for sequence in sequences:
            sequence.generator = torch.Generator(device=self.device)
            if sequence.request.seed is None:
                sequence.generator.seed()

    def sample(self, logits: torch.Tensor, sequences: list[Sequence]) -> list[TokenChoice]:
        """One token per row of `logits` ([B, V], row i for sequences[i]); greedy rows take the argmax."""
        logits = logits.float()  # [B, V]
        raw_logprobs = None
        if any(s.request.logprobs for s in sequences):
            raw_logprobs = F.log_softmax(logits, dim=-1)  # of the model's own distribution, before penalties
        scores = apply_penalties(logits, sequences, self.unpenalized_ids)
        scores = mask_early_ends(scores, logits, sequences)
        constrained = [row for row, s in enumerate(sequences) if s.grammar is not None]
        if constrained:  # in place, only those rows: a free row's scores are the same with or without them
            scores = mask_logits(scores, constrained, [sequences[row].grammar for row in constrained])
        greedy = scores.argmax(dim=-1).tolist()  # one call (and one device sync) for the whole batch
        choices = []
        for row, sequence in enumerate(sequences):
            request = sequence.request
            if request.temperature < MIN_TEMPERATURE:
                token = greedy[row]
            else:
                probs = filtered_probs(scores[row] / request.temperature, request.top_k, request.top_p,
                                       request.min_p)
                generator = sequence.generator
                assert generator is not None, "a row samples only after Sampler.add"
                if request.seed is not None:
                    generator.manual_seed(position_seed(request.seed, sequence.num_generated))
                token = int(torch.multinomial(probs, 1, generator=generator))
            choices.append(choice(token, raw_logprobs[row] if request.logprobs else None, request.top_logprobs))
        return choices


def position_seed(seed: int, position: int) -> int:
    """The seed of the draw at `position` of an answer: splitmix64 of the seed and the position, so
    that neighbouring positions (and seeds) start their generators far apart."""
    mixed = (seed + (position + 1) * 0x9E3779B97F4A7C15) % 2**64
    mixed = ((mixed ^ (mixed >> 30)) * 0xBF58476D1CE4E5B9) % 2**64
    mixed = ((mixed ^ (mixed >> 27)) * 0x94D049BB133111EB) % 2**64
    return mixed ^ (mixed >> 31)


def apply_penalties(logits: torch.Tensor, sequences: list[Sequence], unpenalized_ids: frozenset[int]) -> torch.Tensor:
    """Repetition (prompt and output, as in transformers), presence and frequency (output only, as in
    OpenAI); never on `unpenalized_ids`. Returns `logits` itself when no row has a penalty."""
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
        if sequence.num_generated and (request.presence_penalty or request.frequency_penalty):
            counts = torch.bincount(torch.tensor(sequence.generated_ids, device=logits.device),
                                    minlength=scores.shape[1])
            counts[[i for i in unpenalized_ids if i < counts.shape[0]]] = 0
            scores[row] -= request.frequency_penalty * counts + request.presence_penalty * (counts > 0)
    return scores


def mask_early_ends(scores: torch.Tensor, logits: torch.Tensor, sequences: list[Sequence]) -> torch.Tensor:
    """No ending token (end of turn, stop token ids) for a row still short of its `min_tokens`.
    `scores` is copied first when it is still the model's `logits`."""
    for row, sequence in enumerate(sequences):
        if not sequence.request.min_tokens or sequence.may_end or not sequence.end_ids:  # the usual row: no lookups
            continue
        if scores is logits:
            scores = logits.clone()
        scores[row, [i for i in sequence.end_ids if i < scores.shape[1]]] = float("-inf")
    return scores


def filtered_probs(scores: torch.Tensor, top_k: int, top_p: float, min_p: float = 0.0) -> torch.Tensor:
    """Probabilities ([V]) of one row's `scores`, zero outside its top-k and its top-p nucleus, and
    below `min_p` times the likeliest token's."""
    if top_k:
        kth = torch.topk(scores, min(top_k, scores.shape[-1])).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        # keep the smallest prefix whose mass reaches top_p (always at least one token)
        drop = sorted_probs.cumsum(-1) - sorted_probs >= top_p
        probs = probs.scatter(0, order, sorted_probs.masked_fill(drop, 0.0))
    if min_p > 0.0:
        probs = probs.masked_fill(probs < min_p * probs.max(), 0.0)
    return probs


def choice(token: int, logprobs: torch.Tensor | None, num_top: int) -> TokenChoice:
    """`token` with its log-probability and the `num_top` likeliest alternatives, when `logprobs` ([V]) is given."""
    if logprobs is None:
        return TokenChoice(token)
    top = ()
    if num_top:
        values, ids = torch.topk(logprobs, num_top)
        top = tuple(zip(ids.tolist(), values.tolist()))
    return TokenChoice(token, float(logprobs[token]), top)
