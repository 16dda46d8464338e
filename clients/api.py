"""What every client shares: the httpx client, the request body, retries and /metrics parsing."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import random
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import urlsplit

import httpx

DEFAULT_URL = "http://127.0.0.1:8000"
# Statuses that mean "not now" rather than "never": the service's 429 (queue full) and 503
# (not ready, reranker down). Both carry Retry-After.
RETRY_STATUSES = frozenset({429, 503})


class UsageError(ValueError):
    """A client option is out of its bounds; the message names the option."""


@dataclass(frozen=True)
class RankOptions:
    """The /rank fields that every query of a run shares."""

    top_k: int = 25
    candidates: int | None = None
    rerank: bool = True
    collection: str | None = None

    def answer_body(self, question: str, options: Sequence[str]) -> dict[str, Any]:
        """The POST /answer body for a multiple-choice question."""
        body: dict[str, Any] = {"question": question, "options": list(options)}
        if self.collection is not None:
            body["collection"] = self.collection
        return body

    def body(self, query: str) -> dict[str, Any]:
        body: dict[str, Any] = {"query": query, "top_k": self.top_k, "rerank": self.rerank}
        if self.candidates is not None:
            body["candidates"] = self.candidates
        if self.collection is not None:
            body["collection"] = self.collection
        return body


def normalise_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UsageError(f"--url {url!r} is not an http(s) URL such as {DEFAULT_URL}")
    return url.rstrip("/")


def is_loopback(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def make_client(url: str, *, api_key: str | None = None, timeout: float = 120.0,
                connections: int = 16, transport: httpx.AsyncBaseTransport | None = None,
                verify: ssl.SSLContext | bool = True) -> httpx.AsyncClient:
    """A pooled client; ``Authorization: Bearer`` when an API key is given."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    return httpx.AsyncClient(base_url=url, headers=headers, timeout=timeout, limits=limits,
                             transport=transport, verify=verify)


class Lanes:
    """Up to ``size`` httpx clients of one connection each; a request borrows one for its turn.

    One client with N pooled connections costs O(N) per request: httpcore walks the whole pool
    on every request and every response. At the concurrency of a load test (64 and more) that made
    the load generator itself eat a large share of the CPU it shares with the service. One
    connection per lane keeps the cost per request constant.
    """

    def __init__(self, url: str, size: int, *, api_key: str | None = None,
                 timeout: float = 120.0,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        if size < 1:
            raise UsageError(f"need at least one connection, got {size}")
        self.url = url
        self.size = size
        # One TLS context for all lanes: building one loads the CA bundle (tens of ms each).
        self._options: dict[str, Any] = {"api_key": api_key, "timeout": timeout,
                                         "transport": transport,
                                         "verify": httpx.create_ssl_context()}
        self._clients: list[httpx.AsyncClient] = []
        self._free: asyncio.LifoQueue[httpx.AsyncClient] = asyncio.LifoQueue()

    async def __aenter__(self) -> Lanes:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        clients, self._clients = self._clients, []
        for client in clients:
            await client.aclose()

    @contextlib.asynccontextmanager
    async def lane(self) -> AsyncIterator[httpx.AsyncClient]:
        """A client to oneself for one request; waits while every lane is busy."""
        if self._free.empty() and len(self._clients) < self.size:
            client = make_client(self.url, connections=1, **self._options)
            self._clients.append(client)
        else:
            client = await self._free.get()
        try:
            yield client
        finally:
            self._free.put_nowait(client)


@dataclass(frozen=True)
class RequestError:
    """Why a request failed for good, as it is written into a batch record."""

    status: int | None  # None: no HTTP answer (connection error, timeout)
    code: str
    message: str
    field: str | None = None
    attempts: int = 1

    @property
    def retryable(self) -> bool:
        return self.status is None or self.status in RETRY_STATUSES

    def as_dict(self) -> dict[str, Any]:
        return {"status": self.status, "code": self.code, "message": self.message,
                "field": self.field, "attempts": self.attempts}


class RequestFailedError(Exception):
    def __init__(self, error: RequestError, retry_after: float | None = None) -> None:
        super().__init__(f"{error.status or error.code}: {error.message}")
        self.error = error
        self.retry_after = retry_after


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header: delta-seconds or an HTTP date."""
    if value is None or not value.strip():
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError):
        return None
    return max(0.0, when - (time.time() if now is None else now))


def error_of(response: httpx.Response) -> RequestError:
    """The service's {"error": {code, message, field}} body, or what can be said without it."""
    try:
        detail = response.json()["error"]
        return RequestError(response.status_code, str(detail.get("code", "http_error")),
                            str(detail.get("message", "")), detail.get("field"))
    except (ValueError, KeyError, TypeError, AttributeError):
        text = response.text[:200].strip() or response.reason_phrase
        return RequestError(response.status_code, "http_error", text)


def transport_error(exc: httpx.TransportError) -> RequestError:
    code = "timeout" if isinstance(exc, httpx.TimeoutException) else "connection_error"
    return RequestError(None, code, f"{type(exc).__name__}: {exc}".rstrip(": "))


async def post_once(lanes: Lanes, path: str, body: Any) -> Any:
    """POST and return the JSON body; raise RequestFailedError with the service's error."""
    try:
        async with lanes.lane() as client:
            response = await client.post(path, json=body)
    except httpx.TransportError as exc:
        raise RequestFailedError(transport_error(exc)) from exc
    if response.status_code != 200:
        raise RequestFailedError(error_of(response),
                                 parse_retry_after(response.headers.get("Retry-After")))
    try:
        return response.json()
    except ValueError:
        raise RequestFailedError(RequestError(200, "bad_response",
                                              "the answer is not JSON")) from None


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter; a Retry-After header, when sent, sets the wait instead."""

    retries: int = 5
    backoff_s: float = 0.5
    max_wait_s: float = 30.0

    def __post_init__(self) -> None:
        if not 0 <= self.retries <= 100:
            raise UsageError(f"--retries must be 0..100, got {self.retries}")
        if not 0 <= self.backoff_s <= 600 or not 0 < self.max_wait_s <= 600:
            raise UsageError("--backoff must be 0..600 s and --max-wait in (0, 600] s")

    def wait(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return min(retry_after, self.max_wait_s)
        base = self.backoff_s * (2 ** (attempt - 1))
        return min(self.max_wait_s, base * (0.5 + random.random() / 2))


Sleep = Callable[[float], Awaitable[None]]


async def post_with_retries(lanes: Lanes, path: str, body: Any, policy: RetryPolicy,
                            sleep: Sleep = asyncio.sleep) -> Any:
    """POST, retrying connection errors, 429 and 503 as the policy allows. The lane is given
    back while waiting between attempts."""
    attempt = 0
    while True:
        attempt += 1
        try:
            return await post_once(lanes, path, body)
        except RequestFailedError as exc:
            error = RequestError(exc.error.status, exc.error.code, exc.error.message,
                                 exc.error.field, attempt)
            if not error.retryable or attempt > policy.retries:
                raise RequestFailedError(error, exc.retry_after) from None
            await sleep(policy.wait(attempt, exc.retry_after))


# ---------------------------------------------------------------- /metrics


def parse_prometheus(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Samples of a Prometheus text exposition, keyed by (name, labels)."""
    from prometheus_client.parser import text_string_to_metric_families

    return {(sample.name, frozenset(sample.labels.items())): float(sample.value)
            for family in text_string_to_metric_families(text) for sample in family.samples}


@dataclass(frozen=True)
class BatchCounters:
    """Cumulative micro-batch histogram sums and counts by stage, from one /metrics scrape."""

    sums: dict[str, float]
    counts: dict[str, float]

    @classmethod
    def parse(cls, text: str) -> BatchCounters:
        sums: dict[str, float] = {}
        counts: dict[str, float] = {}
        for (name, labels), value in parse_prometheus(text).items():
            stage = dict(labels).get("stage")
            if stage is None:
                continue
            if name == "rankd_batch_size_sum":
                sums[stage] = value
            elif name == "rankd_batch_size_count":
                counts[stage] = value
        return cls(sums, counts)

    def mean_since(self, before: BatchCounters) -> dict[str, float]:
        """Mean batch size by stage over the batches that ran between two scrapes."""
        means = {}
        for stage, count in self.counts.items():
            batches = count - before.counts.get(stage, 0.0)
            if batches > 0:
                means[stage] = (self.sums.get(stage, 0.0) - before.sums.get(stage, 0.0)) / batches
        return means


async def scrape_batches(lanes: Lanes) -> BatchCounters | None:
    """The batch counters, or None when /metrics cannot be read."""
    try:
        async with lanes.lane() as client:
            response = await client.get("/metrics")
    except httpx.TransportError:
        return None
    if response.status_code != 200:
        return None
    return BatchCounters.parse(response.text)
