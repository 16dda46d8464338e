"""Prometheus metrics, one registry per app so that several apps can live in one process."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

# Set in a request's scope state when its client disconnected before the answer
# (service/security.py's DisconnectMiddleware).
CLIENT_GONE = "rankd.client_gone"

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
                                       "Per-request latency of each stage: retrieve, rerank (/rank and /v1/rerank), answer",
                                       ["stage"], buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.batch_size = Histogram("rankd_batch_size", "Items per micro-batch, by stage",
                                    ["stage"], buckets=_BATCH_BUCKETS, registry=self.registry)
        self.batch_latency = Histogram("rankd_batch_seconds", "Time one micro-batch took, by stage",
                                       ["stage"], buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.queue_depth_gauge = Gauge("rankd_queue_depth", "Items waiting in a stage's queue, as of its last change",
                                 ["stage"], registry=self.registry)
        self.rerank_failures = Counter("rankd_rerank_failures",
                                       "Reranker calls that failed, by reason: /rank falls back to the retrieval order (or answers 503 with RANKD_RERANK_REQUIRED), /v1/rerank and /answer answer 503",
                                       ["reason"], registry=self.registry)
        self.memory_release_latency = Histogram(
            "rankd_memory_release_seconds",
            "Time the batch thread spent handing freed memory back to the OS, by stage",
            ["stage"], buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.rerank_agreement = Histogram(
            "rankd_rerank_agreement",
            "Reranked /rank queries: the Spearman agreement of the reranker's orders (near 1: it reads content; 0 or below: noise or positions)",
            buckets=(-0.5, 0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0),
            registry=self.registry)
        self.rerank_weight = Histogram(
            "rankd_rerank_weight", "Reranked /rank queries: the reranker's share of the fused score",
            buckets=(0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0),
            registry=self.registry)
        self.rerank_moved = Counter(
            "rankd_rerank_moved", "Reranked /rank queries by whether the reranker changed the retrieval order",
            ["moved"], registry=self.registry)
        self.truncated_documents = Counter(
            "rankd_truncated_documents",
            "/v1/rerank documents cut to fit the model's context (max_tokens_per_doc, then a fair share of the prompt)",
            registry=self.registry)
        self.overload_rejections = Counter("rankd_overload_rejections", "Submissions refused because a stage's queue was full (the request got 429), by stage",
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
    """Counts requests by route template and status, and times them. Pure ASGI for low overhead.

    It is the outermost middleware, so requests that the API key or the body limit refuse are
    counted too. Those never reach the router, and the documentation pages are plain Starlette
    routes that leave no ``route`` in the scope; their route is found by matching the path
    against ``routes()``, so that only paths no route matches count as ``unmatched``.
    """

    def __init__(self, app: ASGIApp, metrics: Metrics,
                 routes: Callable[[], Sequence[BaseRoute]]) -> None:
        self.app = app
        self.metrics = metrics
        self.routes = routes

    def _route_path(self, scope: Scope) -> str:
        route = scope.get("route")
        if route is not None and getattr(route, "path", None):
            return str(route.path)
        for candidate in self.routes():
            match, _ = candidate.matches(scope)
            if match is not Match.NONE:
                return str(getattr(candidate, "path", "unmatched"))
        return "unmatched"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status: int | None = None

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            if scope.get("state", {}).get(CLIENT_GONE):
                status = 499  # the client went away before its answer
            elif status is None:
                status = 500
            path = self._route_path(scope)
            self.metrics.requests.labels(path, scope["method"], str(status)).inc()
            self.metrics.request_latency.labels(path).observe(time.perf_counter() - started)
