from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass

import pytest

from runtime.batching import (
    UNFINISHED,
    BatcherClosedError,
    JobTooLargeError,
    MemoryRelease,
    MicroBatcher,
    QueueFullError,
)


class Recorder:
    def __init__(self) -> None:
        self.sizes: list[int] = []
        self.threads: set[str] = set()
        self.depths: list[int] = []
        self.rejections = 0
        self.releases = 0

    def batch_ran(self, stage: str, size: int, seconds: float) -> None:
        self.sizes.append(size)

    def queue_depth(self, stage: str, depth: int) -> None:
        self.depths.append(depth)

    def rejected(self, stage: str) -> None:
        self.rejections += 1

    def memory_released(self, stage: str, seconds: float) -> None:
        self.releases += 1


def _squares(recorder: Recorder, delay: float = 0.0):  # type: ignore[no-untyped-def]
    def run(items: list[int]) -> list[int]:
        recorder.threads.add(threading.current_thread().name)
        if delay:
            threading.Event().wait(delay)
        return [i * i for i in items]

    return run


async def test_concurrent_submissions_share_batches() -> None:
    recorder = Recorder()
    batcher = MicroBatcher("t", _squares(recorder, 0.02), max_batch_size=16, max_wait_ms=5,
                           observer=recorder)
    await batcher.start()
    try:
        results = await asyncio.gather(*(batcher.submit(i) for i in range(50)))
    finally:
        await batcher.close()
    assert results == [i * i for i in range(50)]
    assert sum(recorder.sizes) == 50
    assert len(recorder.sizes) < 50
    assert max(recorder.sizes) <= 16
    # The batch function never runs on the event loop's thread.
    assert recorder.threads
    assert all(name.startswith("batch-t") for name in recorder.threads)


async def test_submit_many_keeps_order_across_batches() -> None:
    recorder = Recorder()
    batcher = MicroBatcher("t", _squares(recorder), max_batch_size=3, max_wait_ms=0,
                           observer=recorder)
    await batcher.start()
    try:
        assert await batcher.submit_many(list(range(10))) == [i * i for i in range(10)]
    finally:
        await batcher.close()
    assert max(recorder.sizes) <= 3


async def test_errors_reach_every_caller_and_the_batcher_keeps_serving() -> None:
    calls = 0

    def flaky(items: list[int]) -> list[int]:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise ValueError("boom")
        return items

    batcher = MicroBatcher("t", flaky, max_batch_size=8, max_wait_ms=5)
    await batcher.start()
    try:
        outcomes = await asyncio.gather(*(batcher.submit(i) for i in range(3)),
                                        return_exceptions=True)
        assert all(isinstance(o, ValueError) for o in outcomes)
        assert await batcher.submit(7) == 7
    finally:
        await batcher.close()


async def test_queue_depth_limit_refuses_instead_of_queueing() -> None:
    release = threading.Event()

    def slow(items: list[int]) -> list[int]:
        release.wait(5)
        return items

    batcher = MicroBatcher("t", slow, max_batch_size=1, max_wait_ms=0, max_queue_depth=2)
    await batcher.start()
    try:
        first = asyncio.create_task(batcher.submit(0))  # taken by the worker
        await asyncio.sleep(0.05)
        queued = [asyncio.create_task(batcher.submit(i)) for i in (1, 2)]
        await asyncio.sleep(0.01)
        with pytest.raises(QueueFullError, match="limit of 2"):
            await batcher.submit(3)
        release.set()
        assert await asyncio.gather(first, *queued) == [0, 1, 2]
    finally:
        release.set()
        await batcher.close()


async def test_submit_before_start_is_refused() -> None:
    batcher = MicroBatcher("t", lambda items: items)
    with pytest.raises(BatcherClosedError):
        await batcher.submit(1)


async def test_close_finishes_queued_work() -> None:
    batcher = MicroBatcher("t", lambda items: [i + 1 for i in items], max_batch_size=2,
                           max_wait_ms=1)
    await batcher.start()
    pending = [asyncio.create_task(batcher.submit(i)) for i in range(6)]
    await asyncio.sleep(0)
    await batcher.close()
    assert [await p for p in pending] == [1, 2, 3, 4, 5, 6]


class ReleaseLog:
    """A release callable that records where it ran and whether a batch was running then."""

    def __init__(self) -> None:
        self.threads: list[str] = []
        self.during_batch = 0
        self.in_batch = threading.Event()

    def batch(self, items: list[int]) -> list[int]:
        self.in_batch.set()
        try:
            threading.Event().wait(0.002)
            return items
        finally:
            self.in_batch.clear()

    def release(self) -> None:
        self.threads.append(threading.current_thread().name)
        self.during_batch += self.in_batch.is_set()


async def test_memory_is_released_every_n_batches_under_load_on_the_batch_thread() -> None:
    log, recorder = ReleaseLog(), Recorder()
    batcher = MicroBatcher("t", log.batch, max_batch_size=1, max_wait_ms=0, observer=recorder,
                           memory_release=MemoryRelease(log.release, every_batches=3))
    await batcher.start()
    try:
        assert await asyncio.gather(*(batcher.submit(i) for i in range(10))) == list(range(10))
    finally:
        await batcher.close()
    assert len(recorder.sizes) == 10
    assert len(log.threads) == 3 == recorder.releases == batcher.memory_releases
    assert all(name.startswith("batch-t") for name in log.threads)
    assert log.during_batch == 0


async def test_memory_is_released_once_per_idle_spell() -> None:
    log = ReleaseLog()
    batcher = MicroBatcher("t", log.batch, max_batch_size=4, max_wait_ms=0,
                           memory_release=MemoryRelease(log.release, idle_s=0.05))
    await batcher.start()
    try:
        await asyncio.sleep(0.15)
        assert log.threads == []  # nothing ran yet, so there is nothing to give back
        assert await batcher.submit(1) == 1
        await asyncio.sleep(0.02)
        assert log.threads == []  # not idle long enough
        await asyncio.sleep(0.2)
        assert len(log.threads) == 1
        await asyncio.sleep(0.15)
        assert len(log.threads) == 1  # one release per idle spell, not one per timeout
        assert await batcher.submit(2) == 2
        await asyncio.sleep(0.2)
        assert len(log.threads) == 2
    finally:
        await batcher.close()
    assert log.during_batch == 0


async def test_a_failing_release_does_not_stop_the_batcher(caplog: pytest.LogCaptureFixture) -> None:
    def broken() -> None:
        raise OSError("no allocator here")

    batcher = MicroBatcher("t", lambda items: items, max_batch_size=1, max_wait_ms=0,
                           memory_release=MemoryRelease(broken, every_batches=1))
    await batcher.start()
    try:
        assert await batcher.submit_many([1, 2, 3]) == [1, 2, 3]
    finally:
        await batcher.close()
    assert batcher.memory_releases == 3
    assert "releasing freed memory failed: no allocator here" in caplog.text


class Journal:
    """A batch function that records what each batch held and can hold a batch back."""

    def __init__(self) -> None:
        self.batches: list[list[str]] = []
        self.release = threading.Event()
        self.release.set()

    def run(self, items: list[str]) -> list[str]:
        self.release.wait(10)
        self.batches.append(list(items))
        return [item.upper() for item in items]


async def test_a_short_job_runs_before_the_rest_of_a_long_one() -> None:
    journal = Journal()
    journal.release.clear()  # the first batch holds until both jobs are queued
    batcher = MicroBatcher("t", journal.run, max_batch_size=2, max_wait_ms=0)
    await batcher.start()
    try:
        long = asyncio.create_task(batcher.submit_many([f"l{i}" for i in range(8)]))
        await asyncio.sleep(0.05)
        short = asyncio.create_task(batcher.submit_many(["s0", "s1"]))
        await asyncio.sleep(0.05)
        journal.release.set()
        assert await short == ["S0", "S1"]
        assert await long == [f"L{i}" for i in range(8)]
    finally:
        await batcher.close()
    # The batch in flight, then the short job, then the long job's rest.
    assert journal.batches[0] == ["l0", "l1"]
    assert journal.batches[1] == ["s0", "s1"]
    assert [i for batch in journal.batches[2:] for i in batch] == [f"l{i}" for i in range(2, 8)]


async def test_a_cost_cap_bounds_each_batch_and_an_expensive_item_runs_alone() -> None:
    journal = Journal()
    batcher = MicroBatcher("t", journal.run, max_batch_size=16, max_wait_ms=20,
                           cost=len, max_batch_cost=10)
    await batcher.start()
    try:
        results = await batcher.submit_many(["aaaa", "bbbb", "cccc", "x" * 25, "dd"])
    finally:
        await batcher.close()
    assert results == ["AAAA", "BBBB", "CCCC", "X" * 25, "DD"]
    for batch in journal.batches:
        assert len(batch) == 1 or sum(map(len, batch)) <= 10, batch
    assert ["x" * 25] in journal.batches


async def test_a_long_job_is_not_starved_by_a_steady_stream_of_short_ones() -> None:
    # Short jobs arrive as fast as the batcher can serve them, for longer than the long job
    # needs alone many times over. Shortest-first alone would serve only them; the
    # virtual-deadline half of each batch finishes the long job while they still arrive.
    def step(items: list[str]) -> list[str]:
        threading.Event().wait(0.01)
        return [item.upper() for item in items]

    batcher = MicroBatcher("t", step, max_batch_size=4, max_wait_ms=0)
    await batcher.start()
    finished: list[float] = []
    loop = asyncio.get_running_loop()
    started = loop.time()

    async def stream() -> None:
        while loop.time() - started < 1.5:
            await batcher.submit_many(["s1", "s2", "s3", "s4"])

    try:
        streams = [asyncio.create_task(stream()) for _ in range(3)]
        await asyncio.sleep(0.05)  # the stream is flowing before the long job comes
        long = await batcher.submit_many([f"l{i}" for i in range(40)])
        finished.append(loop.time() - started)
        await asyncio.gather(*streams)
    finally:
        await batcher.close()
    assert long == [f"L{i}" for i in range(40)]
    # Alone, 40 items take 10 batches (0.1 s); sharing half of each batch, about 20 (0.2 s).
    assert finished[0] < 1.0, finished


async def test_shared_work_is_saved_only_beside_its_partner() -> None:
    # Each item of a job shares all but its last letter with the item before it: 4 of its 5.
    # Beside its partner an item costs 1, so a job of one 5 and four 1s fills a cap of 9
    # exactly; the item that opens the next batch pays its full 5 again.
    journal = Journal()
    batcher = MicroBatcher("t", journal.run, max_batch_size=16, max_wait_ms=20, cost=len,
                           shared_cost=lambda item: 4, max_batch_cost=9)
    await batcher.start()
    try:
        results = await batcher.submit_many([f"aaaa{c}" for c in "bcdefgh"])
    finally:
        await batcher.close()
    assert results == [f"AAAA{c}" for c in "BCDEFGH"]
    assert journal.batches == [[f"aaaa{c}" for c in "bcdef"], ["aaaag", "aaaah"]]


async def test_unfinished_items_come_back_and_others_run_between_their_turns() -> None:
    @dataclass
    class Work:
        name: str
        left: int

    order: list[str] = []

    def step(items: list[Work]) -> list[object]:
        threading.Event().wait(0.05)  # a turn takes a while: the short job arrives during one
        results: list[object] = []
        for item in items:
            order.append(item.name)
            item.left -= 1
            results.append(UNFINISHED if item.left else item.name)
        return results

    batcher: MicroBatcher[Work, str] = MicroBatcher("t", step, max_batch_size=1, max_wait_ms=0,
                                                    cost=lambda w: w.left)
    await batcher.start()
    try:
        long = asyncio.create_task(batcher.submit(Work("long", 4)))
        await asyncio.sleep(0.07)
        short = await batcher.submit(Work("short", 1))
        assert await long == "long"
    finally:
        await batcher.close()
    assert short == "short"
    assert order.count("long") == 4
    assert order.index("short") < len(order) - 1  # it did not wait for all four turns


async def test_work_of_a_caller_that_went_away_is_dropped() -> None:
    journal = Journal()
    journal.release.clear()
    batcher = MicroBatcher("t", journal.run, max_batch_size=1, max_wait_ms=0)
    await batcher.start()
    try:
        gone = asyncio.create_task(batcher.submit_many(["a", "b", "c", "d"]))
        await asyncio.sleep(0.05)
        gone.cancel()
        journal.release.set()
        assert await batcher.submit("e") == "E"
    finally:
        await batcher.close()
    assert journal.batches == [["a"], ["e"]]  # b, c and d never ran


async def test_a_job_larger_than_the_queue_is_refused_as_impossible() -> None:
    batcher = MicroBatcher("t", lambda items: items, max_queue_depth=4)
    await batcher.start()
    try:
        with pytest.raises(JobTooLargeError, match="needs 5 t items at once, over the queue's "
                                                   "limit of 4"):
            await batcher.submit_many(list(range(5)))
        assert await batcher.submit_many(list(range(4))) == list(range(4))
    finally:
        await batcher.close()
