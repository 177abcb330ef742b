"""python -m frontends.openai_api: the OpenAI-compatible HTTP API."""

import ipaddress
import logging

from aiohttp import web

from broker.settings import load_settings
from frontends.openai_api.app import create_app
from frontends.openai_api.config import ApiSettings

log = logging.getLogger("frontends.openai_api")


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def main() -> None:
    settings = load_settings(ApiSettings)
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s api %(levelname)s %(message)s")
    if not settings.api_keys and settings.keys_file is None and not _is_loopback(settings.host):
        log.warning("no API keys configured and listening on %s: anyone who can reach it can use it", settings.host)
    # handler_cancellation: a client that disconnects cancels its handler, which cancels its bus requests
    web.run_app(create_app(settings), host=settings.host, port=settings.port, handler_cancellation=True,
                access_log=None, print=lambda line: log.info("%s", line))


if __name__ == "__main__":
    main()
