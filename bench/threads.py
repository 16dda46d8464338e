"""Torch thread counts for the embedder and the in-process reranker, under mixed load.

The embedded default runs both models in one process, each in its own worker thread. Torch's
intra-op threads are set per worker (OMP_NUM_THREADS (torch.set_num_threads here) for the embedder, RANKD_RERANKER_THREADS
for the reranker): with both at the core count, the two workers' OpenMP teams oversubscribe the
cores and each op waits for a descheduled thread.

For each setting, the real app (in process, ASGI) serves at once, for --seconds:
- one client sending reranked /rank requests (10 candidates, 2 orders) back to back;
- --retrieval-clients clients sending retrieval-only /rank requests back to back;
- a /health probe every 50 ms (the event loop's responsiveness).

Reported: rerank latency (median, p90), retrieval throughput, /health p99. Run on a quiet
machine (figures in docs/experiments.md, "Threads"):

    HF_HUB_OFFLINE=1 .venv/bin/python bench/threads.py
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# (OMP_NUM_THREADS, RANKD_RERANKER_THREADS); 0 is torch's default (the core count).
SETTINGS = [(0, 0), (1, 1), (1, 2)]


def _percentile(samples: Sequence[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def measure(index_dir: Path, torch_threads: int, reranker_threads: int, seconds: float,
                  retrieval_clients: int, queries: list[str]) -> dict[str, Any]:
    import httpx
    import torch

    from service.app import create_app
    from service.settings import load_settings

    if torch_threads:  # what OMP_NUM_THREADS does for a fresh process
        torch.set_num_threads(torch_threads)
    settings = load_settings(index_dir=index_dir, reranker={"threads": reranker_threads})
    app = create_app(settings)
    rerank_ms: list[float] = []
    retrieved = 0
    health_ms: list[float] = []
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://rankd.bench",
                                     timeout=120) as client:
            # Warm both models first.
            await client.post("/rank", json={"query": queries[0], "candidates": 10})
            deadline = time.perf_counter() + seconds

            async def reranking() -> None:
                i = 0
                while time.perf_counter() < deadline:
                    started = time.perf_counter()
                    response = await client.post("/rank", json={
                        "query": queries[i % len(queries)], "top_k": 10, "candidates": 10})
                    assert response.json()["reranked"], response.text
                    rerank_ms.append((time.perf_counter() - started) * 1000)
                    i += 1

            async def retrieving(offset: int) -> None:
                nonlocal retrieved
                i = offset
                while time.perf_counter() < deadline:
                    response = await client.post("/rank", json={
                        "query": queries[i % len(queries)], "rerank": False})
                    assert response.status_code == 200
                    retrieved += 1
                    i += 7

            async def probing() -> None:
                while time.perf_counter() < deadline:
                    started = time.perf_counter()
                    await client.get("/health")
                    health_ms.append((time.perf_counter() - started) * 1000)
                    await asyncio.sleep(0.05)

            await asyncio.gather(reranking(), probing(),
                                 *(retrieving(k) for k in range(retrieval_clients)))
    return {"torch_threads": torch_threads or os.cpu_count(),
            "reranker_threads": reranker_threads or torch_threads or os.cpu_count(),
            "rerank_median_ms": round(statistics.median(rerank_ms), 1),
            "rerank_p90_ms": round(_percentile(rerank_ms, 0.9), 1),
            "reranks": len(rerank_ms),
            "retrieval_qps": round(retrieved / seconds, 1),
            "health_p99_ms": round(_percentile(health_ms, 0.99), 1)}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=40)
    parser.add_argument("--retrieval-clients", type=int, default=4)
    parser.add_argument("--index-dir", default="/tmp/rankd-bench-threads-index")
    args = parser.parse_args(argv)

    from clients.queries import sample_queries
    from retriever import Embedder
    from retriever.sample import build_sample_collection

    index_dir = Path(args.index_dir)
    if not (index_dir / "misconceptions").is_dir():
        build_sample_collection(Embedder.load("sentence-transformers/all-MiniLM-L6-v2"),
                                index_dir)
    queries = [q.text for q in sample_queries()]
    print(f"load average before: {os.getloadavg()}")
    print("| torch threads (embedder) | reranker threads | rerank median ms | p90 ms | reranks "
          "| retrieval q/s | /health p99 ms |\n|---|---|---|---|---|---|---|")
    for torch_threads, reranker_threads in SETTINGS:
        row = asyncio.run(measure(index_dir, torch_threads, reranker_threads, args.seconds,
                                  args.retrieval_clients, queries))
        print(f"| {row['torch_threads']} | {row['reranker_threads']} | "
              f"{row['rerank_median_ms']} | {row['rerank_p90_ms']} | {row['reranks']} | "
              f"{row['retrieval_qps']} | {row['health_p99_ms']} |", flush=True)
    print(f"load average after: {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
