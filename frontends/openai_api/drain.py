"""Draining: after SIGTERM the API refuses new requests and waits for the open ones to finish."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from aiohttp import web

from frontends.openai_api.errors import ApiError

PROBE_PATHS = ("/health", "/ready", "/metrics")  # still answered while draining: they say how it goes


class Drain:
    """The requests open now, and whether the process has stopped taking new ones."""

    def __init__(self) -> None:
        self.draining = False
        self.num_open = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def start(self) -> None:
        self.draining = True

    def enter(self) -> None:
        self.num_open += 1
        self._idle.clear()

    def leave(self) -> None:
        self.num_open -= 1
        if self.num_open == 0:
            self._idle.set()

    async def wait_idle(self, timeout: float) -> bool:
        """Until no request is open (True), or `timeout` seconds (False)."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            return True
        except TimeoutError:
            return False


DRAIN = web.AppKey("drain", Drain)


@web.middleware
async def drain_middleware(request: web.Request,
                           handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
    """Counts open requests; while draining, a new one is 503 so a load balancer retries it elsewhere."""
    drain = request.app[DRAIN]
    if request.path in PROBE_PATHS:
        return await handler(request)
    if drain.draining:
        raise ApiError(503, "the server is shutting down; send the request again", type="service_unavailable",
                       code="draining")
    drain.enter()
    try:
        return await handler(request)
    finally:
        drain.leave()
