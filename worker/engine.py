"""The engine: typed requests in, typed events out. Glue between scheduler, runner and text assembly."""

from __future__ import annotations

import logging

from broker import protocol
from broker.protocol import ErrorCode, FinishReason, GenerationRequest, ProtocolError, TokenizeRequest
from worker.engine_api import DoneEvent, ErrorEvent, Event, Request, TokenEvent, TokensEvent
from worker.grammar import GrammarCompiler, GrammarRefused
from worker.output import OutputStep
from worker.prompt import PromptEncoder
from worker.runner import ModelRunner
from worker.sampling import TokenChoice
from worker.scheduler import Scheduler
from worker.sequence import Sequence
from worker.text import Detokenizer, StopMatcher

log = logging.getLogger(__name__)


def _error(request_id: bytes, code: ErrorCode, message: str, field: str | None = None) -> ErrorEvent:
    return ErrorEvent(request_id, protocol.Error(code, message, field))


class Engine:
    """The generation engine (a `WorkerEngine`): admits requests, runs the scheduler's plan on the
    runner each step, and turns sampled tokens into events. The scheduler alone decides which
    sequences run."""

    def __init__(self, runner: ModelRunner, prompts: PromptEncoder, scheduler: Scheduler, context_length: int,
                 grammars: GrammarCompiler | None = None) -> None:
        self.runner = runner
        self.prompts = prompts
        self.scheduler = scheduler
        self.context_length = context_length
        self._grammars = grammars  # built on the first constrained request when not given
        self.output = OutputStep(prompts.token_logprob)

    @property
    def grammars(self) -> GrammarCompiler:
        """The grammar compiler; ProtocolError when this model's tokenizer cannot have one."""
        if self._grammars is None:
            try:
                self._grammars = GrammarCompiler(self.prompts.tokenizer, self.prompts.stop_token_ids)
            except ValueError as exc:  # llguidance reads fast tokenizers only
                raise ProtocolError(f"this model cannot constrain its output: {exc}", "constraint") from None
        return self._grammars

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work

    def add(self, request_id: bytes, request: Request) -> list[Event]:
        """Queue a request; one that cannot run on this model is answered with an error at once, and
        a TOKENIZE at once with its tokens."""
        if isinstance(request, TokenizeRequest):
            return self.tokenize(request_id, request)
        if not isinstance(request, GenerationRequest):
            return [_error(request_id, ErrorCode.BAD_REQUEST, "this worker generates text: it does not embed")]
        try:
            prompt_ids = self.prompts.encode(request)
            grammar, answer = None, None
            if request.constraint is not None:
                grammar = self.grammars.start(request.constraint)
            elif request.tools is not None:
                grammar = self.grammars.start_tools(request.tools, self.prompts.tool_format)
                answer = self.prompts.tool_format.reader()
        except ProtocolError as exc:
            return [_error(request_id, ErrorCode.BAD_REQUEST, str(exc), exc.field)]
        if not prompt_ids:
            return [_error(request_id, ErrorCode.BAD_REQUEST, "the prompt is empty: it encodes to no tokens",
                           "messages" if request.messages is not None else "prompt")]
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
        end_ids = frozenset(request.stop_token_ids) | (frozenset() if request.ignore_eos else self.prompts.stop_token_ids)
        detokenizer = Detokenizer(self.prompts.tokenizer, prompt_ids, request.skip_special_tokens,
                                  request.spaces_between_special_tokens)
        sequence = Sequence(request_id, request, prompt_ids, max_tokens, detokenizer,
                            StopMatcher(request.stop, request.include_stop_str_in_output), grammar=grammar,
                            answer=answer, end_ids=end_ids)
        events = self._replay(sequence) if request.resume_ids else []
        if not events:  # replayed (or new), and not ended by its replay
            self.scheduler.add(sequence)
        return events

    def _replay(self, sequence: Sequence) -> list[Event]:
        """A resumed request: its delivered tokens pass through the output step again, sending nothing
        (the caller has their text), so that held-back text, stop strings, grammar and tool calls stand
        where they stood when it was cut; then they join the prompt, to be prefilled with it."""
        try:
            for token in sequence.request.resume_ids:
                self.output.push(sequence, TokenChoice(token))
                sequence.unsent_tokens = 0  # the caller counted it, with its frame
                if sequence.finished:  # only its DONE was lost with its worker
                    return [self._done(sequence)]
        except GrammarRefused as exc:
            return [_error(sequence.request_id, ErrorCode.BAD_REQUEST, f"'resume_ids' do not fit the request: {exc}",
                           "resume_ids")]
        sequence.prompt_ids = sequence.prompt_ids + sequence.output_ids
        sequence.num_resumed, sequence.output_ids, sequence.unsent_tokens = len(sequence.output_ids), [], 0
        return []

    def tokenize(self, request_id: bytes, request: TokenizeRequest) -> list[Event]:
        """Encode a prompt or chat exactly as `add` would (or decode tokens), at once: no model step."""
        tokenizer = self.prompts.tokenizer
        try:
            if request.tokens is not None:
                ids = list(request.tokens)
                unknown = [t for t in ids if t >= len(tokenizer)]
                if unknown:
                    return [_error(request_id, ErrorCode.BAD_REQUEST, f"'tokens' cannot be decoded: {unknown[0]} is "
                                   f"not in the vocabulary of {len(tokenizer)} tokens", "tokens")]
                text = tokenizer.decode(ids, skip_special_tokens=False)
            else:
                ids = self.prompts.encode(GenerationRequest(request.model, messages=request.messages,
                                                            prompt=request.prompt, tools=request.tools),
                                          add_special_tokens=request.add_special_tokens)
                text = ""
        except ProtocolError as exc:
            return [_error(request_id, ErrorCode.BAD_REQUEST, str(exc), exc.field)]
        return [TokensEvent(request_id, protocol.Tokens(tuple(ids), text, self.context_length))]

    def cancel(self, request_id: bytes, reason: FinishReason = FinishReason.CANCELLED) -> list[Event]:
        """Stop a request now: its row leaves the batch before the next step. A request that already
        ended (its DONE crossed the CANCEL) is unknown here, and nothing happens. `reason` DEADLINE:
        its time ran out, and its DONE (after the text still held back) goes to its client."""
        sequence = self.scheduler.find(request_id)
        if sequence is None:
            return []
        events: list[Event] = []
        sequence.finish_reason = reason
        if reason is FinishReason.DEADLINE:  # the answer so far goes out whole: held-back text, a cut tool call
            delta = self.output.flush(sequence)
            if delta is not None:
                events.append(TokenEvent(request_id, delta))
        self._retire([sequence])
        return [*events, self._done(sequence)]

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
            self._retire(running, keep=False)
            events += _failed(running, exc, events)
        return events

    def _step(self, events: list[Event]) -> None:
        if self.runner.prefixes is not None:
            # Prefixes change as rows join and leave: look again for those that may be admitted next.
            for sequence in list(self.scheduler.waiting)[:self.scheduler.limits.max_batch]:
                self.runner.find_prefix(sequence)
        plan = self.scheduler.schedule()
        if plan.joining:
            try:
                if plan.chunk is not None:
                    choice = self.runner.prefill_chunk(plan.chunk.sequence, plan.chunk.start, plan.chunk.end)
                    choices = [] if choice is None else [choice]
                else:
                    choices = self.runner.prefill(plan.prefill)
            except Exception as exc:
                # New prompts have their own cache until they join: only they fail, the batch runs on.
                log.exception("prefill failed; failing the %d requests that were joining", len(plan.joining))
                self._retire(plan.joining, keep=False)
                events += _failed(plan.joining, exc, events)
            else:
                self.scheduler.join(plan.ready)
                self._accept(plan.ready, choices, events)
        if self.scheduler.running:
            batch = list(self.scheduler.running)
            self._accept(batch, self.runner.decode(batch), events)

    def _accept(self, sequences: list[Sequence], choices: list[TokenChoice], events: list[Event]) -> None:
        refused = []
        for sequence, choice in zip(sequences, choices):
            try:
                delta = self.output.push(sequence, choice)
            except GrammarRefused as exc:  # a bug must cost its own row, never the batch
                log.error("request %s: %s", sequence.request_id.hex(), exc)
                refused.append(sequence)
                events.append(_error(sequence.request_id, ErrorCode.INTERNAL, f"the worker failed: {exc}"))
                continue
            if delta is not None:
                events.append(TokenEvent(sequence.request_id, delta))
            if sequence.finished:
                events.append(self._done(sequence))
        self._retire([s for s in sequences if s.finished] + refused)

    def _done(self, sequence: Sequence) -> DoneEvent:
        assert sequence.finish_reason is not None
        # A prefix found but never used counts 0; one that reached into a resumed answer counts only its prompt part.
        cached = min(sequence.num_cached_tokens, sequence.num_prompt_tokens) if sequence.output_ids else 0
        stop = sequence.stop_matcher.matched if sequence.finish_reason is FinishReason.STOP else None
        return DoneEvent(sequence.request_id, protocol.Done(sequence.finish_reason, sequence.num_prompt_tokens,
                                                            sequence.num_generated, cached, stop=stop))

    def _retire(self, sequences: list[Sequence], keep: bool = True) -> None:
        """Take sequences out of the batch; `keep`: their cache may serve later prompts (not after a failure)."""
        if sequences:
            self.runner.release(self.scheduler.running, sequences, keep)
            for sequence in sequences:
                self.scheduler.remove(sequence)


def _failed(sequences: list[Sequence], exc: Exception, events: list[Event]) -> list[Event]:
    """Errors for the sequences a failure stopped, but none for one whose DONE is already among `events`."""
    done = {event.request_id for event in events if isinstance(event, DoneEvent)}
    return [_error(s.request_id, ErrorCode.INTERNAL, f"the worker failed: {exc}")
            for s in sequences if s.request_id not in done]
