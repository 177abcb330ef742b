"""The scheduler's policy, driven without torch."""

from broker.protocol import GenerationRequest
from worker.scheduler import Plan, Scheduler, SchedulerLimits
from worker.sequence import Sequence
from worker.text import StopMatcher


def sequence(name: str, prompt_tokens: int, max_tokens: int) -> Sequence:
    request = GenerationRequest(model="m", prompt="x", max_tokens=max_tokens)
    return Sequence(name.encode(), request, [0] * prompt_tokens, max_tokens, detokenizer=None,
                    stop_matcher=StopMatcher(()))


def step(scheduler: Scheduler) -> Plan:
    """What the engine does with a plan: the prompts run, then those ready join the batch."""
    plan = scheduler.schedule()
    scheduler.join(plan.ready)
    return plan


def test_admits_up_to_max_batch_and_decodes_everyone():
    scheduler = Scheduler(SchedulerLimits(max_batch=2, max_batch_tokens=10_000, max_prefill_tokens=10_000))
    a, b, c = sequence("a", 5, 5), sequence("b", 5, 5), sequence("c", 5, 5)
    for s in (a, b, c):
        scheduler.add(s)
    plan = step(scheduler)
    assert plan.prefill == [a, b] and scheduler.running == [a, b]
    plan = step(scheduler)
    assert plan.prefill == [] and scheduler.running == [a, b]
    scheduler.remove(a)  # finished: its place goes to the next in line
    plan = step(scheduler)
    assert plan.prefill == [c] and scheduler.running == [b, c]


def test_cache_budget_holds_back_until_room():
    scheduler = Scheduler(SchedulerLimits(max_batch=8, max_batch_tokens=100, max_prefill_tokens=10_000))
    a, b = sequence("a", 10, 60), sequence("b", 10, 60)
    scheduler.add(a)
    scheduler.add(b)
    assert step(scheduler).prefill == [a]
    assert step(scheduler).prefill == []
    scheduler.remove(a)
    assert step(scheduler).prefill == [b]


def test_cache_budget_counts_the_padded_block():
    # One long reservation makes every row as long: 3 rows x 60 > 150, although 60 + 10 + 10 fits.
    scheduler = Scheduler(SchedulerLimits(max_batch=8, max_batch_tokens=150, max_prefill_tokens=10_000))
    long, short1, short2 = sequence("long", 20, 40), sequence("s1", 5, 5), sequence("s2", 5, 5)
    for s in (long, short1, short2):
        scheduler.add(s)
    assert step(scheduler).prefill == [long, short1]
    assert step(scheduler).prefill == []
    scheduler.remove(long)
    assert step(scheduler).prefill == [short2]


def test_oversized_request_still_runs_alone():
    scheduler = Scheduler(SchedulerLimits(max_batch=8, max_batch_tokens=10, max_prefill_tokens=100))
    big, small = sequence("big", 50, 50), sequence("small", 1, 1)
    scheduler.add(big)
    scheduler.add(small)
    assert step(scheduler).prefill == [big]
    assert step(scheduler).prefill == []


def test_a_long_prompt_is_prefilled_in_chunks_while_the_batch_decodes():
    scheduler = Scheduler(SchedulerLimits(max_batch=8, max_batch_tokens=10_000, max_prefill_tokens=40))
    running, long, after = sequence("run", 5, 50), sequence("long", 100, 10), sequence("after", 5, 5)
    scheduler.add(running)
    step(scheduler)
    scheduler.add(long)
    scheduler.add(after)
    chunks = []
    for _ in range(3):
        plan = step(scheduler)
        assert plan.prefill == [] and plan.chunk.sequence is long
        chunks.append((plan.chunk.start, plan.chunk.end))
        assert scheduler.running[0] is running  # the running sequence never waits a step
    assert chunks == [(0, 40), (40, 80), (80, 100)]
    assert plan.chunk.last and scheduler.running == [running, long]  # it joins with its last chunk
    assert scheduler.find(b"long") is long
    plan = step(scheduler)
    assert plan.chunk is None and plan.prefill == [after] and scheduler.running == [running, long, after]


def test_removing_the_sequence_being_chunked():
    scheduler = Scheduler(SchedulerLimits(max_batch=8, max_batch_tokens=10_000, max_prefill_tokens=10))
    long = sequence("long", 30, 1)
    scheduler.add(long)
    assert step(scheduler).chunk.end == 10
    assert scheduler.find(b"long") is long and scheduler.has_work
    scheduler.remove(long)
    assert not scheduler.has_work and step(scheduler) == Plan()


def test_prefill_budget_splits_prompts_over_steps():
    scheduler = Scheduler(SchedulerLimits(max_batch=8, max_batch_tokens=10_000, max_prefill_tokens=100))
    seqs = [sequence(str(i), 40, 4) for i in range(3)]
    for s in seqs:
        scheduler.add(s)
    assert step(scheduler).prefill == seqs[:2]  # 3 x 40 padded tokens would exceed 100
    plan = step(scheduler)
    assert plan.prefill == seqs[2:] and scheduler.running == seqs


def test_find_and_remove_waiting():
    scheduler = Scheduler(SchedulerLimits(max_batch=1, max_batch_tokens=10_000, max_prefill_tokens=10_000))
    a, b = sequence("a", 1, 1), sequence("b", 1, 1)
    scheduler.add(a)
    scheduler.add(b)
    step(scheduler)
    assert scheduler.find(b"b") is b
    scheduler.remove(b)
    assert scheduler.find(b"b") is None and scheduler.waiting == type(scheduler.waiting)()
    assert scheduler.has_work
