"""python -m frontends.web: the browser chat."""

import logging
import os

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
    app.launch(server_name=settings.host, server_port=settings.port, share=settings.share, ssr_mode=False,
               show_error=True, theme=THEME, max_file_size="1kb")


if __name__ == "__main__":
    main()
