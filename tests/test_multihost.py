"""The bus across hosts: a broker, two worker hosts and an API host, each in its own network
namespace, talking TCP with CURVE. Intruders are refused, a cut link loses only its host's
streams, and a restarted broker is found again."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import openai
import pytest
import zmq

from broker import protocol, sockets
from broker.auth import CurveKeys
from broker.protocol import Command
from tests import netns
from tests.helpers import TINY_MODEL
from tests.processes import ROOT, output_of, spawn, start_broker, start_worker, stop

reason = netns.unavailable_reason()
pytestmark = pytest.mark.skipif(reason is not None, reason=f"no network namespaces: {reason}")

BUS_PORT = 5555
API_PORT = 8000
METRICS_PORT = 9555
INTERVAL = protocol.HEARTBEAT_INTERVAL
LONG_ANSWER = 400  # tokens: streams still running when the link is cut
NO_EARLY_END = {"ignore_eos": True}  # random weights may sample an end token: every answer runs to its length
T = TypeVar("T")


def keys_command(keys_dir: Path, *args: str) -> None:
    subprocess.run([sys.executable, "-m", "broker.keys", "--dir", str(keys_dir), *args], cwd=ROOT,
                   capture_output=True, text=True, check=True)


def wait_until(condition: Callable[[], Any], what: str, timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    while not (result := condition()):
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.1)
    return result


class BusProbe:
    """A raw client DEALER on the API host, asking the broker which workers it has.

    Its ZeroMQ context is made on the host's thread, so the context's I/O thread lives there too."""

    def __init__(self, host: netns.Host, address: str, curve: CurveKeys) -> None:
        self.thread = host.threads()
        self.address, self.curve = address, curve
        self.context: zmq.Context | None = None

    def workers(self) -> dict[str, protocol.WorkerInfo]:
        """Worker id -> what the broker says of it; empty while the broker does not answer."""
        return self.thread.submit(self._workers).result()

    def _workers(self) -> dict[str, protocol.WorkerInfo]:
        self.context = self.context or zmq.Context()
        dealer = sockets.dealer(self.context, self.address, curve=self.curve)
        try:
            dealer.send_multipart(protocol.encode(Command.LIST_WORKERS, os.urandom(16)))
            if not dealer.poll(2000):
                return {}
            reply = protocol.decode(dealer.recv_multipart())
            return {w.worker_id: w for w in protocol.parse_worker_list(reply.fields())}
        finally:
            dealer.close(linger=0)

    def close(self) -> None:
        self.thread.submit(lambda: self.context and self.context.term()).result()
        self.thread.shutdown()


@dataclass
class Fleet:
    """The processes on each host, and how to reach them from the API host."""

    network: netns.Network
    keys: Path
    stranger_key: Path  # a worker key pair the broker never saw
    model_dir: Path
    hosts: dict[str, netns.Host]
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)
    probe: BusProbe | None = None
    api_threads: ThreadPoolExecutor | None = None

    @property
    def bus(self) -> str:
        return f"tcp://{self.hosts['broker'].address}:{BUS_PORT}"

    def peer_keys(self, name: str) -> tuple[str, ...]:
        return ("--curve-key", str(self.keys / "issued" / f"{name}.key_secret"),
                "--broker-key", str(self.keys / "broker.key"))

    def start_broker(self) -> None:
        host = self.hosts["broker"]
        self.processes["broker"] = start_broker(self.bus, "--keys-dir", str(self.keys),
                                                "--metrics-port", str(METRICS_PORT), wrapper=host.run_command)

    def start_worker(self, name: str, host: str, *key_args: str) -> subprocess.Popen:
        process = start_worker(self.bus, self.model_dir, "--model-names", TINY_MODEL, "--max-batch", "4",
                               "--threads", "1", *key_args, wrapper=self.hosts[host].run_command)
        self.processes[name] = process
        return process

    def worker_id(self, name: str) -> str:
        return f"{os.uname().nodename}-{self.processes[name].pid}"

    def served(self) -> dict[str, int]:
        """Requests served so far by each legitimate worker the broker lists now."""
        workers = self.probe.workers()
        return {name: workers[self.worker_id(name)].served for name in ("worker-1", "worker-2")
                if self.worker_id(name) in workers}

    def wait_for_both_workers(self) -> None:
        wait_until(lambda: len(self.served()) == 2, "both worker hosts are registered", timeout=120)

    def on_api_host(self, call: Callable[..., T], *args: Any) -> Future[T]:
        return self.api_threads.submit(call, *args)

    def openai_client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"http://{self.hosts['api'].address}:{API_PORT}/v1", api_key="unused",
                             max_retries=0, timeout=120)

    def scrape_broker_metrics(self) -> str:
        def scrape() -> str:
            with urllib.request.urlopen(f"http://127.0.0.1:{METRICS_PORT}/metrics", timeout=5) as response:
                return response.read().decode()
        with self.hosts["broker"].threads() as thread:
            return thread.submit(scrape).result()


@pytest.fixture(scope="module")
def fleet(tmp_path_factory, tiny_model_dir) -> Iterator[Fleet]:
    keys = tmp_path_factory.mktemp("fleet") / "keys"
    keys_command(keys, "init")
    for name, role in [("gpu-host-1", "worker"), ("gpu-host-2", "worker"), ("api-host", "client"),
                       ("intruder", "client")]:
        keys_command(keys, "new", name, "--role", role)
    strangers = tmp_path_factory.mktemp("strangers")
    keys_command(strangers, "init")
    keys_command(strangers, "new", "stranger", "--role", "worker")

    network = netns.Network(f"tb{os.getpid() % 100_000}")
    fleet = None
    try:
        hosts = {name: network.add_host(name, octet) for name, octet in
                 [("broker", 1), ("gpu1", 11), ("gpu2", 12), ("api", 21), ("rogue", 31)]}
        fleet = Fleet(network, keys, strangers / "issued" / "stranger.key_secret", tiny_model_dir, hosts)
        fleet.start_broker()
        fleet.start_worker("worker-1", "gpu1", *fleet.peer_keys("gpu-host-1"))
        fleet.start_worker("worker-2", "gpu2", *fleet.peer_keys("gpu-host-2"))
        # Intruders on another host, trying all along: a stranger's key, a client's key, no keys at all.
        fleet.start_worker("unknown key", "rogue", "--curve-key", str(fleet.stranger_key),
                           "--broker-key", str(keys / "broker.key"))
        fleet.start_worker("client key", "rogue", *fleet.peer_keys("intruder"))
        fleet.start_worker("no CURVE", "rogue")
        fleet.processes["api"] = spawn("frontends.openai_api", "--broker", fleet.bus, "--host", hosts["api"].address,
                                       "--port", str(API_PORT), *fleet.peer_keys("api-host"), log_name="api",
                                       wrapper=hosts["api"].run_command)
        fleet.probe = BusProbe(hosts["api"], fleet.bus, CurveKeys.load(keys / "issued" / "api-host.key_secret",
                                                                       keys / "broker.key"))
        fleet.api_threads = hosts["api"].threads(8)
        fleet.wait_for_both_workers()
        wait_until(lambda: fleet.on_api_host(_models_answer, fleet).result(), "the API answers", timeout=120)
        yield fleet
    finally:
        if fleet is not None:
            for process in fleet.processes.values():  # all at once: each may take a moment to say goodbye
                if process.poll() is None:
                    process.terminate()
            for process in fleet.processes.values():
                stop(process)
            if fleet.probe is not None:
                fleet.probe.close()
            if fleet.api_threads is not None:
                fleet.api_threads.shutdown(cancel_futures=True)
        network.close()


def _models_answer(fleet: Fleet) -> bool:
    try:
        return TINY_MODEL in {m.id for m in fleet.openai_client().models.list()}
    except openai.APIError:
        return False


def ask(fleet: Fleet, max_tokens: int = 8) -> str:
    """One chat completion through the API host; its finish reason."""
    answer = fleet.openai_client().chat.completions.create(
        model=TINY_MODEL, messages=[{"role": "user", "content": "Hello"}], max_tokens=max_tokens,
        extra_body=NO_EARLY_END)
    return answer.choices[0].finish_reason


@dataclass
class StreamResult:
    first_token_at: float | None = None
    ended_at: float | None = None
    num_chunks: int = 0
    finish_reason: str | None = None
    error: str | None = None


def long_stream(fleet: Fleet, result: StreamResult) -> None:
    try:
        stream = fleet.openai_client().chat.completions.create(
            model=TINY_MODEL, messages=[{"role": "user", "content": "Tell me a long story"}],
            max_tokens=LONG_ANSWER, stream=True, extra_body=NO_EARLY_END)
        for chunk in stream:
            result.first_token_at = result.first_token_at or time.monotonic()
            result.num_chunks += 1
            if chunk.choices and chunk.choices[0].finish_reason:
                result.finish_reason = chunk.choices[0].finish_reason
    except openai.APIError as error:
        result.error = str(error)
    result.ended_at = time.monotonic()


def test_requests_from_the_api_host_are_served_on_both_worker_hosts(fleet):
    fleet.wait_for_both_workers()
    before = fleet.served()
    reasons = [future.result() for future in [fleet.on_api_host(ask, fleet) for _ in range(16)]]
    assert reasons == ["length"] * 16
    after = fleet.served()
    gained = {name: after[name] - before[name] for name in after}
    assert sum(gained.values()) == 16 and all(count > 0 for count in gained.values()), gained


def test_intruders_are_refused_counted_and_logged(fleet):
    """The intruders on the rogue host have been trying since the fleet started: each was refused,
    knows it, and got nothing of the traffic that went past them."""
    expected = {"unknown key": "refused this worker's CURVE key", "client key": "refused this worker: ",
                "no CURVE": "it requires CURVE keys"}
    for name, text in expected.items():
        wait_until(lambda n=name, t=text: t in output_of(fleet.processes[n]), f"the {name} worker reports its refusal",
                   timeout=120)
    before = fleet.served()
    assert [f.result() for f in [fleet.on_api_host(ask, fleet) for _ in range(12)]] == ["length"] * 12
    after = fleet.served()
    assert sum(after.values()) - sum(before.values()) == 12
    assert set(fleet.probe.workers()) == {fleet.worker_id("worker-1"), fleet.worker_id("worker-2")}
    assert all(fleet.processes[name].poll() is None for name in expected)  # refused, not crashed
    metrics = fleet.scrape_broker_metrics()
    assert _metric(metrics, "tokenbus_broker_refused_connections_total") >= 2  # unknown key, no CURVE
    assert _metric(metrics, "tokenbus_broker_refused_messages_total") >= 1  # READY under a client key
    broker_log = output_of(fleet.processes["broker"])
    assert "refused connections" in broker_log and "READY is not allowed for this key" in broker_log


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in the metrics")


def test_a_cut_link_costs_no_stream_and_the_worker_rejoins(fleet):
    fleet.wait_for_both_workers()
    results = [StreamResult() for _ in range(6)]
    futures = [fleet.on_api_host(long_stream, fleet, result) for result in results]
    wait_until(lambda: all(r.first_token_at for r in results) or any(r.ended_at for r in results),
               "every stream has its first token")
    on_cut_host = fleet.probe.workers()[fleet.worker_id("worker-1")].in_flight
    assert on_cut_host > 0 and not any(r.ended_at for r in results), "the streams must still be running"
    before = fleet.served()
    fleet.network.cut(fleet.hosts["gpu1"])
    try:
        for future in futures:
            future.result(timeout=120)
        # the streams cut with the link go on on the other host, from where they were cut
        assert [(r.error, r.finish_reason) for r in results] == [(None, "length")] * len(results)
        assert fleet.served()["worker-2"] - before["worker-2"] == on_cut_host
        # The other host keeps serving while the first is away.
        assert fleet.on_api_host(ask, fleet).result() == "length"
        assert set(fleet.served()) == {"worker-2"}
    finally:
        fleet.network.reconnect(fleet.hosts["gpu1"])
    fleet.wait_for_both_workers()  # by itself: nobody restarts it
    assert fleet.processes["worker-1"].poll() is None


def test_a_restarted_broker_is_found_again_by_every_host(fleet):
    fleet.wait_for_both_workers()
    broker = fleet.processes["broker"]
    broker.send_signal(signal.SIGKILL)
    broker.wait(10)
    fleet.start_broker()
    fleet.wait_for_both_workers()
    wait_until(lambda: fleet.on_api_host(_answered, fleet).result(), "the API answers through the new broker")
    before = fleet.served()
    assert [f.result() for f in [fleet.on_api_host(ask, fleet) for _ in range(8)]] == ["length"] * 8
    after = fleet.served()
    assert sum(after.values()) - sum(before.values()) == 8


def _answered(fleet: Fleet) -> bool:
    try:
        return ask(fleet) == "length"
    except openai.APIError:
        return False
