"""/health latency while a 1,000-document /v1/rerank runs: is the event loop free?

The real app (create_app, its lifespan, the ASGI routes, one event loop) with the tiny test LM
(rankd/devtools/tiny_lm.py) reranks 1,000 documents of 400 characters (39 windows, 78 prompts)
while ``/health`` is probed every 20 ms; each round prints the worst and the median probe.
Figures in docs/experiments.md, "The engine reshaping":

    HF_HUB_OFFLINE=1 .venv/bin/python bench/loop_free.py --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
QUERY = "Calculate 1/2 + 1/3. Incorrect answer: 2/5"


def documents(count: int, chars: int) -> list[str]:
    return [(f"Document {i}: believes that {i} divided by {i + 1} is {i % 7} remainder {i % 3}, "
             "and adds the numerators and the denominators of fractions. " * 8)[:chars]
            for i in range(count)]


async def probe(rounds: int, count: int, chars: int) -> None:
    import httpx

    from rankd.devtools.tiny_lm import build_tiny_lm
    from retriever import Embedder
    from retriever.sample import build_sample_collection
    from service.app import create_app
    from service.settings import Settings

    work = Path(tempfile.mkdtemp(prefix="rankd-loop-"))
    model = build_tiny_lm(work / "lm")
    build_sample_collection(Embedder.load("sentence-transformers/all-MiniLM-L6-v2"), work / "index")
    settings = Settings(index_dir=work / "index", embedder_device="cpu", max_body_bytes=16 * 2**20,
                        reranker={"backend": "transformers", "model": str(model)})
    app = create_app(settings)
    body = {"query": QUERY, "documents": documents(count, chars)}
    print(f"load average {os.getloadavg()[0]:.2f}; {count} documents of {chars} characters")
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://rankd.bench",
                                     timeout=600) as client:
            # The first request through a new app and client costs about 0.3 s of set-up
            # whatever it is; it is reported apart, not counted as a stall.
            started = time.perf_counter()
            await client.get("/health")
            print(f"first request: {(time.perf_counter() - started) * 1000:.0f} ms")
            for round_ in range(rounds):
                rerank = asyncio.create_task(client.post("/v1/rerank", json=body))
                latencies: list[float] = []
                while not rerank.done():
                    started = time.perf_counter()
                    await client.get("/health")
                    latencies.append(time.perf_counter() - started)
                    await asyncio.sleep(0.02)
                response = await rerank
                latencies.sort()
                print(f"round {round_}: /v1/rerank {response.status_code}, {len(latencies)} "
                      f"probes, worst {latencies[-1] * 1000:.1f} ms, median "
                      f"{latencies[len(latencies) // 2] * 1000:.1f} ms")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--documents", type=int, default=1000)
    parser.add_argument("--chars", type=int, default=400, help="characters per document")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(REPO))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    asyncio.run(probe(args.rounds, args.documents, args.chars))
    return 0


if __name__ == "__main__":
    sys.exit(main())
