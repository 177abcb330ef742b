"""python -m broker: run the tokenbus broker."""

import logging
import signal

from broker.config import BrokerSettings
from broker.server import BrokerServer, InsecureBind
from broker.settings import load_settings


def main() -> None:
    settings = load_settings(BrokerSettings)
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s broker %(levelname)s %(message)s")
    try:
        server = BrokerServer(settings)
    except InsecureBind as exc:
        raise SystemExit(f"broker: {exc}") from None
    server.bind()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: server.stopping.set())
    server.run()


if __name__ == "__main__":
    main()
