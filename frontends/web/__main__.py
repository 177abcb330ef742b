"""python -m frontends.web: the browser chat."""

import logging
import os
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported: nothing leaves the machine

from broker.settings import load_settings  # noqa: E402
from frontends.web.app import THEME, build_app  # noqa: E402
from frontends.web.config import WebSettings  # noqa: E402


def main() -> None:
    settings = load_settings(WebSettings)
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s web %(levelname)s %(message)s")
    app = build_app(settings)
    app.queue(default_concurrency_limit=settings.concurrency_limit)
    # The page takes no files: Gradio's upload route, open before any login, must not fill the disk.
    # ssl_verify=False only for Gradio's check of itself at start, over loopback: the certificate may
    # come from a CA that only the clients trust.
    app.launch(server_name=settings.host, server_port=settings.port, share=settings.share, ssr_mode=False,
               show_error=True, theme=THEME, max_file_size="1kb",
               ssl_certfile=_path(settings.ssl_certfile), ssl_keyfile=_path(settings.ssl_keyfile),
               ssl_verify=settings.ssl_certfile is None)


def _path(path: Path | None) -> str | None:
    return None if path is None else str(path)


if __name__ == "__main__":
    main()
