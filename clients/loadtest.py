"""``rankd loadtest``: drive a running service and report what it can hold.

Two modes, each a list of levels:

- closed loop: ``c`` workers each send the next query as soon as their previous answer arrives;
- open loop: requests leave at a fixed rate whatever the answers do, so queueing shows up as
  latency (measured from each request's scheduled departure, not from when it actually left).

Each level is bounded in time and in count (``MAX_LEVEL_SECONDS``, ``MAX_LEVEL_REQUESTS``). Per
level the report holds requests/s, latency percentiles of the answered requests, failures by
status, the service's own stage timings (``timings_ms``) and the mean micro-batch size per stage
(the encoder's is ``search``), from the difference of two ``/metrics`` scrapes.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import math
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from clients.api import BatchCounters, Lanes, RankOptions, UsageError, scrape_batches
from clients.queries import Query

MAX_LEVEL_SECONDS = 600.0
MAX_LEVEL_REQUESTS = 100_000
MAX_CONCURRENCY = 1024
MAX_RATE = 10_000.0
DEFAULT_CONCURRENCY = (1, 4, 16, 64)
DEFAULT_DURATION_S = 10.0
DRAIN_SECONDS = 60.0  # how long a finished open-loop level waits for its stragglers
PERCENTILES = (50, 90, 99)


@dataclass(frozen=True)
class LoadConfig:
    url: str
    rank: RankOptions = field(default_factory=RankOptions)
    concurrency: tuple[int, ...] = ()
    rates: tuple[float, ...] = ()
    duration_s: float | None = None  # per level; DEFAULT_DURATION_S when neither bound is set
    requests: int | None = None  # per level
    warmup: int = 8
    api_key: str | None = None
    timeout_s: float = 30.0
    max_in_flight: int = 256  # open loop: requests outstanding at once before new ones are dropped
    # When set, the loops drive a peer's OpenAI-compatible POST /embeddings (infinity-emb, vLLM)
    # with this model name and one text per request, instead of rankd's /rank: a side-by-side
    # figure from the same closed and open loops.
    embeddings_model: str | None = None

    def __post_init__(self) -> None:
        for c in self.concurrency:
            if not 1 <= c <= MAX_CONCURRENCY:
                raise UsageError(f"--concurrency values must be 1..{MAX_CONCURRENCY}, got {c}")
        for r in self.rates:
            if not 0 < r <= MAX_RATE:
                raise UsageError(f"--rate values must be in (0, {MAX_RATE:g}], got {r:g}")
        if self.duration_s is not None and not 0 < self.duration_s <= MAX_LEVEL_SECONDS:
            raise UsageError(f"--duration must be in (0, {MAX_LEVEL_SECONDS:g}] seconds, "
                             f"got {self.duration_s:g}")
        if self.requests is not None and not 1 <= self.requests <= MAX_LEVEL_REQUESTS:
            raise UsageError(f"--requests must be 1..{MAX_LEVEL_REQUESTS}, got {self.requests}")
        if not 0 <= self.warmup <= 1000:
            raise UsageError(f"--warmup must be 0..1000, got {self.warmup}")
        if not 1 <= self.max_in_flight <= MAX_CONCURRENCY:
            raise UsageError(f"--max-in-flight must be 1..{MAX_CONCURRENCY}, "
                             f"got {self.max_in_flight}")

    @property
    def path(self) -> str:
        return "/rank" if self.embeddings_model is None else "/embeddings"

    def body(self, text: str) -> dict[str, Any]:
        if self.embeddings_model is None:
            return self.rank.body(text)
        return {"model": self.embeddings_model, "input": [text]}

    @property
    def levels(self) -> list[tuple[str, float]]:
        closed = self.concurrency or (() if self.rates else DEFAULT_CONCURRENCY)
        return [("closed", float(c)) for c in closed] + [("open", r) for r in self.rates]

    @property
    def level_seconds(self) -> float:
        if self.duration_s is None:
            return MAX_LEVEL_SECONDS if self.requests is not None else DEFAULT_DURATION_S
        return self.duration_s

    @property
    def level_requests(self) -> int:
        return self.requests if self.requests is not None else MAX_LEVEL_REQUESTS


@dataclass(frozen=True)
class Sample:
    latency_s: float
    outcome: str  # "200", another status, "connection_error", "timeout" or "client_overflow"
    timings: dict[str, float | None] | None = None


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not sorted_values:
        raise ValueError("no values")
    position = (len(sorted_values) - 1) * q / 100.0
    low = math.floor(position)
    high = math.ceil(position)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (position - low)


@dataclass
class LevelResult:
    mode: str  # closed | open
    concurrency: int | None
    rate: float | None  # offered requests/s (open loop)
    requests: int
    ok: int
    seconds: float
    throughput: float  # answered (200) requests per second
    latency_ms: dict[str, float | None]
    errors: dict[str, int]
    server_ms: dict[str, float | None]  # mean of the service's timings_ms, answered requests
    batch_mean: dict[str, float]  # mean micro-batch size by stage ("search" is the encoder)
    interrupted: bool = False

    @property
    def label(self) -> str:
        return f"c={self.concurrency}" if self.mode == "closed" else f"rate={self.rate:g}/s"

    @classmethod
    def of(cls, mode: str, value: float, samples: Sequence[Sample], seconds: float,
           batch_mean: dict[str, float], interrupted: bool) -> LevelResult:
        answered = [s for s in samples if s.outcome == "200"]
        latencies = sorted(s.latency_s * 1000.0 for s in answered)
        latency: dict[str, float | None] = {f"p{q}": (percentile(latencies, q) if latencies
                                                      else None) for q in PERCENTILES}
        latency["max"] = latencies[-1] if latencies else None
        latency["mean"] = sum(latencies) / len(latencies) if latencies else None
        server: dict[str, float | None] = {}
        for stage in ("retrieve", "rerank", "total"):
            values = [v for s in answered if s.timings
                      and (v := s.timings.get(stage)) is not None]
            server[stage] = sum(values) / len(values) if values else None
        errors = Counter(s.outcome for s in samples if s.outcome != "200")
        return cls(mode=mode, concurrency=int(value) if mode == "closed" else None,
                   rate=value if mode == "open" else None, requests=len(samples),
                   ok=len(answered), seconds=seconds,
                   throughput=len(answered) / seconds if seconds > 0 else 0.0,
                   latency_ms=latency, errors=dict(sorted(errors.items())), server_ms=server,
                   batch_mean=batch_mean, interrupted=interrupted)


@dataclass
class LoadReport:
    url: str
    started_at: str
    queries: int
    options: dict[str, Any]
    levels: list[LevelResult] = field(default_factory=list)
    interrupted: bool = False

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for level, raw in zip(self.levels, data["levels"], strict=True):
            raw["label"] = level.label
        return data


# ---------------------------------------------------------------- sending


async def _send(lanes: Lanes, path: str, body: dict[str, Any],
                start: float | None = None) -> Sample:
    loop = asyncio.get_running_loop()
    start = loop.time() if start is None else start
    try:
        async with lanes.lane() as client:
            response = await client.post(path, json=body)
    except httpx.TimeoutException:
        return Sample(loop.time() - start, "timeout")
    except httpx.TransportError:
        return Sample(loop.time() - start, "connection_error")
    latency = loop.time() - start
    timings = None
    if response.status_code == 200:
        with contextlib.suppress(ValueError, AttributeError):
            timings = response.json().get("timings_ms")
    return Sample(latency, str(response.status_code), timings)


async def _until_stopped(tasks: Sequence[asyncio.Task[None]], stop: asyncio.Event,
                         limit_s: float | None = None) -> bool:
    """Wait for ``tasks`` (at most ``limit_s`` seconds); True if ``stop`` was set first. Tasks still
    running at the end are cancelled."""
    loop = asyncio.get_running_loop()
    deadline = None if limit_s is None else loop.time() + limit_s
    stopper = asyncio.create_task(stop.wait())
    try:
        pending = [t for t in tasks if not t.done()]
        while pending and not stop.is_set():
            remaining = None if deadline is None else deadline - loop.time()
            if remaining is not None and remaining <= 0:
                break
            await asyncio.wait([*pending, stopper], timeout=remaining,
                               return_when=asyncio.FIRST_COMPLETED)
            pending = [t for t in tasks if not t.done()]
    finally:
        stopper.cancel()
    for task in tasks:
        task.cancel()
    for outcome in await asyncio.gather(*tasks, return_exceptions=True):
        if isinstance(outcome, Exception):  # a bug, not a cancellation: let it show
            raise outcome
    return stop.is_set()


async def closed_loop(lanes: Lanes, path: str, bodies: Sequence[dict[str, Any]],
                      concurrency: int, seconds: float, requests: int,
                      stop: asyncio.Event) -> tuple[list[Sample], float, bool]:
    """``concurrency`` workers, each sending its next request when the last one is answered."""
    loop = asyncio.get_running_loop()
    samples: list[Sample] = []
    counter = itertools.count()
    started = loop.time()
    deadline = started + seconds

    async def worker() -> None:
        while loop.time() < deadline:
            i = next(counter)
            if i >= requests:
                return
            samples.append(await _send(lanes, path, bodies[i % len(bodies)]))

    tasks = [asyncio.create_task(worker()) for _ in range(concurrency)]
    stopped = await _until_stopped(tasks, stop)
    return samples, loop.time() - started, stopped


async def open_loop(lanes: Lanes, path: str, bodies: Sequence[dict[str, Any]], rate: float,
                    seconds: float, requests: int, max_in_flight: int,
                    stop: asyncio.Event) -> tuple[list[Sample], float, bool]:
    """Requests leave every 1/rate seconds, answered or not, at most ``max_in_flight`` at once."""
    loop = asyncio.get_running_loop()
    samples: list[Sample] = []
    in_flight: set[asyncio.Task[None]] = set()
    count = min(requests, max(1, math.floor(rate * seconds)))
    started = loop.time()

    async def one(body: dict[str, Any], scheduled: float) -> None:
        samples.append(await _send(lanes, path, body, scheduled))

    async def schedule() -> None:
        for i in range(count):
            scheduled = started + i / rate
            delay = scheduled - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            if len(in_flight) >= max_in_flight:
                samples.append(Sample(0.0, "client_overflow"))
                continue
            task = asyncio.create_task(one(bodies[i % len(bodies)], scheduled))
            in_flight.add(task)
            task.add_done_callback(in_flight.discard)

    scheduler = asyncio.create_task(schedule())
    stopped = await _until_stopped([scheduler], stop)
    if not stopped and in_flight:
        stopped = await _until_stopped(list(in_flight), stop, limit_s=DRAIN_SECONDS)
    for task in list(in_flight):
        task.cancel()
    await asyncio.gather(*in_flight, return_exceptions=True)
    return samples, loop.time() - started, stopped


# ---------------------------------------------------------------- the run


async def run_loadtest(queries: Sequence[Query], config: LoadConfig,
                       stop: asyncio.Event | None = None,
                       transport: httpx.AsyncBaseTransport | None = None,
                       report: LoadReport | None = None) -> LoadReport:
    """Run every level in turn. Setting ``stop`` ends the current level early (its partial
    figures are kept, marked interrupted) and skips the rest. ``report``, when given, is filled
    in level by level, so a caller holds whatever was measured even if this is cancelled."""
    stop = stop or asyncio.Event()
    bodies = [config.body(q.text) for q in queries]
    report = report or LoadReport(url="", started_at="", queries=0, options={})
    report.url = config.url
    report.started_at = datetime.now(UTC).isoformat(timespec="seconds")
    report.queries = len(queries)
    report.options = {**asdict(config.rank), "duration_s": config.duration_s,
                      "requests": config.requests, "warmup": config.warmup,
                      "max_in_flight": config.max_in_flight}
    connections = max([int(v) for mode, v in config.levels if mode == "closed"]
                      + [config.max_in_flight if config.rates else 1])
    async with Lanes(config.url, connections, api_key=config.api_key,
                     timeout=config.timeout_s, transport=transport) as lanes:
        if config.warmup:
            await closed_loop(lanes, config.path, bodies, min(4, config.warmup), MAX_LEVEL_SECONDS,
                              config.warmup, stop)
        for mode, value in config.levels:
            if stop.is_set():
                break
            before = await scrape_batches(lanes)
            if mode == "closed":
                samples, seconds, stopped = await closed_loop(
                    lanes, config.path, bodies, int(value), config.level_seconds, config.level_requests,
                    stop)
            else:
                samples, seconds, stopped = await open_loop(
                    lanes, config.path, bodies, value, config.level_seconds, config.level_requests,
                    config.max_in_flight, stop)
            after = await scrape_batches(lanes) if not stopped else None
            batch_mean = after.mean_since(before or BatchCounters({}, {})) if after else {}
            report.levels.append(LevelResult.of(mode, value, samples, seconds, batch_mean,
                                                stopped))
    report.interrupted = stop.is_set()
    return report


# ---------------------------------------------------------------- output


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def format_table(report: LoadReport) -> str:
    header = ("level", "requests", "ok", "req/s", "p50 ms", "p90 ms", "p99 ms", "max ms",
              "errors", "srv retrieve", "srv rerank", "srv total", "enc batch")
    rows = [header]
    for level in report.levels:
        errors = ", ".join(f"{k}:{v}" for k, v in level.errors.items()) or "-"
        search = level.batch_mean.get("search")
        rows.append((
            level.label + (" (partial)" if level.interrupted else ""),
            str(level.requests), str(level.ok), f"{level.throughput:.1f}",
            _ms(level.latency_ms["p50"]), _ms(level.latency_ms["p90"]),
            _ms(level.latency_ms["p99"]), _ms(level.latency_ms["max"]), errors,
            _ms(level.server_ms["retrieve"]), _ms(level.server_ms["rerank"]),
            _ms(level.server_ms["total"]), "-" if search is None else f"{search:.1f}",
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.rjust(width) if i else cell.ljust(width)
                       for i, (cell, width) in enumerate(zip(row, widths, strict=True)))
             for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    if report.interrupted:
        lines.append("interrupted: the figures above are what was measured before Ctrl-C")
    return "\n".join(lines)


def write_json(report: LoadReport, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(report.as_dict(), indent=2) + "\n", encoding="utf-8")


def write_plot(report: LoadReport, path: str | Path) -> None:
    """Latency percentiles and throughput against concurrency (and offered rate, if any)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib import ticker
    except ImportError as exc:
        raise UsageError("--plot needs matplotlib: pip install -e '.[bench]'") from exc
    groups = [(mode, [lv for lv in report.levels if lv.mode == mode])
              for mode in ("closed", "open")]
    groups = [(mode, levels) for mode, levels in groups if levels]
    if not groups:
        raise UsageError("nothing was measured, so there is nothing to plot")
    fig, axes = plt.subplots(len(groups), 2, figsize=(11, 4.2 * len(groups)), squeeze=False)
    for row, (mode, levels) in enumerate(groups):
        xs = [lv.concurrency if mode == "closed" else lv.rate for lv in levels]
        xlabel = "concurrency (closed loop)" if mode == "closed" else "offered rate, req/s (open loop)"
        latency_ax, throughput_ax = axes[row]
        for name in ("p50", "p90", "p99"):
            ys = [lv.latency_ms[name] for lv in levels]
            latency_ax.plot(xs, [math.nan if y is None else y for y in ys], marker="o",
                            label=name)
        latency_ax.set_xlabel(xlabel)
        latency_ax.set_ylabel("latency, ms")
        latency_ax.set_yscale("log")
        plain = ticker.FuncFormatter(lambda v, _: f"{v:g}")
        latency_ax.yaxis.set_major_formatter(plain)
        latency_ax.yaxis.set_minor_locator(ticker.LogLocator(subs=(2.0, 5.0)))
        latency_ax.yaxis.set_minor_formatter(plain)
        latency_ax.legend()
        throughput_ax.plot(xs, [lv.throughput for lv in levels], marker="o", color="tab:green")
        throughput_ax.set_xlabel(xlabel)
        throughput_ax.set_ylabel("answered requests/s")
        for ax in (latency_ax, throughput_ax):
            if mode == "closed" and len(xs) > 1:
                ax.set_xscale("log", base=2)
            ax.set_xticks(xs, [f"{x:g}" for x in xs])
            ax.xaxis.set_minor_locator(ticker.NullLocator())
            ax.grid(True, alpha=0.3)
    fig.suptitle(f"rankd load test: {report.url} ({time.strftime('%Y-%m-%d %H:%M')})")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
