"""Prometheus metrics, one registry per app so that several apps can live in one process."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                    30.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("rankd_requests", "HTTP requests by route and status",
                                ["route", "method", "status"], registry=self.registry)
        self.request_latency = Histogram("rankd_request_seconds", "HTTP request latency by route",
                                         ["route"], buckets=_LATENCY_BUCKETS,
                                         registry=self.registry)
        self.stage_latency = Histogram("rankd_stage_seconds",
                                       "Per-request latency of each stage (retrieve, rerank)",
                                       ["stage"], buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.batch_size = Histogram("rankd_batch_size", "Items per micro-batch, by stage",
                                    ["stage"], buckets=_BATCH_BUCKETS, registry=self.registry)
        self.batch_latency = Histogram("rankd_batch_seconds", "Time one micro-batch took, by stage",
                                       ["stage"], buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.queue_depth_gauge = Gauge("rankd_queue_depth", "Items waiting in a stage's queue",
                                 ["stage"], registry=self.registry)
        self.rerank_failures = Counter("rankd_rerank_failures",
                                       "Rerank calls that failed and fell back to retrieval order",
                                       ["reason"], registry=self.registry)
        self.memory_release_latency = Histogram(
            "rankd_memory_release_seconds",
            "Time the batch thread spent handing freed memory back to the OS, by stage",
            ["stage"], buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.overload_rejections = Counter("rankd_overload_rejections", "Requests refused with 429",
                                ["stage"], registry=self.registry)

    # BatchObserver
    def batch_ran(self, stage: str, size: int, seconds: float) -> None:
        self.batch_size.labels(stage).observe(size)
        self.batch_latency.labels(stage).observe(seconds)

    def queue_depth(self, stage: str, depth: int) -> None:
        self.queue_depth_gauge.labels(stage).set(depth)

    def rejected(self, stage: str) -> None:
        self.overload_rejections.labels(stage).inc()

    def memory_released(self, stage: str, seconds: float) -> None:
        self.memory_release_latency.labels(stage).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class MetricsMiddleware:
    """Counts requests by route template and status, and times them. Pure ASGI for low overhead."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", None) or "unmatched"
            self.metrics.requests.labels(path, scope["method"], str(status)).inc()
            self.metrics.request_latency.labels(path).observe(time.perf_counter() - started)
