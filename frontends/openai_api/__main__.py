"""python -m frontends.openai_api: the OpenAI-compatible HTTP API."""

import asyncio
import ipaddress
import logging
import signal

from aiohttp import web

from broker.settings import load_settings
from frontends.openai_api.app import create_app
from frontends.openai_api.config import ApiSettings
from frontends.openai_api.drain import DRAIN

log = logging.getLogger("frontends.openai_api")

# Seconds for what is left once the drain is over: the last bytes of finished responses, then the
# handlers of requests that outlived the drain are cancelled.
_FINAL_SHUTDOWN_SECONDS = 2.0


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


async def serve(settings: ApiSettings) -> None:
    """Serve until SIGTERM or SIGINT, then drain: new requests get 503 while the open ones finish."""
    app = create_app(settings)
    # handler_cancellation: a client that disconnects cancels its handler, which cancels its bus requests.
    # aiohttp's own signal handling would close the listening socket at once; draining answers instead.
    runner = web.AppRunner(app, handle_signals=False, handler_cancellation=True, access_log=None,
                           shutdown_timeout=_FINAL_SHUTDOWN_SECONDS)
    await runner.setup()
    try:
        await web.TCPSite(runner, settings.host, settings.port, ssl_context=settings.server_context()).start()
        log.info("serving on %s://%s:%d", settings.scheme, settings.host, settings.port)
        stopping = asyncio.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            asyncio.get_running_loop().add_signal_handler(signum, stopping.set)
        await stopping.wait()
        drain = app[DRAIN]
        drain.start()
        log.info("draining: %d open requests, up to %gs", drain.num_open, settings.drain_timeout)
        if not await drain.wait_idle(settings.drain_timeout):
            log.warning("drain timeout: cutting %d open requests", drain.num_open)
    finally:
        await runner.cleanup()


def main() -> None:
    settings = load_settings(ApiSettings)
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s api %(levelname)s %(message)s")
    if not settings.api_keys and settings.keys_file is None and not _is_loopback(settings.host):
        log.warning("no API keys configured and listening on %s: anyone who can reach it can use it", settings.host)
    asyncio.run(serve(settings))
    log.info("stopped")


if __name__ == "__main__":
    main()
