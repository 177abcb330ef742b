"""Prometheus metrics, in a registry of the app's own (so several apps can live in one process).

Two families: `tokenbus_api_*` (by endpoint, and by API key name) and `tokenbus:*`, named and meant as
vLLM's `vllm:*` (by `model_name`), so dashboards made for vLLM read them with the prefix changed.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from broker.protocol import ModelInfo
from frontends.client import Stream

_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128)
# vLLM's buckets, so that quantiles compare
_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                 40.0, 80.0, 160.0, 640.0, 2560.0)
_ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
                80.0)
_E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
                480.0, 960.0, 1920.0, 7680.0)
VLLM_STYLE = "tokenbus:"


class ApiMetrics:
    """The app's collectors; each HTTP request records into them through its `RequestMetrics`."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("tokenbus_api_requests", "Requests answered, by endpoint, model and HTTP status",
                                ["endpoint", "model", "status"], registry=r)
        self.prompt_tokens = Counter("tokenbus_api_prompt_tokens", "Prompt tokens processed", ["model"], registry=r)
        self.completion_tokens = Counter("tokenbus_api_completion_tokens", "Tokens generated", ["model"], registry=r)
        self.time_to_first_token = Histogram("tokenbus_api_time_to_first_token_seconds",
                                             "Seconds from request to its first token", ["model"],
                                             buckets=_LATENCY_BUCKETS, registry=r)
        self.latency = Histogram("tokenbus_api_request_latency_seconds", "Seconds from request to its last byte",
                                 ["endpoint", "model"], buckets=_LATENCY_BUCKETS, registry=r)
        self.in_flight = Gauge("tokenbus_api_requests_in_flight", "Requests being answered now", ["endpoint"],
                               registry=r)
        self.overloaded = Counter("tokenbus_api_rejected_overloaded", "Requests rejected because the bus was full",
                                  ["model"], registry=r)
        # per API key, by its name: never its secret
        self.key_requests = Counter("tokenbus_api_key_requests", "Requests answered, by API key name", ["key"],
                                    registry=r)
        self.key_prompt_tokens = Counter("tokenbus_api_key_prompt_tokens", "Prompt tokens, by API key name",
                                         ["key"], registry=r)
        self.key_completion_tokens = Counter("tokenbus_api_key_completion_tokens", "Tokens generated, by API key "
                                             "name", ["key"], registry=r)
        self.key_errors = Counter("tokenbus_api_key_errors", "Requests answered with an error status, by API key "
                                  "name and status", ["key", "status"], registry=r)
        self.vllm = VllmStyleMetrics(r)

    def track(self, endpoint: str) -> RequestMetrics:
        """Start recording one HTTP request; the caller must `finish` it."""
        return RequestMetrics(self, endpoint)


class VllmStyleMetrics:
    """vLLM's metrics with vLLM's meaning, seen from the API: a request's times run from its arrival here."""

    def __init__(self, r: CollectorRegistry) -> None:
        labels = ["model_name"]
        self.running = Gauge(f"{VLLM_STYLE}num_requests_running", "Requests on workers now (the broker's in_flight)",
                             labels, registry=r)
        self.waiting = Gauge(f"{VLLM_STYLE}num_requests_waiting", "Requests queued for a worker (the broker's "
                             "queued)", labels, registry=r)
        self.time_to_first_token = Histogram(f"{VLLM_STYLE}time_to_first_token_seconds", "Time to first token",
                                             labels, buckets=_TTFT_BUCKETS, registry=r)
        self.inter_token_latency = Histogram(f"{VLLM_STYLE}inter_token_latency_seconds", "Time between two "
                                             "tokens of a request", labels, buckets=_ITL_BUCKETS, registry=r)
        self.e2e_latency = Histogram(f"{VLLM_STYLE}e2e_request_latency_seconds", "Time from arrival to the last "
                                     "token, for requests that finished", labels, buckets=_E2E_BUCKETS, registry=r)
        self.prompt_tokens = Counter(f"{VLLM_STYLE}prompt_tokens", "Prompt tokens of generations", labels,
                                     registry=r)
        self.generation_tokens = Counter(f"{VLLM_STYLE}generation_tokens", "Tokens generated", labels, registry=r)
        self.prefix_cache_queries = Counter(f"{VLLM_STYLE}prefix_cache_queries", "Prompt tokens looked up in the "
                                            "workers' prefix caches", labels, registry=r)
        self.prefix_cache_hits = Counter(f"{VLLM_STYLE}prefix_cache_hits", "Prompt tokens found in the workers' "
                                         "prefix caches", labels, registry=r)

    def set_models(self, infos: Iterable[ModelInfo] | None) -> None:
        """The broker's answer to LIST_MODELS (None: no answer, so no values rather than stale ones)."""
        self.running.clear()
        self.waiting.clear()
        for info in infos or ():
            self.running.labels(info.name).set(info.in_flight)
            self.waiting.labels(info.name).set(info.queued)


class RequestMetrics:
    """What one HTTP request adds to the metrics, recorded in one place.

    The model label stays empty until a worker (or the broker's overload check) has answered for the
    model: a client's model string never becomes a label before it is known to be served.
    """

    def __init__(self, metrics: ApiMetrics, endpoint: str) -> None:
        self._metrics = metrics
        self._endpoint = endpoint
        self._started = time.monotonic()
        self._generated = False  # a generation streamed tokens: its end-to-end latency counts
        self.model = ""
        self.key: str | None = None  # the name of the API key it came with, when the API has keys
        self.num_prompt_tokens = 0
        self.num_completion_tokens = 0
        metrics.in_flight.labels(endpoint).inc()

    def served(self, model: str) -> None:
        """A worker answered for `model`."""
        self.model = model

    def overloaded(self, model: str) -> None:
        self.model = model
        self._metrics.overloaded.labels(model).inc()

    def tokens(self, prompt_tokens: int, completion_tokens: int, cached_tokens: int | None = None) -> None:
        """A request's usage; `cached_tokens` for a generation (an embedding has no prefix cache)."""
        self.num_prompt_tokens += prompt_tokens
        self.num_completion_tokens += completion_tokens
        self._metrics.prompt_tokens.labels(self.model).inc(prompt_tokens)
        self._metrics.completion_tokens.labels(self.model).inc(completion_tokens)
        if cached_tokens is not None:
            vllm = self._metrics.vllm
            vllm.prompt_tokens.labels(self.model).inc(prompt_tokens)
            vllm.generation_tokens.labels(self.model).inc(completion_tokens)
            vllm.prefix_cache_queries.labels(self.model).inc(prompt_tokens)
            vllm.prefix_cache_hits.labels(self.model).inc(cached_tokens)

    def stream_ended(self, model: str, stream: Stream) -> None:
        """A generation's stream ended (finished, failed or cancelled): its token timings. One that
        ended without its DONE (the client left, or it failed) still counts the tokens it delivered,
        so that hanging up early does not spend less of a key's quota."""
        if stream.first_token_at is None:
            return
        if stream.done is None:
            self.num_completion_tokens += max(stream.num_delivered, 0)
        self.model = model
        self._generated = True
        seconds = stream.first_token_at - stream.started_at
        self._metrics.time_to_first_token.labels(model).observe(seconds)
        self._metrics.vllm.time_to_first_token.labels(model).observe(seconds)
        num_gaps = stream.num_delivered - 1
        if num_gaps > 0 and stream.last_token_at is not None:
            # Frames arrive here, not single steps: each gap is the mean one. Observed once per gap, the
            # histogram's sum and count are vLLM's (all gaps, summed and counted).
            gap = (stream.last_token_at - stream.first_token_at) / num_gaps
            histogram = self._metrics.vllm.inter_token_latency.labels(model)
            for _ in range(num_gaps):
                histogram.observe(gap)

    def finish(self, status: str) -> None:
        metrics = self._metrics
        seconds = time.monotonic() - self._started
        metrics.in_flight.labels(self._endpoint).dec()
        metrics.requests.labels(self._endpoint, self.model, status).inc()
        metrics.latency.labels(self._endpoint, self.model).observe(seconds)
        if self._generated and status == "200":
            metrics.vllm.e2e_latency.labels(self.model).observe(seconds)
        if self.key is not None:
            metrics.key_requests.labels(self.key).inc()
            metrics.key_prompt_tokens.labels(self.key).inc(self.num_prompt_tokens)
            metrics.key_completion_tokens.labels(self.key).inc(self.num_completion_tokens)
            if int(status) >= 400:
                metrics.key_errors.labels(self.key, status).inc()
