"""The bus client without asyncio: the asyncio client on an event loop thread of its own."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Iterator
from typing import Any

from broker import protocol
from broker.auth import CurveKeys
from frontends.client.bus import MAX_RESUMES, RECONNECT_TIMEOUT, BusClient
from frontends.client.errors import BrokerUnreachable, Cancelled
from frontends.client.stream import Completion, Stream


class LoopThread:
    """An asyncio event loop on a thread of its own, which other threads hand coroutines to."""

    def __init__(self, name: str) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=name, daemon=True)
        self._thread.start()
        self.stopped = False

    def submit(self, coroutine: Any) -> concurrent.futures.Future:
        if self.stopped:  # the loop is stopped: the coroutine would never run
            coroutine.close()
            raise BrokerUnreachable("the bus client is closed")
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop)

    def call(self, coroutine: Any) -> Any:
        """Run a coroutine on the loop and wait for its result."""
        future = self.submit(coroutine)
        try:
            return future.result()
        except KeyboardInterrupt:
            future.cancel()  # stop it on the loop too, or a request sent after the Ctrl-C runs for nobody
            raise

    def stop(self) -> None:
        self.stopped = True
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)


class SyncBusClient:
    """A blocking wrapper: the asyncio client runs on a private event loop thread."""

    def __init__(self, address: str, *, heartbeat_interval: float = protocol.HEARTBEAT_INTERVAL,
                 reconnect_timeout: float = RECONNECT_TIMEOUT, max_resumes: int = MAX_RESUMES,
                 curve: CurveKeys | None = None) -> None:
        self._loop = LoopThread("bus-client")
        self._client = BusClient(address, heartbeat_interval=heartbeat_interval, reconnect_timeout=reconnect_timeout,
                                 max_resumes=max_resumes, curve=curve)
        self._loop.call(self._client.start())

    def models(self) -> list[protocol.ModelInfo]:
        return self._loop.call(self._client.models())

    def workers(self) -> list[protocol.WorkerInfo]:
        return self._loop.call(self._client.workers())

    def chat(self, model: str, messages: list[dict[str, str]], **params: Any) -> SyncStream:
        return SyncStream(self._loop, self._loop.call(self._client.chat(model, messages, **params)))

    def complete(self, model: str, prompt: str, **params: Any) -> SyncStream:
        return SyncStream(self._loop, self._loop.call(self._client.complete(model, prompt, **params)))

    def embed(self, model: str, inputs: list[str] | list[list[int]],
              dimensions: int | None = None) -> protocol.Embeddings:
        return self._loop.call(self._client.embed(model, inputs, dimensions))

    def tokenize(self, model: str, **params: Any) -> protocol.Tokens:
        return self._loop.call(self._client.tokenize(model, **params))

    def detokenize(self, model: str, tokens: list[int]) -> str:
        return self._loop.call(self._client.detokenize(model, tokens))

    @property
    def open_streams(self) -> tuple[Stream, ...]:
        """The streams whose requests are still waited for."""
        async def read() -> tuple[Stream, ...]:
            return self._client.open_streams
        return self._loop.call(read())

    def close(self) -> None:
        """Cancel open streams and stop the loop thread; closing again does nothing, other calls raise."""
        if self._loop.stopped:
            return
        try:
            self._loop.call(self._client.close())
        finally:
            self._loop.stop()

    def __enter__(self) -> SyncBusClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SyncStream:
    """Blocking iteration over a `Stream`; `cancel()` may be called from the reading thread."""

    def __init__(self, loop: LoopThread, stream: Stream) -> None:
        self._loop = loop
        self.stream = stream
        self._waiting: concurrent.futures.Future | None = None

    def __iter__(self) -> Iterator[protocol.TokenDelta]:
        while True:
            self._waiting = self._loop.submit(self.stream.__anext__())
            while True:
                try:
                    # Short waits, so a KeyboardInterrupt is raised here promptly whatever the platform.
                    delta = self._waiting.result(timeout=0.2)
                    break
                except concurrent.futures.TimeoutError:
                    continue
                except (StopAsyncIteration, concurrent.futures.CancelledError, Cancelled):
                    return
            yield delta

    @property
    def done(self) -> protocol.Done | None:
        return self.stream.done

    def collect(self) -> Completion:
        return self._loop.call(self.stream.collect())

    def cancel(self) -> None:
        """Cancel on the bus; safe from a KeyboardInterrupt handler while iterating."""
        if self._waiting is not None:
            self._waiting.cancel()
        self._loop.call(self.stream.cancel())
