"""The web chat's options."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from broker.settings import DEFAULT_BROKER_ADDRESS, BusPeerSettings, cli_config
from frontends.http_server import HttpServerSettings


class WebSettings(BusPeerSettings, HttpServerSettings):
    model_config = cli_config("web", "python -m frontends.web")

    broker: str = Field(DEFAULT_BROKER_ADDRESS, description="ZeroMQ address of the broker")
    host: str = Field("127.0.0.1", description="address to listen on")
    port: int = Field(7860, ge=1, le=65535, description="port to listen on")
    auth_token: str | None = Field(None, min_length=1,
                                   description="access token asked for before chatting (none: open)")
    share: bool = Field(False, description="also publish through a Gradio share link (reaches the internet)")
    concurrency_limit: int = Field(32, ge=1, description="replies streamed at once, across all users")
    votes_file: Path = Field(Path("votes.jsonl"), description="JSON-lines file the side-by-side votes go to")
    log_level: str = Field("INFO", description="logging level")
