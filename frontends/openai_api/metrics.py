"""Prometheus metrics, in a registry of the app's own (so several apps can live in one process)."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128)


class ApiMetrics:
    """The app's collectors; each HTTP request records into them through its `RequestMetrics`."""

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

    def track(self, endpoint: str) -> RequestMetrics:
        """Start recording one HTTP request; the caller must `finish` it."""
        return RequestMetrics(self, endpoint)


class RequestMetrics:
    """What one HTTP request adds to the metrics, recorded in one place.

    The model label stays empty until a worker (or the broker's overload check) has answered for the
    model: a client's model string never becomes a label before it is known to be served.
    """

    def __init__(self, metrics: ApiMetrics, endpoint: str) -> None:
        self._metrics = metrics
        self._endpoint = endpoint
        self._started = time.monotonic()
        self.model = ""
        metrics.in_flight.labels(endpoint).inc()

    def served(self, model: str) -> None:
        """A worker answered for `model`."""
        self.model = model

    def overloaded(self, model: str) -> None:
        self.model = model
        self._metrics.overloaded.labels(model).inc()

    def tokens(self, prompt_tokens: int, completion_tokens: int) -> None:
        self._metrics.prompt_tokens.labels(self.model).inc(prompt_tokens)
        self._metrics.completion_tokens.labels(self.model).inc(completion_tokens)

    def first_token(self, model: str, seconds: float) -> None:
        self.model = model
        self._metrics.time_to_first_token.labels(model).observe(seconds)

    def finish(self, status: str) -> None:
        self._metrics.in_flight.labels(self._endpoint).dec()
        self._metrics.requests.labels(self._endpoint, self.model, status).inc()
        self._metrics.latency.labels(self._endpoint, self.model).observe(time.monotonic() - self._started)
