"""What prefix sharing and int8 save: the cost of 2 and k orders over 1, with and without
prefix sharing, and one two-order rerank with both prefix sharing and int8, on the real model
(the embedded SmolLM2-135M-Instruct, or --model), in one run.

Each round takes one Eedi query and its top ``--candidates`` from the MiniLM retriever, and
scores it with ``ListwiseScorer.score`` (one backend call) in 1, 2 and ``--k`` orders, on two
float32 scorers over the same model (prefix sharing on and off), and in 2 orders on an int8
scorer with prefix sharing. The seven calls of a round run in a rotating order, so every
configuration sees the same machine load. It prints the median latency
of each, the ratios k orders / 1 order, shared / unshared, and the prompt's token counts
(shared prefix and per-order suffix).

    HF_HUB_OFFLINE=1 .venv/bin/python bench/prefix_sharing.py --data ../shared/data/eedi

A benchmark, not a test: run it on a quiet machine (the load average is printed).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from reranker import DEFAULT_RANK_TEMPLATE, ListwiseScorer, ListwiseTask, RerankerConfig
from reranker.backends.transformers_backend import shared_prefix_groups


def candidates(data: Path | None, rounds: int, k: int, seed: int) -> list[ListwiseTask]:
    import random

    from rankd.devtools.catalogues import catalogue_and_queries
    from retriever import Embedder
    from retriever.data import SAMPLE_INSTRUCTION

    embedder = Embedder.load("default", device="cpu")
    entries, queries = catalogue_and_queries(data)
    picked = random.Random(seed).sample(queries, min(rounds, len(queries)))
    catalogue = embedder.encode([e.text for e in entries])
    scores = embedder.encode(picked) @ catalogue.T
    tasks = []
    for query, row in zip(picked, scores, strict=True):
        top = row.argsort()[::-1][:k]
        tasks.append(ListwiseTask(DEFAULT_RANK_TEMPLATE,
                                  {"instruction": SAMPLE_INSTRUCTION, "query": query},
                                  [entries[i].text for i in top], [entries[i].id for i in top]))
    return tasks


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    tasks = candidates(args.data, args.rounds + args.warmup, args.candidates, args.seed)
    base = {"model": args.model, "batch_wait_ms": 0.0, "threads": args.threads}
    scorers = {(q, sharing): await ListwiseScorer.create(
                   RerankerConfig(prefix_sharing=sharing, quantization=q, **base))
               for q, sharing in (("none", True), ("none", False), ("int8", True))}
    schemes = [1, 2, args.k]
    configs = [("none", sharing, orders) for orders in schemes for sharing in (True, False)]
    configs.append(("int8", True, 2))  # the CPU path with both: one rerank, two orders
    samples: dict[tuple[str, bool, int], list[float]] = {c: [] for c in configs}
    prompt_tokens: list[int] = []
    shared_tokens: list[int] = []
    try:
        for round_no, task in enumerate(tasks):
            rotation = configs[round_no % len(configs):] + configs[: round_no % len(configs)]
            for quantization, sharing, orders in rotation:
                one = ListwiseTask(task.template, task.fields, task.items, task.item_ids,
                                   orders=orders)
                started = time.perf_counter()
                (scored,) = await scorers[(quantization, sharing)].score([one])
                elapsed = time.perf_counter() - started
                if round_no >= args.warmup:
                    samples[(quantization, sharing, orders)].append(elapsed)
                if (quantization, sharing, orders) == ("none", True, 2) \
                        and round_no >= args.warmup:
                    renderer = scorers[("none", True)].renderer
                    ids = [renderer.render(one.template, one.fields,
                                           [one.items[p] for p in o.positions],
                                           o.labels).token_ids for o in scored.orders]
                    (length, _), = shared_prefix_groups(ids)
                    prompt_tokens.append(len(ids[0]))
                    shared_tokens.append(length)
    finally:
        for scorer in scorers.values():
            await scorer.close()
    def median(config: tuple[str, bool, int]) -> float:
        return statistics.median(samples[config])

    medians = {f"{'int8 ' if q == 'int8' else ''}{'shared' if s else 'unshared'} orders={o}":
               round(median((q, s, o)) * 1000, 1) for q, s, o in configs}
    ratios = {}
    for sharing in (True, False):
        name = "shared" if sharing else "unshared"
        for orders in schemes[1:]:
            ratios[f"{name}: {orders} orders / 1"] = round(
                median(("none", sharing, orders)) / median(("none", sharing, 1)), 3)
    for orders in schemes:
        ratios[f"orders={orders}: shared / unshared"] = round(
            median(("none", True, orders)) / median(("none", False, orders)), 3)
    ratios["orders=2: int8 shared / float32 unshared"] = round(
        median(("int8", True, 2)) / median(("none", False, 2)), 3)
    return {"model": args.model, "candidates": args.candidates, "rounds": args.rounds,
            "threads": args.threads or os.cpu_count(),
            "prompt_tokens_median": statistics.median(prompt_tokens),
            "shared_prefix_tokens_median": statistics.median(shared_tokens),
            "median_ms": medians, "ratios": ratios}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--data", type=Path, help="Eedi data directory (default: the sample)")
    parser.add_argument("--candidates", type=int, default=10)
    parser.add_argument("--k", type=int, default=4, help="the rotation scheme measured")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: the default)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(f"load average {os.getloadavg()[0]:.2f}", flush=True)
    report = asyncio.run(main_async(args))
    report["load_average_after"] = os.getloadavg()[0]
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
