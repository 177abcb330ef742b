"""The bus client every frontend uses: asyncio first, with a small synchronous wrapper.

    async with BusClient("tcp://127.0.0.1:5555") as bus:
        stream = await bus.chat("SmolLM2-135M-Instruct", [{"role": "user", "content": "Hi"}])
        async for delta in stream:
            print(delta.text, end="")
        print(stream.done.finish_reason)

Errors from the bus surface as subclasses of `BusError`.
"""

from frontends.client.bus import MAX_RESUMES, RECONNECT_TIMEOUT, BusClient
from frontends.client.errors import (
    BadRequest,
    BrokerUnreachable,
    BusError,
    Cancelled,
    ContextLengthExceeded,
    DeadlineExceeded,
    NoWorker,
    Overloaded,
    QueueTimeout,
    UnknownModel,
    WorkerLost,
    error_from,
)
from frontends.client.stream import BusRequest, Completion, Stream, StreamOwner
from frontends.client.sync import LoopThread, SyncBusClient, SyncStream

__all__ = [
    "MAX_RESUMES", "RECONNECT_TIMEOUT", "BadRequest", "BrokerUnreachable", "BusClient", "BusError", "BusRequest",
    "Cancelled", "Completion", "ContextLengthExceeded", "DeadlineExceeded", "LoopThread", "NoWorker", "Overloaded",
    "QueueTimeout", "Stream", "StreamOwner", "SyncBusClient", "SyncStream", "UnknownModel", "WorkerLost",
    "error_from",
]
