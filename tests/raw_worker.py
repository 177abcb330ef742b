"""A worker written from docs/protocol.md alone, played by the test: it answers only as told, so a
test can see exactly what the broker sends a worker (a CANCEL, say) and when."""

from __future__ import annotations

import queue
import threading

import zmq

from broker import protocol
from broker.protocol import Command, Message


class RawWorker:
    """Announces `model` (a name, or several) with `capacity`, heartbeats, and hands the test every
    message it receives."""

    def __init__(self, address: str, model: str | tuple[str, ...], capacity: int = 1) -> None:
        self.received: queue.Queue[Message] = queue.Queue()
        self._outbox: queue.Queue[list[bytes]] = queue.Queue()
        models = (model,) if isinstance(model, str) else model
        self._ready = protocol.Ready(f"raw-{models[0]}", models, capacity)
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(address,), daemon=True)
        self._thread.start()

    def send(self, command: Command, request_id: bytes, body: dict | None = None) -> None:
        self._outbox.put(protocol.encode(command, request_id, body))

    def send_frames(self, frames: list[bytes]) -> None:
        """Send frames as they are, malformed ones included."""
        self._outbox.put(frames)

    def next(self, command: Command, timeout: float = 30.0) -> Message:
        """The next message of this kind from the broker (others before it are skipped)."""
        while True:
            message = self.received.get(timeout=timeout)
            if message.command is command:
                return message

    def close(self) -> None:
        self._stopping.set()
        self._thread.join(10)

    def _run(self, address: str) -> None:
        socket = zmq.Context.instance().socket(zmq.DEALER)
        socket.setsockopt(zmq.LINGER, 0)
        socket.connect(address)
        socket.send_multipart(protocol.encode(Command.READY, b"", self._ready.to_fields()))
        heartbeat = protocol.encode(Command.HEARTBEAT, b"", {"worker_id": self._ready.worker_id})
        try:
            while not self._stopping.is_set():
                if socket.poll(100):
                    message = protocol.decode(socket.recv_multipart())
                    if message.command is not Command.HEARTBEAT:
                        self.received.put(message)
                while not self._outbox.empty():
                    socket.send_multipart(self._outbox.get())
                socket.send_multipart(heartbeat)  # often: the broker's interval may be short
        finally:
            socket.send_multipart(protocol.encode(Command.DISCONNECT))
            socket.close()
