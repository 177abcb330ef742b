"""The broker's Prometheus metrics, served on their own HTTP port by `prometheus-client`.

The broker loop refreshes a snapshot of the core's state; scrapes, on the HTTP server's thread,
read only that snapshot, so they never see the core half-way through a change.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from broker.core import BrokerCore

PREFIX = "tokenbus_broker"
_WAIT_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class BrokerMetrics:
    """Gauges and counters of the bus, read from a `BrokerCore`."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._lock = threading.Lock()
        self._families: list[Metric] = []
        self._queue_wait = Histogram(f"{PREFIX}_queue_wait_seconds", "Time requests waited for a free worker",
                                     buckets=_WAIT_BUCKETS, registry=self.registry)
        self.registry.register(self)

    def serve(self, host: str, port: int) -> None:
        start_http_server(port, addr=host, registry=self.registry)

    def refresh(self, core: BrokerCore, num_auth_refused: int) -> None:
        """Take a snapshot (called from the broker loop)."""
        for wait in core.stats.take_waits():
            self._queue_wait.observe(wait)
        workers = GaugeMetricFamily(f"{PREFIX}_workers", "Live workers per model", labels=["model"])
        queued = GaugeMetricFamily(f"{PREFIX}_queued_requests", "Requests waiting for a worker", labels=["model"])
        capacity = GaugeMetricFamily(f"{PREFIX}_worker_capacity", "Sequences a worker runs at once", labels=["worker"])
        in_flight = GaugeMetricFamily(f"{PREFIX}_worker_in_flight", "Requests on a worker now", labels=["worker"])
        draining = GaugeMetricFamily(f"{PREFIX}_worker_draining", "1 while a worker finishes its requests before "
                                     "leaving (it gets no new ones)", labels=["worker"])
        for model in sorted(core.workers.models()):
            workers.add_metric([model], len(core.workers.serving(model)))
            queued.add_metric([model], core.requests.num_queued(model))
        for worker in core.workers:
            capacity.add_metric([worker.ready.worker_id], worker.ready.capacity)
            in_flight.add_metric([worker.ready.worker_id], core.requests.num_on_worker(worker.identity))
            draining.add_metric([worker.ready.worker_id], int(worker.draining))
        sent = CounterMetricFamily(f"{PREFIX}_messages_sent", "Messages the broker sent, relayed ones included",
                                   labels=["command"])
        for command, count in sorted(core.stats.sent.items()):
            sent.add_metric([command], count)
        stats = core.stats
        families = [workers, queued, capacity, in_flight, draining, sent,
                    CounterMetricFamily(f"{PREFIX}_workers_lost", "Workers lost (silent, unreachable or restarted)",
                                        value=stats.num_workers_lost),
                    CounterMetricFamily(f"{PREFIX}_malformed_messages", "Malformed messages dropped",
                                        value=stats.num_malformed),
                    CounterMetricFamily(f"{PREFIX}_refused_messages", "Messages refused for their sender's role",
                                        value=stats.num_refused),
                    CounterMetricFamily(f"{PREFIX}_refused_connections", "Connections refused for an unknown key",
                                        value=num_auth_refused)]
        with self._lock:
            self._families = families

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            yield from self._families

    def describe(self) -> list[Metric]:
        return []  # collected on demand: nothing to check at registration
