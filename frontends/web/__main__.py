"""python -m frontends.web: the browser chat."""

import logging
import os
import signal
import threading
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported: nothing leaves the machine

import gradio as gr  # noqa: E402

from broker.settings import load_settings  # noqa: E402
from frontends.web.app import THEME, build_app  # noqa: E402
from frontends.web.config import WebSettings  # noqa: E402
from frontends.web.drain import Drain  # noqa: E402

log = logging.getLogger("frontends.web")


def main() -> None:
    settings = load_settings(WebSettings)
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s web %(levelname)s %(message)s")
    drain = Drain()
    app = build_app(settings, drain)
    app.queue(default_concurrency_limit=settings.concurrency_limit)
    stopping = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stopping.set())
    # The page takes no files: Gradio's upload route, open before any login, must not fill the disk.
    # ssl_verify=False only for Gradio's check of itself at start, over loopback: the certificate may
    # come from a CA that only the clients trust.
    app.launch(server_name=settings.host, server_port=settings.port, share=settings.share, ssr_mode=False,
               show_error=True, theme=THEME, max_file_size="1kb", prevent_thread_lock=True,
               ssl_certfile=_path(settings.ssl_certfile), ssl_keyfile=_path(settings.ssl_keyfile),
               ssl_verify=settings.ssl_certfile is None)
    stopping.wait()
    drain.draining = True
    log.info("draining: %d replies streaming, up to %gs", drain.num_open, settings.drain_timeout)
    if not drain.wait_idle(settings.drain_timeout, lambda: _delivered(app)):
        log.warning("drain timeout: cutting %d replies", drain.num_open)
    app.close()
    log.info("stopped")


def _delivered(app: gr.Blocks) -> bool:
    """Whether every event has sent its last message to its page: Gradio's queue forgets an event's id
    only then, and closing before would replace that message with "Server stopped unexpectedly".
    Gradio 6 has no public view of this."""
    return not any(app._queue.pending_event_ids_session.values())


def _path(path: Path | None) -> str | None:
    return None if path is None else str(path)


if __name__ == "__main__":
    main()
