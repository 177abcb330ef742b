"""A soak under faults: steady traffic from one bus client while a worker is killed, another frozen
past its liveness, and the broker killed and restarted. Nothing may be lost, hang or fail: a stream
cut after its first token is resumed elsewhere."""

from __future__ import annotations

import asyncio
import random
import signal
from collections import Counter
from dataclasses import dataclass
from subprocess import Popen

import pytest

from frontends.client import BusClient, BusError
from tests.helpers import HELLO, TINY_MODEL, wait_for_models, wait_until
from tests.processes import free_address, start_broker, start_worker, stop

MIN_REQUESTS = 240  # and more while the faults are still being staged
MAX_REQUESTS = 2000  # a bound, should staging a fault never finish
CONCURRENCY = 24
REQUEST_DEADLINE = 120.0  # seconds: a request still open after this counts as hung
PROGRESS_PER_FAULT = 30  # requests answered between faults, so each fault meets traffic


@dataclass
class Outcome:
    ok: bool
    had_token: bool  # a token had arrived when it ended
    reason: str  # "ok", or the error's type and message
    num_sends: int = 1  # more than one: the client sent it again after a fault
    num_resumes: int = 0  # of those, sent again after tokens had arrived: continued where it was cut


async def one_request(client: BusClient, rng: random.Random) -> Outcome:
    stream = None
    try:
        stream = await client.chat(TINY_MODEL, HELLO, max_tokens=rng.randint(16, 96))
        num_tokens = 0
        async for delta in stream:
            num_tokens += delta.num_tokens
        assert stream.done is not None and num_tokens == stream.done.completion_tokens, "tokens went missing"
        return Outcome(True, True, "ok", stream.num_sends, stream.num_resumes)
    except BusError as error:
        if stream is None:  # never sent
            return Outcome(False, False, f"{type(error).__name__}: {error.message}", 0)
        return Outcome(False, stream.first_token_at is not None, f"{type(error).__name__}: {error.message}",
                       stream.num_sends)


class Soak:
    """The processes, the traffic, and the faults staged against them."""

    def __init__(self, tiny_model_dir) -> None:
        self.address = free_address()
        self.model_dir = tiny_model_dir
        self.broker = start_broker(self.address)
        self.workers = [self.start_worker(), self.start_worker()]
        self.outcomes: list[Outcome] = []
        self.faults_done = False

    def start_worker(self) -> Popen:
        return start_worker(self.address, self.model_dir, "--model-names", TINY_MODEL)

    def stop_all(self) -> None:
        for process in [*self.workers, self.broker]:
            if process.poll() is None:
                process.send_signal(signal.SIGCONT)  # a frozen process cannot act on SIGTERM
            stop(process)

    async def traffic(self, client: BusClient) -> None:
        rng = random.Random(0)
        slots = asyncio.Semaphore(CONCURRENCY)
        tasks: list[asyncio.Task] = []

        async def run() -> None:
            try:
                self.outcomes.append(await asyncio.wait_for(one_request(client, rng), REQUEST_DEADLINE))
            except TimeoutError:
                self.outcomes.append(Outcome(False, False, "hung"))
            finally:
                slots.release()

        while len(tasks) < MAX_REQUESTS and (len(tasks) < MIN_REQUESTS or not self.faults_done):
            await slots.acquire()
            tasks.append(asyncio.create_task(run()))
        await asyncio.gather(*tasks)

    async def faults(self, client: BusClient) -> None:
        """Kill a worker (and start a replacement), freeze another past its liveness, restart the
        broker; each once traffic has moved on, and with the other worker live."""
        await self.progress()
        victim = self.workers.pop(0)
        victim.send_signal(signal.SIGKILL)
        victim.wait()
        self.workers.append(self.start_worker())
        await wait_until(lambda: self.num_live_workers(client, 2), timeout=120)

        await self.progress()
        frozen = self.workers[0]
        frozen.send_signal(signal.SIGSTOP)
        try:
            await wait_until(lambda: self.num_live_workers(client, 1), timeout=60)  # the broker gave up on it
        finally:
            frozen.send_signal(signal.SIGCONT)
        await wait_until(lambda: self.num_live_workers(client, 2), timeout=60)  # it comes back by itself

        await self.progress()
        self.broker.send_signal(signal.SIGKILL)
        self.broker.wait()
        self.broker = start_broker(self.address)
        self.faults_done = True

    async def progress(self) -> None:
        answered = len(self.outcomes)
        await wait_until(self.answered_since(answered), timeout=120)

    def answered_since(self, answered: int):
        async def moved_on() -> bool:
            return len(self.outcomes) >= answered + PROGRESS_PER_FAULT
        return moved_on

    @staticmethod
    async def num_live_workers(client: BusClient, count: int) -> bool:
        try:
            return len(await client.workers()) == count
        except BusError:  # the broker is restarting
            return False


@pytest.mark.timeout(600)
async def test_traffic_survives_worker_kill_worker_freeze_and_broker_restart(tiny_model_dir):
    soak = Soak(tiny_model_dir)
    try:
        await wait_for_models(soak.address, {TINY_MODEL})
        async with BusClient(soak.address) as client:
            await wait_until(lambda: Soak.num_live_workers(client, 2), timeout=120)
            await asyncio.gather(soak.traffic(client), soak.faults(client))
    finally:
        soak.stop_all()
    outcomes = soak.outcomes
    failures = Counter(o.reason.split(":")[0] for o in outcomes if not o.ok)
    print(f"\n{len(outcomes)} requests, {sum(o.ok for o in outcomes)} answered in full "
          f"({sum(o.ok and o.num_sends > 1 for o in outcomes)} after being sent again, "
          f"{sum(o.num_resumes > 0 for o in outcomes)} of them resumed mid-answer), failed: {dict(failures)}")
    assert not [o for o in outcomes if o.reason == "hung"], "a request never ended"
    assert not failures, [o.reason for o in outcomes if not o.ok][:5]
    assert sum(o.num_resumes > 0 for o in outcomes), "no stream was cut mid-answer: the faults missed the traffic"
