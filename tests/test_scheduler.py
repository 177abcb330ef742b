"""The scheduler's policy, driven without torch."""

from broker.protocol import GenerationRequest
from worker.scheduler import Scheduler, SchedulerLimits
from worker.sequence import Sequence
from worker.text import StopMatcher


def sequence(name: str, prompt_tokens: int, max_tokens: int) -> Sequence:
    request = GenerationRequest(model="m", prompt="x", max_tokens=max_tokens)
    return Sequence(name.encode(), request, [0] * prompt_tokens, max_tokens, detokenizer=None,
                    stop_matcher=StopMatcher(()))


def test_admits_up_to_max_batch_and_decodes_everyone():
    scheduler = Scheduler(SchedulerLimits(max_batch=2, max_batch_tokens=10_000, max_prefill_tokens=10_000))
    a, b, c = sequence("a", 5, 5), sequence("b", 5, 5), sequence("c", 5, 5)
    for s in (a, b, c):
        scheduler.add(s)
    plan = scheduler.schedule()
    assert plan.prefill == [a, b] and plan.decode == [a, b]
    plan = scheduler.schedule()
    assert plan.prefill == [] and plan.decode == [a, b]
    scheduler.remove(a)  # finished: its place goes to the next in line
    plan = scheduler.schedule()
    assert plan.prefill == [c] and plan.decode == [b, c]


def test_cache_budget_holds_back_until_room():
    scheduler = Scheduler(SchedulerLimits(max_batch=8, max_batch_tokens=100, max_prefill_tokens=10_000))
    a, b = sequence("a", 10, 60), sequence("b", 10, 60)
    scheduler.add(a)
    scheduler.add(b)
    assert scheduler.schedule().prefill == [a]
    assert scheduler.schedule().prefill == []
    scheduler.remove(a)
    assert scheduler.schedule().prefill == [b]


def test_cache_budget_counts_the_padded_block():
    # One long reservation makes every row as long: 3 rows x 60 > 150, although 60 + 10 + 10 fits.
    scheduler = Scheduler(SchedulerLimits(max_batch=8, max_batch_tokens=150, max_prefill_tokens=10_000))
    long, short1, short2 = sequence("long", 20, 40), sequence("s1", 5, 5), sequence("s2", 5, 5)
    for s in (long, short1, short2):
        scheduler.add(s)
    assert scheduler.schedule().prefill == [long, short1]
    assert scheduler.schedule().prefill == []
    scheduler.remove(long)
    assert scheduler.schedule().prefill == [short2]


def test_oversized_request_still_runs_alone():
    scheduler = Scheduler(SchedulerLimits(max_batch=8, max_batch_tokens=10, max_prefill_tokens=100))
    big, small = sequence("big", 50, 50), sequence("small", 1, 1)
    scheduler.add(big)
    scheduler.add(small)
    assert scheduler.schedule().prefill == [big]
    assert scheduler.schedule().prefill == []


def test_a_long_prompt_is_prefilled_in_chunks_while_the_batch_decodes():
    scheduler = Scheduler(SchedulerLimits(max_batch=8, max_batch_tokens=10_000, max_prefill_tokens=40))
    running, long, after = sequence("run", 5, 50), sequence("long", 100, 10), sequence("after", 5, 5)
    scheduler.add(running)
    scheduler.schedule()
    scheduler.add(long)
    scheduler.add(after)
    chunks = []
    for _ in range(3):
        plan = scheduler.schedule()
        assert plan.prefill == [] and plan.chunk.sequence is long
        chunks.append((plan.chunk.start, plan.chunk.end))
        assert plan.decode[0] is running  # the running sequence never waits a step
    assert chunks == [(0, 40), (40, 80), (80, 100)]
    assert plan.chunk.last and plan.decode == [running, long]  # it joins with its last chunk
    assert scheduler.find(b"long") is long
    plan = scheduler.schedule()
    assert plan.chunk is None and plan.prefill == [after] and plan.decode == [running, long, after]


def test_removing_the_sequence_being_chunked():
    scheduler = Scheduler(SchedulerLimits(max_batch=8, max_batch_tokens=10_000, max_prefill_tokens=10))
    long = sequence("long", 30, 1)
    scheduler.add(long)
    assert scheduler.schedule().chunk.end == 10
    assert scheduler.find(b"long") is long and scheduler.has_work
    scheduler.remove(long)
    assert not scheduler.has_work and scheduler.schedule().empty


def test_prefill_budget_splits_prompts_over_steps():
    scheduler = Scheduler(SchedulerLimits(max_batch=8, max_batch_tokens=10_000, max_prefill_tokens=100))
    seqs = [sequence(str(i), 40, 4) for i in range(3)]
    for s in seqs:
        scheduler.add(s)
    assert scheduler.schedule().prefill == seqs[:2]  # 3 x 40 padded tokens would exceed 100
    plan = scheduler.schedule()
    assert plan.prefill == seqs[2:] and plan.decode == seqs


def test_find_and_remove_waiting():
    scheduler = Scheduler(SchedulerLimits(max_batch=1, max_batch_tokens=10_000, max_prefill_tokens=10_000))
    a, b = sequence("a", 1, 1), sequence("b", 1, 1)
    scheduler.add(a)
    scheduler.add(b)
    scheduler.schedule()
    assert scheduler.find(b"b") is b
    scheduler.remove(b)
    assert scheduler.find(b"b") is None and scheduler.waiting == type(scheduler.waiting)()
    assert scheduler.has_work
