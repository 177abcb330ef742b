"""The OpenAI API server's options."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from broker.settings import DEFAULT_BROKER_ADDRESS, BusPeerSettings, cli_config
from frontends.http_server import HttpServerSettings


class ApiSettings(BusPeerSettings, HttpServerSettings):
    model_config = cli_config("api", "python -m frontends.openai_api")

    broker: str = Field(DEFAULT_BROKER_ADDRESS, description="ZeroMQ address of the broker")
    host: str = Field("127.0.0.1", description="address to listen on")
    port: int = Field(8000, ge=1, le=65535, description="port to listen on")
    api_keys: list[str] = Field([], description="accepted API keys, unnamed and unlimited (none, and no "
                                "--keys-file: the API is open)")
    keys_file: Path | None = Field(None, description="TOML file of named keys with quotas, read again when it "
                                   "changes (see the README)")
    cors_origins: list[str] = Field([], description="origins allowed by CORS ('*' for any)")
    max_body_bytes: int = Field(1 << 20, ge=1024, description="largest request body accepted")
    max_n: int = Field(16, ge=1, description="most choices in one request (n, times the prompts of a text completion)")
    log_level: str = Field("INFO", description="logging level")
    max_stored_responses: int = Field(1024, ge=0, description="finished Responses API responses kept for GET and "
                                      "previous_response_id, oldest dropped first (0: none)")
