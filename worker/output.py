"""The per-sequence output step: one sampled token becomes text, stop decisions, grammar and tool-call
progress, logprobs, and at most one TOKEN frame. Pure bookkeeping on the `Sequence`; no model."""

from __future__ import annotations

from collections.abc import Callable

from broker import protocol
from broker.protocol import FinishReason
from worker.sampling import TokenChoice
from worker.sequence import Sequence

TokenLogprob = Callable[..., protocol.TokenLogprob]


class OutputStep:
    """Turns each sampled token of a sequence into what its client receives."""

    def __init__(self, token_logprob: TokenLogprob) -> None:
        self._token_logprob = token_logprob  # a token id and its logprob as the client sees them

    def push(self, sequence: Sequence, choice: TokenChoice) -> protocol.TokenDelta | None:
        """Add one sampled token to `sequence`; returns the TOKEN frame it brings, if any.

        A frame counts every token since the previous one (tokens held back: part of a character,
        or what may start a stop string), and a sequence that ends sends a last frame for the tokens
        still uncounted, so a stream's `num_tokens` add up to its DONE's `completion_tokens`.
        """
        request = sequence.request
        token = choice.token_id
        sequence.output_ids.append(token)
        sequence.unsent_tokens += 1
        # before min_tokens the sampler never picks an ending token; ignore_eos leaves the end of turn out of them
        end_of_turn = token in sequence.end_ids
        text, stopped, complete = "", False, False
        if sequence.grammar is not None:
            sequence.grammar.advance(token)
            # a complete constrained output ends here: its grammar allows nothing but the end of turn
            complete = sequence.grammar.complete
        if not end_of_turn or (request.include_stop_str_in_output and token in request.stop_token_ids):
            text, stopped = sequence.stop_matcher.push(sequence.detokenizer.push(token), active=sequence.may_end)
        if end_of_turn or stopped or complete:
            sequence.finish_reason = FinishReason.STOP
        elif sequence.num_generated >= sequence.max_tokens:
            sequence.finish_reason = FinishReason.LENGTH
        if sequence.finished and not stopped:  # a stop string drops what follows it; other ends keep it
            text += _held_back_text(sequence, end_of_turn)
        text, calls = _read_answer(sequence, text)
        logprobs = None
        if request.logprobs:
            logprob = self._token_logprob
            logprobs = (logprob(token, choice.logprob or 0.0, tuple(logprob(t, lp) for t, lp in choice.top)),)
        if not text and not calls and logprobs is None and not sequence.finished:
            return None  # counted by the next frame
        return _frame(sequence, text, logprobs, calls)

    @staticmethod
    def flush(sequence: Sequence) -> protocol.TokenDelta | None:
        """A sequence ended from outside (its deadline passed): the frame with all it still holds
        back (text, a cut tool call, uncounted tokens), if anything."""
        text, calls = _read_answer(sequence, _held_back_text(sequence, end_of_turn=False))
        if not text and not calls and not sequence.unsent_tokens:
            return None
        return _frame(sequence, text, None, calls)


def _frame(sequence: Sequence, text: str, logprobs: tuple[protocol.TokenLogprob, ...] | None,
           calls: tuple[protocol.ToolCallDelta, ...]) -> protocol.TokenDelta:
    """The TOKEN frame for `text`, counting every token not counted yet."""
    unsent = sequence.output_ids[len(sequence.output_ids) - sequence.unsent_tokens:]
    sequence.unsent_tokens = 0
    return protocol.TokenDelta(text, len(unsent), logprobs, calls, tuple(unsent))


def _read_answer(sequence: Sequence, text: str) -> tuple[str, tuple[protocol.ToolCallDelta, ...]]:
    """With tools, new output split into reply text and call pieces (all that is left, once the sequence
    has ended: an answer that made calls and stopped ends with `tool_calls`); without, the text as it is."""
    if sequence.answer is None:
        return text, ()
    text, calls = sequence.answer.push(text)
    if sequence.finished:
        rest, more_calls = sequence.answer.finish()
        text, calls = text + rest, calls + more_calls
        if sequence.answer.made_calls and sequence.finish_reason is FinishReason.STOP:
            sequence.finish_reason = FinishReason.TOOL_CALLS
    return text, calls


def _held_back_text(sequence: Sequence, end_of_turn: bool) -> str:
    """At the end of a sequence: the text its detokenizer and stop matcher still hold."""
    held = sequence.detokenizer.flush()
    if end_of_turn:  # a character the model never finished: keep what came before it
        held = held.rstrip("\ufffd")
    return sequence.stop_matcher.push(held)[0] + sequence.stop_matcher.flush()
