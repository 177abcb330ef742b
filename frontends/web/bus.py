"""One bus client per event loop: ZeroMQ asyncio sockets belong to the loop that made them."""

from __future__ import annotations

import asyncio

from broker.auth import CurveKeys
from frontends.client import BusClient
from frontends.web.drain import Drain


class LoopLocalBus:
    """Hands each event loop its own started `BusClient`, made on first use in that loop; `drain`
    counts the replies streaming on them."""

    def __init__(self, address: str, curve: CurveKeys | None = None, drain: Drain | None = None) -> None:
        self.address = address
        self.curve = curve
        self.drain = drain or Drain()
        self._clients: dict[asyncio.AbstractEventLoop, BusClient] = {}

    async def get(self) -> BusClient:
        loop = asyncio.get_running_loop()
        client = self._clients.get(loop)
        if client is None:
            # Registered before starting so concurrent first calls share it; start() connects without waiting.
            client = self._clients[loop] = BusClient(self.address, curve=self.curve)
            await client.start()
        return client
