"""The engine: requests in, protocol events out. Glue between scheduler, runner and text assembly."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from broker import protocol
from broker.protocol import Command, ErrorCode, FinishReason, GenerationRequest, ProtocolError
from worker.prompt import PromptEncoder
from worker.runner import ModelRunner, TokenChoice
from worker.scheduler import Scheduler
from worker.sequence import Sequence
from worker.text import Detokenizer, StopMatcher

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Event:
    """One message for the broker about one request."""

    request_id: bytes
    command: Command
    fields: dict[str, Any]


def _error(request_id: bytes, code: ErrorCode, message: str) -> Event:
    return Event(request_id, Command.ERROR, protocol.Error(code, message).to_fields())


class Engine:
    """Admits requests, runs batched steps and turns sampled tokens into TOKEN/DONE events."""

    def __init__(self, runner: ModelRunner, prompts: PromptEncoder, scheduler: Scheduler, context_length: int) -> None:
        self.runner = runner
        self.prompts = prompts
        self.scheduler = scheduler
        self.context_length = context_length

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work

    def add(self, request_id: bytes, body: bytes) -> list[Event]:
        """Queue a request (a packed REQUEST body); one that cannot run is answered with an ERROR at once."""
        try:
            request = GenerationRequest.from_fields(protocol.unpack_body(body))
            prompt_ids = self.prompts.encode(request)
        except ProtocolError as exc:
            return [_error(request_id, ErrorCode.BAD_REQUEST, str(exc))]
        if not prompt_ids:
            return [_error(request_id, ErrorCode.BAD_REQUEST, "the prompt is empty: it encodes to no tokens")]
        room = self.context_length - len(prompt_ids)
        max_tokens = request.max_tokens or room
        if room < 1 or max_tokens > room:
            wanted = f" and max_tokens is {request.max_tokens}" if request.max_tokens else ""
            return [_error(request_id, ErrorCode.CONTEXT_LENGTH_EXCEEDED,
                           f"the prompt has {len(prompt_ids)} tokens{wanted}: more than the model's context "
                           f"of {self.context_length} tokens")]
        previous = self.scheduler.find(request_id)
        if previous is not None:  # the broker sent it again (it lost track of this worker): start over
            self._retire([previous])
        tokenizer = self.prompts.tokenizer
        self.scheduler.add(Sequence(request_id, request, prompt_ids, max_tokens,
                                    Detokenizer(tokenizer, prompt_ids), StopMatcher(request.stop)))
        return []

    def cancel(self, request_id: bytes) -> list[Event]:
        """Stop a request now: its row leaves the batch before the next step."""
        sequence = self.scheduler.find(request_id)
        if sequence is None:
            return []
        sequence.finish_reason = FinishReason.CANCELLED
        self._retire([sequence])
        return [self._done(sequence)]

    def drop_all(self) -> None:
        """Forget every request without a word: the broker that sent them has forgotten them too."""
        self._retire(self.scheduler.sequences)

    def step(self) -> list[Event]:
        """One batched step; a failure ends every request in it with an explicit error, after the
        events the step had already made."""
        events: list[Event] = []
        try:
            self._step(events)
        except Exception as exc:
            log.exception("engine step failed; failing the requests in the batch")
            running = list(self.scheduler.running)
            self._retire(running)
            events += _failed(running, exc, events)
        return events

    def _step(self, events: list[Event]) -> None:
        plan = self.scheduler.schedule()
        joining = plan.prefill or ([plan.chunk.sequence] if plan.chunk else [])
        try:
            if plan.chunk is not None:
                choice = self.runner.prefill_chunk(plan.chunk.sequence, plan.chunk.start, plan.chunk.end)
                if choice is not None:
                    self._accept(joining, [choice], events)
            elif plan.prefill:
                self._accept(joining, self.runner.prefill(plan.prefill), events)
        except Exception as exc:
            # New prompts have their own cache until they join: only they fail, the batch runs on.
            log.exception("prefill failed; failing the %d requests that were joining", len(joining))
            self._retire(joining)
            events += _failed(joining, exc, events)
        if self.runner.rows:
            rows = list(self.runner.rows)
            self._accept(rows, self.runner.decode(), events)

    def _accept(self, sequences: list[Sequence], choices: list[TokenChoice], events: list[Event]) -> None:
        for sequence, choice in zip(sequences, choices):
            delta = self._extend(sequence, choice)
            if delta.text or delta.logprobs:
                events.append(Event(sequence.request_id, Command.TOKEN, delta.to_fields()))
                sequence.unsent_tokens = 0
            if sequence.finished:
                events.append(self._done(sequence))
        self._retire([s for s in sequences if s.finished])

    def _extend(self, sequence: Sequence, choice: TokenChoice) -> protocol.TokenDelta:
        sequence.output_ids.append(choice.token_id)
        sequence.unsent_tokens += 1
        if choice.token_id in self.prompts.stop_token_ids:
            sequence.finish_reason = FinishReason.STOP
            # Text held back with a character the model never finished: keep what came before it.
            held = sequence.detokenizer.flush().rstrip("\ufffd")
            text = sequence.stop_matcher.push(held)[0] + sequence.stop_matcher.flush()
        else:
            text, stopped = sequence.stop_matcher.push(sequence.detokenizer.push(choice.token_id))
            if stopped:
                sequence.finish_reason = FinishReason.STOP
            elif len(sequence.output_ids) >= sequence.max_tokens:
                sequence.finish_reason = FinishReason.LENGTH
                text += sequence.stop_matcher.push(sequence.detokenizer.flush())[0] + sequence.stop_matcher.flush()
        logprobs = None
        if sequence.request.logprobs:
            logprob = self.prompts.token_logprob
            logprobs = (logprob(choice.token_id, choice.logprob or 0.0,
                                tuple(logprob(t, lp) for t, lp in choice.top)),)
        return protocol.TokenDelta(text, sequence.unsent_tokens, logprobs)

    def _done(self, sequence: Sequence) -> Event:
        assert sequence.finish_reason is not None
        done = protocol.Done(sequence.finish_reason, len(sequence.prompt_ids), len(sequence.output_ids))
        return Event(sequence.request_id, Command.DONE, done.to_fields())

    def _retire(self, sequences: list[Sequence]) -> None:
        if sequences:
            self.runner.release(sequences)
            for sequence in sequences:
                self.scheduler.remove(sequence)


def _failed(sequences: list[Sequence], exc: Exception, events: list[Event]) -> list[Event]:
    """ERRORs for the sequences a failure stopped, but none for one whose DONE is already among `events`."""
    done = {event.request_id for event in events if event.command is Command.DONE}
    return [_error(s.request_id, ErrorCode.INTERNAL, f"the worker failed: {exc}")
            for s in sequences if s.request_id not in done]
