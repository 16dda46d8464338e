"""A generic async micro-batcher shared by both stages (embedding and in-process reranking).

Items submitted within ``max_wait_ms`` of each other, up to ``max_batch_size``, run as one call of
a synchronous batch function in a dedicated worker thread, so the event loop never blocks and
concurrent requests share forward passes. While a batch runs, new items queue up and form the
next batch, which is where most of the batching under load comes from. Between batches the same
thread can hand freed memory back to the OS (``MemoryRelease``).

Fairness between requests: each ``submit_many`` is a job, with work measured by ``cost``, and
each batch (up to ``max_batch_cost``, or ``max_batch_size`` items) is filled

- by the least work left (shortest job first): a small request that arrives beside a large one
  waits for the batch in flight, not for the large request;
- except that jobs past their *virtual deadline* (arrival plus the time the whole job takes
  alone at the rate the batcher has been running, an exponential average of work per second
  over its batches) go first, earliest deadline first: the whole batch when the earliest fits
  in one, else the first half of every batch. Shortest-first alone starves a long job that
  short ones keep overtaking; this way no job waits much longer than its own solo time, and a
  job larger than a batch still leaves the short jobs half of each.

The batch function may answer ``UNFINISHED`` for an item it advanced but did not finish (a long
prompt filled in chunks); the item goes back to the queue as a job of its own for another
turn, keeping its arrival, so other jobs' batches run between its turns. Work of a caller that went away (a
timeout, a client that disconnected) is dropped before its next turn.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

T = TypeVar("T")
R = TypeVar("R")

log = logging.getLogger(__name__)


class QueueFullError(Exception):
    """The batcher's queue is at its configured depth; the caller should retry later."""

    def __init__(self, stage: str, depth: int, limit: int) -> None:
        super().__init__(f"the {stage} queue holds {depth} items, at its limit of {limit}")
        self.stage = stage
        self.depth = depth
        self.limit = limit


class JobTooLargeError(Exception):
    """One submission holds more items than the queue may ever hold: no retry can succeed."""

    def __init__(self, stage: str, items: int, limit: int) -> None:
        super().__init__(f"the request needs {items} {stage} items at once, over the queue's "
                         f"limit of {limit}")
        self.stage = stage
        self.items = items
        self.limit = limit


class BatcherClosedError(RuntimeError):
    """Submitted to a batcher that is not running."""


class Unfinished:
    """What a batch function answers for an item it advanced but did not finish."""


UNFINISHED = Unfinished()


class BatchObserver(Protocol):
    def batch_ran(self, stage: str, size: int, seconds: float) -> None: ...

    def queue_depth(self, stage: str, depth: int) -> None: ...

    def rejected(self, stage: str) -> None: ...

    def memory_released(self, stage: str, seconds: float) -> None: ...


@dataclass(frozen=True)
class MemoryRelease:
    """When the worker thread runs ``release`` (``runtime.memory.release_freed_memory``).

    After every ``every_batches`` batches while load lasts, and once the stage has been idle
    for ``idle_s`` seconds after a batch; 0 turns either off. It runs on the batch thread,
    between batches, so it never races a forward pass for the allocator.
    """

    release: Callable[[], object]
    every_batches: int = 0
    idle_s: float = 0.0


def default_memory_release() -> MemoryRelease:
    """Every 16 batches under load and after 1 s idle: measured to keep the resident set flat at
    no throughput cost (docs/reliability.md)."""
    from runtime.memory import release_freed_memory

    return MemoryRelease(release_freed_memory, every_batches=16, idle_s=1.0)


@dataclass
class _Pending(Generic[T, R]):
    item: T
    future: asyncio.Future[R]
    arrived: float  # when its submission came (loop time)
    work: int = 0  # its submission's whole work, as it arrived


@dataclass
class _Job(Generic[T, R]):
    """One submission's items that have not run yet (or are unfinished), in order."""

    waiting: deque[_Pending[T, R]]

    def deadline(self, rate: float) -> float:
        """Its submission's arrival plus the time its whole work takes alone at ``rate``: fixed
        as the job is served (its remaining work would move it earlier as it runs)."""
        return min(p.arrived + p.work / rate for p in self.waiting)


# How much each batch moves the batcher's measured rate (work per second).
RATE_SMOOTHING = 0.2


class MicroBatcher(Generic[T, R]):
    def __init__(
        self,
        stage: str,
        batch_fn: Callable[[list[T]], Sequence[R | Unfinished]],
        *,
        max_batch_size: int = 64,
        max_wait_ms: float = 2.0,
        max_queue_depth: int = 4096,
        cost: Callable[[T], int] | None = None,
        shared_cost: Callable[[T], int] | None = None,
        turn_cost: Callable[[T], int] | None = None,
        max_batch_cost: int = 0,
        observer: BatchObserver | None = None,
        memory_release: MemoryRelease | None = None,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be >= 1")
        self.stage = stage
        self._batch_fn = batch_fn
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait_ms / 1000.0
        self.max_queue_depth = max_queue_depth
        # The work of one item (a prompt's tokens still to run); 0 for max_batch_cost: no cap.
        self._cost = cost or (lambda item: 1)
        # The part of an item's work it shares with the item before it in its job (a prompt's
        # prefix shared with the other order of its query): saved when both run in one batch,
        # and only then, so it counts against the cap unless its partner is in the batch too.
        self._shared_cost = shared_cost or (lambda item: 0)
        # The work an item does in one batch, against max_batch_cost: its whole cost, unless
        # the batch function advances a long item a part per turn (a prompt filled in chunks).
        self._turn_cost = turn_cost or self._cost
        self.max_batch_cost = max_batch_cost
        self._observer = observer
        self._jobs: list[_Job[T, R]] = []
        self._depth = 0  # items waiting across the jobs
        self._arrived = asyncio.Event()
        self._idle = asyncio.Event()  # set when nothing is queued or running
        self._idle.set()
        self._task: asyncio.Task[None] | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._memory_release = memory_release
        self._batches_since_release = 0
        self.memory_releases = 0
        self.rate = 0.0  # work (cost) per second over recent batches; 0 until one has run
        self._taken_cost = 0  # the work of the batch last taken
        self._batches_taken = 0

    async def start(self) -> None:
        if self._task is None:
            self._executor = ThreadPoolExecutor(max_workers=1,
                                                thread_name_prefix=f"batch-{self.stage}")
            self._task = asyncio.create_task(self._run(), name=f"batcher-{self.stage}")

    async def close(self) -> None:
        """Finish queued and running work, then stop the loop and the worker thread."""
        task, self._task = self._task, None
        if task is not None:
            await self._idle.wait()
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    def predicted_seconds(self, items: Sequence[T]) -> float | None:
        """How long ``items`` would take alone at the measured rate (their work, less what
        prefix sharing computes once); None until a batch has run and measured it."""
        if not self.rate:
            return None
        work = sum(self._cost(item) - self._shared_cost(item) for item in items)
        return work / self.rate

    def check_capacity(self, items: int) -> None:
        """JobTooLargeError when ``items`` could never be queued at once."""
        if items > self.max_queue_depth:
            raise JobTooLargeError(self.stage, items, self.max_queue_depth)

    async def submit(self, item: T) -> R:
        return (await self.submit_many([item]))[0]

    async def submit_many(self, items: Sequence[T]) -> list[R]:
        if self._task is None:
            raise BatcherClosedError(f"the {self.stage} batcher is not running")
        self.check_capacity(len(items))
        if self._depth + len(items) > self.max_queue_depth:
            if self._observer is not None:
                self._observer.rejected(self.stage)
            raise QueueFullError(self.stage, self._depth, self.max_queue_depth)
        loop = asyncio.get_running_loop()
        now = loop.time()
        pending = [_Pending[T, R](item, loop.create_future(), now) for item in items]
        job = _Job(deque(pending))
        work = self._work_left(job)
        for p in pending:
            p.work = work
        self._jobs.append(job)
        self._depth += len(pending)
        self._idle.clear()
        self._report_depth()
        self._arrived.set()
        return list(await asyncio.gather(*(p.future for p in pending)))

    def _report_depth(self) -> None:
        if self._observer is not None:
            self._observer.queue_depth(self.stage, self._depth)

    def _prune(self) -> None:
        for job in self._jobs:
            before = len(job.waiting)
            job.waiting = deque(p for p in job.waiting if not p.future.done())
            self._depth -= before - len(job.waiting)
        self._jobs = [job for job in self._jobs if job.waiting]

    def _take(self) -> list[_Pending[T, R]]:
        """The next batch: first the jobs past their virtual deadline, earliest first (the whole
        batch if the earliest fits in one, else half of it), the rest from the jobs with the
        least work left, each job's items in their order, up to the size and cost caps (the
        first item always goes, whatever its cost)."""
        self._prune()
        rate = self.rate

        batch: list[_Pending[T, R]] = []
        cost = 0
        in_batch: set[int] = set()  # jobs with an item in the batch: their next one follows it

        def fill(jobs: list[_Job[T, R]], size: int, budget: int) -> None:
            nonlocal cost
            for job in jobs:
                while job.waiting and len(batch) < size:
                    item = job.waiting[0].item
                    follows = id(job) in in_batch
                    item_cost = (self._turn_cost(item)
                                 - (self._shared_cost(item) if follows else 0))
                    if batch and budget and cost + item_cost > budget:
                        return
                    batch.append(job.waiting.popleft())
                    in_batch.add(id(job))
                    cost += item_cost
                if len(batch) >= size or (budget and cost >= budget):
                    return

        # Jobs past their virtual deadline (waiting longer than their work takes alone) go
        # first, earliest deadline first: the whole batch when the earliest fits in one, so its
        # items share their prefix in one pass (under steady load most jobs are overdue; split
        # across passes, a 10-prompt pointwise query computed its query once per part, and the
        # service's throughput at concurrency 4 fell from 0.99 to 0.74 q/s), else its first half, so
        # that a job larger than a batch never holds the model. A batch of one item cannot be
        # halved, so its batches take turns.
        now = asyncio.get_running_loop().time()
        overdue = sorted((job for job in self._jobs if rate and job.deadline(rate) < now),
                         key=lambda job: job.deadline(rate))
        half = self.max_batch_size // 2 or self._batches_taken % 2
        self._batches_taken += 1
        if overdue and self.max_batch_cost and self._work_left(overdue[0]) <= self.max_batch_cost:
            fill(overdue, self.max_batch_size, self.max_batch_cost)
        elif overdue and half:
            fill(overdue, half, self.max_batch_cost // 2)
        fill(sorted(self._jobs, key=self._work_left), self.max_batch_size, self.max_batch_cost)
        self._depth -= len(batch)
        self._taken_cost = cost
        self._jobs = [job for job in self._jobs if job.waiting]
        self._report_depth()
        return batch

    def _work_left(self, job: _Job[T, R]) -> int:
        """A job's work, its items run in order, each sharing with the one before it."""
        return sum(self._cost(p.item) - (self._shared_cost(p.item) if i else 0)
                   for i, p in enumerate(job.waiting))

    async def _collect(self) -> list[_Pending[T, R]]:
        while True:
            while not self._depth:
                self._arrived.clear()
                idle_s = self._memory_release.idle_s if self._memory_release else 0.0
                if idle_s > 0 and self._batches_since_release > 0:
                    try:
                        await asyncio.wait_for(self._arrived.wait(), idle_s)
                    except TimeoutError:
                        await self._release_memory()
                    continue
                await self._arrived.wait()
            if self._depth < self.max_batch_size and self.max_wait > 0:
                deadline = asyncio.get_running_loop().time() + self.max_wait
                while self._depth < self.max_batch_size:
                    remaining = deadline - asyncio.get_running_loop().time()
                    if remaining <= 0:
                        break
                    self._arrived.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._arrived.wait(), remaining)
            batch = self._take()
            if batch:
                return batch
            if not self._depth:
                self._idle.set()  # everything waiting belonged to callers that went away

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._collect()
            await self._run_batch(loop, batch)
            self._batches_since_release += 1
            every = self._memory_release.every_batches if self._memory_release else 0
            if every and self._batches_since_release >= every:
                await self._release_memory()
            if not self._depth:
                self._idle.set()

    async def _release_memory(self) -> None:
        assert self._memory_release is not None
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            await loop.run_in_executor(self._executor, self._memory_release.release)
        except Exception as exc:  # the service goes on with the memory it holds
            log.warning("%s: releasing freed memory failed: %s", self.stage, exc)
        self._batches_since_release = 0
        self.memory_releases += 1
        if self._observer is not None:
            self._observer.memory_released(self.stage, loop.time() - started)

    async def _run_batch(self, loop: asyncio.AbstractEventLoop, batch: list[_Pending[T, R]]) -> None:
        live = [p for p in batch if not p.future.done()]  # callers that went away
        if live:
            started = loop.time()
            try:
                results = await loop.run_in_executor(
                    self._executor, self._batch_fn, [p.item for p in live]
                )
                if len(results) != len(live):
                    raise RuntimeError(
                        f"{self.stage} batch function returned {len(results)} results for "
                        f"{len(live)} items"
                    )
            except Exception as exc:  # delivered to every caller in the batch
                log.warning("%s batch of %d failed: %s", self.stage, len(live), exc)
                for p in live:
                    if not p.future.done():
                        p.future.set_exception(exc)
                return
            finally:
                seconds = loop.time() - started
                if self._observer is not None:
                    self._observer.batch_ran(self.stage, len(live), seconds)
            if seconds > 0:
                measured = self._taken_cost / seconds
                self.rate = measured if not self.rate else (
                    (1 - RATE_SMOOTHING) * self.rate + RATE_SMOOTHING * measured)
            unfinished: list[_Pending[T, R]] = []
            for p, result in zip(live, results, strict=True):
                if isinstance(result, Unfinished):
                    unfinished.append(p)
                elif not p.future.done():
                    p.future.set_result(result)
            if unfinished:
                # Back for another turn, as a job of their own that keeps their arrival.
                self._jobs.append(_Job(deque(unfinished)))
                self._depth += len(unfinished)
                self._report_depth()
