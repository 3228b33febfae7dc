"""Prometheus metrics of the server, created at start-up with their label sets, so every series exists at 0.

One process: a private registry, rendered as is. Several worker processes (``--workers N``): set
``PROMETHEUS_MULTIPROC_DIR`` to an empty, writable directory before start-up; every process then writes
its samples there and ``/metrics`` (whichever worker answers) aggregates all of them
(``MultiProcessCollector``). Gauges sum over live processes.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
STATUSES = ("200", "400", "401", "404", "408", "413", "422", "429", "499", "500", "503")
OTHER_ROUTE = "other"  # paths that match no route (label kept bounded)
CLIENT_CLOSED = 499  # the client left before its answer (nginx's code): not its error (400), nor ours (5xx)


def multiprocess_dir() -> str | None:
    return os.environ.get(MULTIPROC_ENV) or None


class Metrics:
    def __init__(self, routes: Iterable[str]):
        self.multiprocess = multiprocess_dir() is not None
        disable_created_metrics()  # no *_created series: half the output, no use to dashboards
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("sora_requests", "HTTP requests, by route template and status code",
                                ["route", "status"], registry=r)
        self.request_duration = Histogram("sora_request_duration_seconds",
                                          "Time from receiving a request to the end of its response, by route",
                                          ["route"], buckets=LATENCY_BUCKETS, registry=r)
        self.queue_duration = Histogram("sora_queue_duration_seconds",
                                        "Time a request waited in the micro-batcher before its forward pass",
                                        buckets=LATENCY_BUCKETS, registry=r)
        self.inference_duration = Histogram("sora_inference_duration_seconds",
                                            "Duration of one batched forward pass (with post-processing)",
                                            buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("sora_batch_size", "Texts per forward pass", buckets=BATCH_BUCKETS, registry=r)
        self.queue_depth = Gauge("sora_queue_depth", "Requests waiting for a forward pass",
                                 multiprocess_mode="livesum", registry=r)
        self.inflight = Gauge("sora_inflight_requests", "HTTP requests being handled",
                              multiprocess_mode="livesum", registry=r)
        self.model_info = Gauge("sora_model_info", "The model served (value 1), with its version, tasks and backend",
                                ["model", "version", "tasks", "backend"], multiprocess_mode="livemax", registry=r)
        self.routes = [*routes, OTHER_ROUTE]
        for route in self.routes:
            self.request_duration.labels(route)
            for status in STATUSES:
                self.requests.labels(route, status)

    def observe_request(self, route: str, status: int, seconds: float) -> None:
        self.requests.labels(route, str(status)).inc()
        self.request_duration.labels(route).observe(seconds)

    def set_model(self, model: str, version: str, tasks: list[str], backend: str) -> None:
        self.model_info.labels(model, version, ",".join(tasks), backend).set(1)

    def render(self) -> tuple[bytes, str]:
        if self.multiprocess:
            from prometheus_client import multiprocess

            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
            return generate_latest(registry), CONTENT_TYPE_LATEST
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    def process_exit(self) -> None:
        """Drop this process's live gauges (multi-process mode)."""
        if self.multiprocess:
            from prometheus_client import multiprocess

            multiprocess.mark_process_dead(os.getpid())
