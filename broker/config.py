"""The broker's options."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings

from broker import protocol
from broker.settings import DEFAULT_BROKER_ADDRESS, cli_config


class BrokerSettings(BaseSettings):
    model_config = cli_config("broker", "python -m broker")

    bind: str = Field(DEFAULT_BROKER_ADDRESS, description="ZeroMQ address the ROUTER socket binds")
    heartbeat_interval: float = Field(protocol.HEARTBEAT_INTERVAL, gt=0, description="seconds between heartbeats")
    max_queue: int = Field(64, ge=0, description="requests per model that may wait when every worker is full")
    queue_timeout: float = Field(30.0, gt=0, description="seconds a request may wait in the queue")
    log_level: str = Field("INFO", description="logging level")
