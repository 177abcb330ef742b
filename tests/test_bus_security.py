"""CURVE on the bus: a real broker with a key folder, peers with and without keys, roles enforced."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq

from broker import protocol, sockets
from broker.auth import CurveKeys
from broker.protocol import Command
from tests.processes import ROOT, free_address, free_port, start_broker, stop

REPLY_WAIT_MS = 3000  # a refused connection never answers: how long to wait before saying so


def keys_command(keys_dir: Path, *args: str) -> str:
    result = subprocess.run([sys.executable, "-m", "broker.keys", "--dir", str(keys_dir), *args], cwd=ROOT,
                            capture_output=True, text=True, check=True)
    return result.stdout


@pytest.fixture
def keys_dir(tmp_path) -> Path:
    keys = tmp_path / "keys"
    keys_command(keys, "init")
    keys_command(keys, "new", "worker-host", "--role", "worker")
    keys_command(keys, "new", "api-host", "--role", "client")
    return keys


def peer_keys(keys_dir: Path, name: str) -> CurveKeys:
    return CurveKeys.load(keys_dir / "issued" / f"{name}.key_secret", keys_dir / "broker.key")


class Peer:
    """A raw DEALER speaking the protocol, with or without CURVE keys."""

    def __init__(self, address: str, curve: CurveKeys | None) -> None:
        self.socket = sockets.dealer(zmq.Context.instance(), address, curve=curve)

    def send(self, command: Command, request_id: bytes = b"", fields: dict | None = None) -> None:
        self.socket.send_multipart(protocol.encode(command, request_id, fields))

    def receive(self) -> protocol.Message | None:
        """The next message, or None when nothing comes (the connection was refused)."""
        if not self.socket.poll(REPLY_WAIT_MS):
            return None
        return protocol.decode(self.socket.recv_multipart())

    def ask(self, command: Command, fields: dict | None = None) -> protocol.Message | None:
        """Send and wait for the answer; None when nothing could be sent or nothing came."""
        if not self.socket.poll(REPLY_WAIT_MS, zmq.POLLOUT):  # a refused connection may leave no way out
            return None
        try:
            self.socket.send_multipart(protocol.encode(command, os.urandom(16), fields), zmq.NOBLOCK)
        except zmq.Again:
            return None
        return self.receive()

    def close(self) -> None:
        self.socket.close(linger=0)


@pytest.fixture
def secure_broker(keys_dir) -> Iterator[str]:
    address = free_address()
    process = start_broker(address, "--keys-dir", str(keys_dir))
    yield address
    stop(process)


def ready_fields(name: str) -> dict:
    return protocol.Ready(name, ("m",), 1).to_fields()


def served(peer: Peer) -> list[str]:
    reply = peer.ask(Command.LIST_MODELS)
    assert reply is not None and reply.command is Command.MODELS
    return [m.name for m in protocol.parse_model_list(reply.fields())]


def wait_served(peer: Peer, models: list[str]) -> None:
    """Until the broker lists `models` (another peer's READY may still be on its way)."""
    deadline = time.monotonic() + 20
    while served(peer) != models:
        assert time.monotonic() < deadline, f"the broker never listed {models}"
        time.sleep(0.05)


def test_keys_command_makes_pairs_and_allowlists(keys_dir):
    assert (keys_dir / "broker.key_secret").exists() and (keys_dir / "broker.key").exists()
    assert (keys_dir / "workers" / "worker-host.key").exists() and (keys_dir / "clients" / "api-host.key").exists()
    assert "secret-key" not in (keys_dir / "workers" / "worker-host.key").read_text()  # only the public half
    assert keys_command(keys_dir, "list").split() == ["worker", "worker-host", "client", "api-host"]


def test_roles_are_enforced(secure_broker, keys_dir):
    worker = Peer(secure_broker, peer_keys(keys_dir, "worker-host"))
    client = Peer(secure_broker, peer_keys(keys_dir, "api-host"))
    try:
        assert served(client) == []
        # A client key may not announce itself as a worker (and so receive others' prompts) ...
        client.send(Command.READY, b"", ready_fields("impostor"))
        refusal = client.receive()
        assert refusal.command is Command.ERROR and refusal.fields()["code"] == "forbidden"
        assert served(client) == []
        # ... nor heartbeat as one; a worker key may announce and serve, but not send requests.
        client.send(Command.HEARTBEAT, b"", {"worker_id": "impostor"})
        assert client.receive().fields()["code"] == "forbidden"
        worker.send(Command.READY, b"", ready_fields("worker-host"))
        wait_served(client, ["m"])
        request_id = os.urandom(16)
        worker.send(Command.REQUEST, request_id, {"model": "m", "prompt": "hi"})
        refusal = worker.receive()
        assert (refusal.command, refusal.request_id, refusal.fields()["code"]) == (Command.ERROR, request_id, "forbidden")
        # The client's request reaches the worker, and the answer comes back.
        request_id = os.urandom(16)
        client.send(Command.REQUEST, request_id, {"model": "m", "prompt": "hi"})
        forwarded = worker.receive()
        while forwarded.command is Command.HEARTBEAT:
            forwarded = worker.receive()
        assert (forwarded.command, forwarded.request_id) == (Command.REQUEST, request_id)
        worker.send(Command.DONE, request_id, protocol.Done(protocol.FinishReason.STOP, 1, 0).to_fields())
        assert client.receive().command is Command.DONE
    finally:
        worker.close()
        client.close()


def test_peers_without_an_allowed_key_get_nothing(secure_broker, tmp_path, keys_dir):
    stranger_dir = tmp_path / "stranger"
    keys_command(stranger_dir, "init")
    keys_command(stranger_dir, "new", "stranger", "--role", "client")
    strangers = [Peer(secure_broker, CurveKeys.load(stranger_dir / "issued" / "stranger.key_secret",
                                                    keys_dir / "broker.key")),
                 Peer(secure_broker, None)]  # no CURVE at all
    try:
        for stranger in strangers:
            assert stranger.ask(Command.LIST_MODELS) is None
    finally:
        for stranger in strangers:
            stranger.close()


def test_keys_added_and_removed_take_effect_without_a_restart(secure_broker, keys_dir):
    keys_command(keys_dir, "new", "late-host", "--role", "client")
    late = Peer(secure_broker, peer_keys(keys_dir, "late-host"))
    try:
        deadline = time.monotonic() + 10
        while (reply := late.ask(Command.LIST_MODELS)) is None:  # the allowlist is read again within a second
            assert time.monotonic() < deadline, "a key added to the allowlist was never admitted"
        assert reply.command is Command.MODELS
        keys_command(keys_dir, "remove", "late-host")
        deadline = time.monotonic() + 10
        while (reply := late.ask(Command.LIST_MODELS)).command is Command.MODELS:
            assert time.monotonic() < deadline, "a removed key kept its access"
            time.sleep(0.2)
        assert reply.fields()["code"] == "forbidden"
    finally:
        late.close()
    newcomer = Peer(secure_broker, peer_keys(keys_dir, "late-host"))
    try:
        assert newcomer.ask(Command.LIST_MODELS) is None  # and no new connection gets in with it
    finally:
        newcomer.close()


def test_a_broker_refuses_to_open_an_unauthenticated_bus_to_the_network():
    address = f"tcp://0.0.0.0:{free_port()}"
    refused = subprocess.run([sys.executable, "-m", "broker", "--bind", address, "--metrics-port", "0"], cwd=ROOT,
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode != 0 and "--insecure" in refused.stderr and "CURVE" in refused.stderr
    process = start_broker(address, "--insecure")
    try:
        peer = Peer(address.replace("0.0.0.0", "127.0.0.1"), None)
        try:
            assert peer.ask(Command.LIST_MODELS).command is Command.MODELS
        finally:
            peer.close()
    finally:
        stop(process)


def test_the_broker_serves_its_metrics(keys_dir):
    address, port = free_address(), free_port()
    process = start_broker(address, "--keys-dir", str(keys_dir), "--metrics-port", str(port))
    worker = Peer(address, peer_keys(keys_dir, "worker-host"))
    client = Peer(address, peer_keys(keys_dir, "api-host"))
    try:
        worker.send(Command.READY, b"", ready_fields("worker-host"))
        wait_served(client, ["m"])
        client.send(Command.READY, b"", ready_fields("impostor"))
        client.receive()
        client.send(Command.REQUEST, os.urandom(16), {"model": "m", "prompt": "hi"})
        deadline = time.monotonic() + 20
        while True:
            text = _scrape(port)
            if 'tokenbus_broker_worker_in_flight{worker="worker-host"} 1.0' in text:
                break
            assert time.monotonic() < deadline, text
            time.sleep(0.2)
        assert 'tokenbus_broker_workers{model="m"} 1.0' in text
        assert 'tokenbus_broker_worker_capacity{worker="worker-host"} 1.0' in text
        assert "tokenbus_broker_refused_messages_total 1.0" in text
        assert 'tokenbus_broker_messages_sent_total{command="REQUEST"} 1.0' in text
        assert "tokenbus_broker_queue_wait_seconds_count 1.0" in text
    finally:
        worker.close()
        client.close()
        stop(process)


def _scrape(port: int) -> str:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            return response.read().decode()
    except OSError:
        return ""


def test_a_malformed_key_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.key_secret"
    bad.write_text("not a key\n")
    with pytest.raises((ValueError, OSError)):
        CurveKeys.load(bad, bad)


def test_the_raw_curve_client_from_the_protocol_page_works(secure_broker, keys_dir, tmp_path):
    """The page's CURVE example, run as written (only paths and address changed): pyzmq and msgpack."""
    worker = Peer(secure_broker, peer_keys(keys_dir, "worker-host"))
    client = Peer(secure_broker, peer_keys(keys_dir, "api-host"))
    try:
        worker.send(Command.READY, b"", ready_fields("worker-host"))
        wait_served(client, ["m"])
        page = (ROOT / "docs" / "protocol.md").read_text()
        example = page.split("## Security", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
        example = (example.replace('"api-host.key_secret"', repr(str(keys_dir / "issued" / "api-host.key_secret")))
                   .replace('"broker.key"', repr(str(keys_dir / "broker.key")))
                   .replace("tcp://broker.example:5555", secure_broker))
        output = subprocess.run([sys.executable, "-c", example], capture_output=True, text=True, timeout=60, cwd=tmp_path)
        assert output.returncode == 0, output.stderr
        assert "'name': 'm'" in output.stdout
    finally:
        worker.close()
        client.close()


async def test_a_real_worker_and_client_with_keys_serve_over_curve(secure_broker, keys_dir, tiny_model_dir):
    from frontends.client import BusClient
    from tests.helpers import TINY_MODEL
    from tests.processes import start_worker

    worker = start_worker(secure_broker, tiny_model_dir, "--model-names", TINY_MODEL,
                          "--curve-key", str(keys_dir / "issued" / "worker-host.key_secret"),
                          "--broker-key", str(keys_dir / "broker.key"))
    try:
        async with BusClient(secure_broker, curve=peer_keys(keys_dir, "api-host")) as client:
            deadline = time.monotonic() + 120
            while TINY_MODEL not in {m.name for m in await client.models()}:
                assert time.monotonic() < deadline and worker.poll() is None, "the worker never joined"
                await asyncio.sleep(0.2)
            stream = await client.chat(TINY_MODEL, [{"role": "user", "content": "Hello"}], max_tokens=5)
            completion = await stream.collect()
            assert completion.completion_tokens == 5 and completion.finish_reason.value == "length"
    finally:
        stop(worker)
