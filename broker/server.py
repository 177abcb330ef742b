"""The broker's I/O: one ROUTER socket and one loop of poll -> core -> send; the logic is in `core`."""

from __future__ import annotations

import logging
import threading
import time

import zmq

from broker import protocol, sockets
from broker.config import BrokerSettings
from broker.core import BrokerCore, Outgoing

log = logging.getLogger(__name__)

_MAX_POLL_WAIT = 0.1  # seconds: time-outs are checked at least this often
_MAX_BATCH = 10_000  # messages read before the core's clock runs again


class BrokerServer:
    """Feeds what the socket receives, and the time, to a `BrokerCore`, and sends what it answers."""

    def __init__(self, settings: BrokerSettings, context: zmq.Context | None = None) -> None:
        self.settings = settings
        self._socket = sockets.router(context or zmq.Context.instance())
        self.core: BrokerCore | None = None
        self.stopping = threading.Event()

    def bind(self) -> None:
        self._socket.bind(self.settings.bind)
        self.core = BrokerCore(self.settings, time.monotonic())
        log.info("broker listening on %s", self.settings.bind)

    def run(self) -> None:
        """Serve until `stopping` is set."""
        assert self.core is not None, "bind() first"
        poller = zmq.Poller()
        poller.register(self._socket, zmq.POLLIN)
        while not self.stopping.is_set():
            wait = max(0.0, min(self.core.next_tick - time.monotonic(), _MAX_POLL_WAIT))
            if poller.poll(wait * 1000):
                self._drain()
            try:
                self._send(self.core.tick(time.monotonic()))
            except Exception:  # a bug must never stop the loop
                log.exception("housekeeping failed")
        self._socket.close(linger=0)

    def _drain(self) -> None:
        for _ in range(_MAX_BATCH):  # bounded, so time-outs and heartbeats still get their turn
            try:
                identity, *frames = self._socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                self._send(self.core.receive(identity, frames, time.monotonic()))
            except Exception:  # even answering a bad message went wrong: drop it, keep serving
                log.exception("failed to answer a message from %s", identity.hex())

    def _send(self, messages: list[Outgoing]) -> None:
        """Send each message; a peer found unreachable is reported to the core, whose answer is sent too."""
        unreachable: set[bytes] = set()
        pending = list(messages)
        while pending:
            message = pending.pop(0)
            if message.identity in unreachable:
                continue
            frames = protocol.encode(message.command, message.request_id, message.body)
            try:
                self._socket.send_multipart([message.identity, *frames], zmq.NOBLOCK)
            except zmq.ZMQError as exc:  # EHOSTUNREACH: the peer is gone; EAGAIN: it stopped reading
                log.info("peer %s unreachable (%s)", message.identity.hex(), exc.strerror)
                unreachable.add(message.identity)
                pending += self.core.unreachable(message.identity, time.monotonic())
