"""python -m broker: run the tokenbus broker."""

import logging
import signal

from broker.broker import Broker
from broker.config import BrokerSettings
from broker.settings import load_settings


def main() -> None:
    settings = load_settings(BrokerSettings)
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s broker %(levelname)s %(message)s")
    broker = Broker(settings)
    broker.bind()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: broker.stopping.set())
    broker.run()


if __name__ == "__main__":
    main()
