"""The broker's I/O: one ROUTER socket and one loop of poll -> core -> send; the logic is in `core`."""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict

import zmq
from zmq.utils.monitor import recv_monitor_message

from broker import protocol, sockets
from broker.auth import AllowList, BusAuthenticator, Role, broker_keys
from broker.config import BrokerSettings, is_local
from broker.core import EVERY_ROLE, BrokerCore
from broker.outbox import Outgoing
from broker.metrics import BrokerMetrics

log = logging.getLogger(__name__)

_MAX_POLL_WAIT = 0.1  # seconds: time-outs are checked at least this often
_MAX_BATCH = 10_000  # messages read before the core's clock runs again
_METRICS_REFRESH = 0.5  # seconds between snapshots for the metrics server
_HANDSHAKE_FAILURES = (zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                       | zmq.EVENT_HANDSHAKE_FAILED_AUTH)
_LOG_INTERVAL = 5.0  # seconds between warnings about refused connections
_MAX_BOUND_IDENTITIES = 100_000  # identity -> key bindings remembered (the oldest are forgotten first)


class InsecureBind(RuntimeError):
    """Binding a non-loopback address without CURVE keys and without `--insecure`."""


class BrokerServer:
    """Feeds what the socket receives, and the time, to a `BrokerCore`, and sends what it answers."""

    def __init__(self, settings: BrokerSettings, context: zmq.Context | None = None) -> None:
        if settings.keys_dir is None and not is_local(settings.bind) and not settings.insecure:
            raise InsecureBind(f"refusing to bind {settings.bind} without CURVE keys: anyone who reaches it could "
                               "serve or read every prompt. Make keys (python -m broker.keys) and pass --keys-dir, "
                               "or pass --insecure to open an unauthenticated bus on purpose")
        self.settings = settings
        context = context or zmq.Context.instance()
        self._auth: BusAuthenticator | None = None
        if settings.keys_dir is not None:
            self._auth = BusAuthenticator(context, AllowList(settings.keys_dir))
        self._socket = sockets.router(context, broker_keys(settings.keys_dir) if settings.keys_dir else None)
        # With keys, a routing identity belongs to the key that first used it: nobody takes over another's.
        self._owners: OrderedDict[bytes, str] = OrderedDict()
        # Handshakes that failed (unknown key, no CURVE, garbage): counted and logged here.
        self._monitor = self._socket.get_monitor_socket(_HANDSHAKE_FAILURES) if self._auth else None
        self.num_refused_connections = 0
        self._last_refusal_log = -float("inf")
        self.metrics = BrokerMetrics()
        self.core: BrokerCore | None = None
        self.stopping = threading.Event()

    def bind(self) -> None:
        self._socket.bind(self.settings.bind)
        self.core = BrokerCore(self.settings, time.monotonic())
        if self.settings.metrics_port:
            try:
                self.metrics.serve(self.settings.metrics_host, self.settings.metrics_port)
            except OSError as exc:  # the bus matters more than its metrics: serve on, loudly
                log.error("no metrics server on %s:%d: %s", self.settings.metrics_host, self.settings.metrics_port, exc)
        security = "CURVE, keys from " + str(self.settings.keys_dir) if self._auth else "no encryption"
        log.info("broker listening on %s (%s)", self.settings.bind, security)
        if self._auth is None and not is_local(self.settings.bind):
            log.warning("THE BUS IS OPEN: %s accepts any peer without keys (--insecure)", self.settings.bind)

    def run(self) -> None:
        """Serve until `stopping` is set."""
        assert self.core is not None, "bind() first"
        poller = zmq.Poller()
        poller.register(self._socket, zmq.POLLIN)
        if self._monitor is not None:
            poller.register(self._monitor, zmq.POLLIN)
        next_refresh = 0.0
        try:
            while not self.stopping.is_set():
                wait = max(0.0, min(self.core.next_tick - time.monotonic(), _MAX_POLL_WAIT))
                ready = dict(poller.poll(wait * 1000))
                if self._socket in ready:
                    self._drain()
                if self._monitor is not None and self._monitor in ready:
                    self._count_refusals()
                try:
                    now = time.monotonic()
                    self._send(self.core.tick(now))
                    if now >= next_refresh:
                        self.metrics.refresh(self.core, self.num_refused_connections)
                        next_refresh = now + _METRICS_REFRESH
                except Exception:  # a bug must never stop the loop
                    log.exception("housekeeping failed")
        finally:
            if self._monitor is not None:
                self._socket.disable_monitor()
                self._monitor.close(linger=0)
            self._socket.close(linger=0)
            if self._auth is not None:
                self._auth.stop()

    def _drain(self) -> None:
        for _ in range(_MAX_BATCH):  # bounded, so time-outs and heartbeats still get their turn
            try:
                # Frames carry the sender's key ("User-Id"); without keys, plain bytes are cheaper.
                received = self._socket.recv_multipart(zmq.NOBLOCK, copy=self._auth is None)
            except zmq.Again:
                return
            identity, *frames = received if self._auth is None else [frame.bytes for frame in received]
            try:
                roles = EVERY_ROLE if self._auth is None else self._roles(identity, received[-1])
                self._send(self.core.receive(identity, frames, time.monotonic(), roles))
            except Exception:  # even answering a bad message went wrong: drop it, keep serving
                log.exception("failed to answer a message from %s", identity.hex())

    def _count_refusals(self) -> None:
        while self._monitor.poll(0):
            event = recv_monitor_message(self._monitor)
            self.num_refused_connections += 1
            now = time.monotonic()
            if now - self._last_refusal_log > _LOG_INTERVAL:
                log.warning("refused connections: %d so far (the last: event %s, %s)", self.num_refused_connections,
                            event["event"], event["endpoint"].decode(errors="replace"))
                self._last_refusal_log = now

    def _roles(self, identity: bytes, frame: zmq.Frame) -> frozenset[Role]:
        """What the sender's key allows now (keys may have been removed since it connected)."""
        assert self._auth is not None
        key = frame.get("User-Id")
        owner = self._owners.setdefault(identity, key)
        self._owners.move_to_end(identity)
        if len(self._owners) > _MAX_BOUND_IDENTITIES:
            self._owners.popitem(last=False)
        if owner != key:
            return frozenset()  # another key's identity
        role = self._auth.allowlist.role_of(key.encode())
        return frozenset() if role is None else frozenset({role})

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
