"""Draining the web chat: after SIGTERM no new reply starts, and the open ones finish first."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from frontends.client import BusError


class Draining(BusError):
    """Raised instead of starting a reply while the chat server shuts down; shown like a bus error."""


class Drain:
    """The replies streaming now, and whether new ones are refused. Replies run on Gradio's event
    loop; the main thread, which handles SIGTERM, only reads."""

    def __init__(self) -> None:
        self.draining = False
        self.num_open = 0

    @contextmanager
    def reply(self) -> Iterator[None]:
        if self.draining:
            raise Draining("the chat server is restarting")
        self.num_open += 1
        try:
            yield
        finally:
            self.num_open -= 1

    def wait_idle(self, timeout: float, delivered: Callable[[], bool]) -> bool:
        """Until no reply is open and `delivered()` says the page has the last of them (True), or
        `timeout` seconds (False). Polls: the replies live on another thread's event loop."""
        deadline = time.monotonic() + timeout
        while self.num_open or not delivered():
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.1)
        return True
