"""Sampling on a five-token vocabulary, checked against values worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from broker.protocol import GenerationRequest
from worker.sampling import Sampler, TokenChoice, apply_penalties, choice, filtered_probs
from worker.sequence import Sequence
from worker.text import StopMatcher

CPU = torch.device("cpu")


def sequence(prompt_ids=(0,), output_ids=(), **params) -> Sequence:
    request = GenerationRequest(model="m", prompt="x", **params)
    return Sequence(b"r" * 16, request, list(prompt_ids), 10, detokenizer=None, stop_matcher=StopMatcher(()),
                    output_ids=list(output_ids))


def test_top_k_keeps_the_k_highest_scores_and_their_ties():
    scores = torch.tensor([1.0, 3.0, 2.0, 0.0, -1.0])
    kept = filtered_probs(scores, top_k=2, top_p=1.0)
    total = math.exp(3) + math.exp(2)
    assert kept.tolist() == pytest.approx([0.0, math.exp(3) / total, math.exp(2) / total, 0.0, 0.0])
    tied = filtered_probs(torch.tensor([1.0, 2.0, 2.0, 0.0, 0.0]), top_k=1, top_p=1.0)
    assert tied.tolist() == pytest.approx([0.0, 0.5, 0.5, 0.0, 0.0])
    assert filtered_probs(scores, top_k=9, top_p=1.0).tolist() == pytest.approx(torch.softmax(scores, -1).tolist())


@pytest.mark.parametrize("top_p, kept", [(0.4, [0]), (0.55, [0, 1]), (0.75, [0, 1, 2]), (1.0, [0, 1, 2, 3, 4])])
def test_top_p_keeps_the_smallest_set_that_reaches_p(top_p, kept):
    probs = [0.5, 0.2, 0.15, 0.1, 0.05]
    result = filtered_probs(torch.tensor(probs).log(), top_k=0, top_p=top_p)
    assert result.tolist() == pytest.approx([p if i in kept else 0.0 for i, p in enumerate(probs)])


def test_top_k_then_top_p():
    # top-k 3 leaves 0.5, 0.2, 0.15 (renormalised: 0.588, 0.235, 0.176); top-p 0.7 then keeps two of them
    result = filtered_probs(torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05]).log(), top_k=3, top_p=0.7)
    assert result.tolist() == pytest.approx([0.5 / 0.85, 0.2 / 0.85, 0.0, 0.0, 0.0])


def test_repetition_penalty_divides_positive_and_multiplies_negative_seen_logits():
    logits = torch.tensor([[1.0, 2.0, -1.0, -2.0, 0.5]])
    row = sequence(prompt_ids=[1], output_ids=[3, 4], repetition_penalty=2.0)
    scores = apply_penalties(logits, [row], unpenalized_ids=frozenset({4}))
    assert scores.tolist() == [[1.0, 1.0, -1.0, -4.0, 0.5]]  # 4 was seen, but is never penalised
    assert logits.tolist() == [[1.0, 2.0, -1.0, -2.0, 0.5]]  # the caller's logits are left alone


def test_presence_and_frequency_penalties_count_output_tokens_only():
    logits = torch.zeros(1, 5)
    row = sequence(prompt_ids=[1, 1], output_ids=[2, 2, 3, 0], presence_penalty=0.5, frequency_penalty=0.25)
    scores = apply_penalties(logits, [row], unpenalized_ids=frozenset({0}))
    # token 2: 2 x 0.25 + 0.5; token 3: 0.25 + 0.5; token 1 only in the prompt; token 0 exempt
    assert scores.tolist() == [[0.0, 0.0, -1.0, -0.75, 0.0]]


def test_rows_without_penalties_share_the_logits_untouched():
    logits = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0]])
    assert apply_penalties(logits, [sequence(output_ids=[4])], frozenset()) is logits


def test_a_choice_carries_log_softmax_values_and_the_top_alternatives():
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0, 3.0])
    expected = [x - math.log(sum(math.exp(y) for y in logits.tolist())) for x in logits.tolist()]
    picked = choice(1, torch.log_softmax(logits, -1), num_top=2)
    assert picked.token_id == 1 and picked.logprob == pytest.approx(expected[1])
    assert [t for t, _ in picked.top] == [4, 0]
    assert [lp for _, lp in picked.top] == pytest.approx([expected[4], expected[0]])
    assert choice(1, None, num_top=2) == TokenChoice(1)


def test_greedy_rows_take_the_argmax_and_logprobs_come_from_the_unpenalised_logits():
    sampler = Sampler(CPU)
    greedy = sequence(temperature=0.0, logprobs=True, top_logprobs=1)
    penalised = sequence(temperature=0.0, output_ids=[4], presence_penalty=2.0, logprobs=True)
    rows = [greedy, penalised]
    sampler.add(rows)
    logits = torch.tensor([[0.0, 1.0, 4.0, 2.0, 3.0], [0.0, 1.0, 2.0, 0.0, 3.0]])
    first, second = sampler.sample(logits, rows)
    assert first.token_id == 2 and first.logprob == pytest.approx(torch.log_softmax(logits[0], -1)[2].item())
    assert first.top == ((2, pytest.approx(first.logprob)),)
    assert second.token_id == 2  # 3.0 - 2.0 for token 4 loses to 2.0
    assert second.logprob == pytest.approx(torch.log_softmax(logits[1], -1)[2].item())


def draw(sampler: Sampler, logits: torch.Tensor, rows: list[Sequence]) -> list:
    """One step, as the engine takes it: each row's token joins its output (a seeded draw depends on its place)."""
    choices = sampler.sample(logits, rows)
    for row, picked in zip(rows, choices):
        row.output_ids.append(picked.token_id)
    return choices


def test_a_seeded_draw_depends_only_on_the_seed_and_its_place():
    logits = torch.zeros(1, 50)
    first, second = sequence(seed=7), sequence(seed=7, output_ids=range(5))
    sampler = Sampler(CPU)
    sampler.add([first, second])
    picks = [draw(sampler, logits, [first])[0].token_id for _ in range(8)]
    assert [draw(sampler, logits, [second])[0].token_id for _ in range(3)] == picks[5:]  # resumed at place 5


def test_the_same_seed_draws_the_same_tokens_whatever_the_other_rows():
    logits = torch.zeros(3, 5)  # uniform: every token equally likely

    def draws(rows, seeded):
        sampler = Sampler(CPU)
        sampler.add(rows)
        picks = [draw(sampler, logits[:len(rows)], rows) for _ in range(30)]
        return [row[rows.index(seeded)].token_id for row in picks]

    alone = sequence(seed=7)
    mine = draws([alone], alone)
    busy = sequence(seed=7)
    assert draws([sequence(seed=1), busy, sequence()], busy) == mine
    assert len(set(mine)) > 1
    other = sequence(seed=8)
    assert draws([other], other) != mine


def test_sampling_never_leaves_the_top_k():
    sampler = Sampler(CPU)
    row = sequence(temperature=1.5, top_k=2, seed=3)
    sampler.add([row])
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0, 2.5]])
    assert {draw(sampler, logits, [row])[0].token_id for _ in range(50)} == {1, 4}


def test_each_row_carries_a_generator_of_its_own():
    sampler = Sampler(CPU)
    rows = [sequence(), sequence()]
    sampler.add(rows)
    assert rows[0].generator is not None and rows[1].generator is not None
    assert rows[0].generator is not rows[1].generator
