"""The broker's options."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from urllib.parse import urlsplit

from pydantic import Field
from pydantic_settings import BaseSettings

from broker import protocol
from broker.settings import DEFAULT_BROKER_ADDRESS, cli_config


class BrokerSettings(BaseSettings):
    model_config = cli_config("broker", "python -m broker")

    bind: str = Field(DEFAULT_BROKER_ADDRESS, description="ZeroMQ address the ROUTER socket binds")
    keys_dir: Path | None = Field(None, description="CURVE key folder (python -m broker.keys): the broker's key pair "
                                                    "and the allowed worker and client keys; none: no encryption")
    insecure: bool = Field(False, description="allow binding a non-loopback address without CURVE keys")
    heartbeat_interval: float = Field(protocol.HEARTBEAT_INTERVAL, gt=0, description="seconds between heartbeats")
    max_queue: int = Field(64, ge=0, description="requests per model that may wait when every worker is full")
    queue_timeout: float = Field(30.0, gt=0, description="seconds a request may wait in the queue")
    request_timeout: float | None = Field(None, gt=0, description="seconds a generation request may take, queue and "
                                          "generation together, when it sets no `timeout` of its own (none: no limit)")
    affinity_slack: int = Field(1, ge=0, description="a worker that likely holds a request's prefix gets it while it "
                                                      "runs at most this many more requests than the least busy one")
    metrics_host: str = Field("127.0.0.1", description="address of the Prometheus metrics HTTP server")
    metrics_port: int = Field(9555, ge=0, le=65535, description="its port; 0 = no metrics server")
    log_level: str = Field("INFO", description="logging level")


def is_local(address: str) -> bool:
    """Whether a ZeroMQ address can only be reached from this machine (ipc, inproc, loopback tcp)."""
    parts = urlsplit(address)
    if parts.scheme in ("ipc", "inproc"):
        return True
    host = parts.hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # "*", an interface name or a host name: reachable from elsewhere
        return False
