"""Prometheus metrics, in a registry of the app's own (so several apps can live in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128)


class ApiMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("tokenbus_api_requests", "Requests answered, by endpoint, model and HTTP status",
                                ["endpoint", "model", "status"], registry=self.registry)
        self.prompt_tokens = Counter("tokenbus_api_prompt_tokens", "Prompt tokens processed", ["model"],
                                     registry=self.registry)
        self.completion_tokens = Counter("tokenbus_api_completion_tokens", "Tokens generated", ["model"],
                                         registry=self.registry)
        self.time_to_first_token = Histogram("tokenbus_api_time_to_first_token_seconds",
                                             "Seconds from request to its first token", ["model"],
                                             buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.latency = Histogram("tokenbus_api_request_latency_seconds", "Seconds from request to its last byte",
                                 ["endpoint", "model"], buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.in_flight = Gauge("tokenbus_api_requests_in_flight", "Requests being answered now", ["endpoint"],
                               registry=self.registry)
        self.overloaded = Counter("tokenbus_api_rejected_overloaded", "Requests rejected because the bus was full",
                                  ["model"], registry=self.registry)
