"""Several bus streams read at once: what the API's `n` choices and the web page's side by side share."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Sequence
from typing import TypeVar

from broker.protocol import Done, TokenDelta
from frontends.client import BusError, Stream

log = logging.getLogger(__name__)

T = TypeVar("T")
Outcome = TokenDelta | Done | BusError  # what one bus stream produces, its ending included


class _Ended:
    """A source ran out (`error` None) or raised."""

    __slots__ = ("error",)

    def __init__(self, error: Exception | None) -> None:
        self.error = error


async def merged(sources: Sequence[AsyncIterator[T]]) -> AsyncIterator[tuple[int, T]]:
    """The items of several async iterators as they come, each with its source's index; ends when
    every source has. An exception in a source is raised here. Leaving early (or closing this
    generator) stops every source, so their `finally` blocks run (a bus stream is cancelled there)."""
    items: asyncio.Queue[tuple[int, T | _Ended]] = asyncio.Queue()

    async def pump(index: int, source: AsyncIterator[T]) -> None:
        try:
            async for item in source:
                items.put_nowait((index, item))
        except Exception as exc:  # handed to the reader, never lost in a task
            items.put_nowait((index, _Ended(exc)))
        else:
            items.put_nowait((index, _Ended(None)))

    tasks = [asyncio.create_task(pump(index, source)) for index, source in enumerate(sources)]
    try:
        running = len(tasks)
        while running:
            index, item = await items.get()
            if isinstance(item, _Ended):
                running -= 1
                if item.error is not None:
                    raise item.error
                continue
            yield index, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def outcomes(stream: Stream) -> AsyncIterator[Outcome]:
    """A bus stream as items: its deltas, then its `Done` or its error (never raised)."""
    try:
        async for delta in stream:
            yield delta
        assert stream.done is not None
        yield stream.done
    except BusError as error:
        yield error
    except Exception as exc:  # never leave a reader waiting for an ending that will not come
        log.exception("reading a bus stream failed")
        yield BusError(f"the stream failed: {exc}")


def merged_outcomes(streams: Sequence[Stream]) -> AsyncIterator[tuple[int, Outcome]]:
    """Several bus streams at once, as (stream index, outcome)."""
    return merged([outcomes(stream) for stream in streams])
