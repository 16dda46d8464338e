"""How far the int8 reranker is from float32, on Eedi, in one run on the same candidates.

Each Eedi query (a seeded sample of ``--limit``) gets its top ``--candidates`` from the MiniLM
retriever over the catalogue (exact FAISS), then two scorers over the same model score them in
the default two orders: float32 and int8 (RANKD_RERANKER_QUANTIZATION), both with prefix
sharing, alternating query by query. Reported: top-1 agreement, the mean Spearman correlation of
the candidates' scores, MAP@25 of retrieval alone, of each reranker alone (fusion none) and fused
with the retrieval order as the service does by default (rrf, weight 0.9), and each scorer's
median rerank latency.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/int8_agreement.py --data ../shared/data/eedi \\
        --limit 300

A benchmark, not a test: run it on a quiet machine (the load average is printed).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from clients.evaluate import average_precision
from reranker import DEFAULT_RANK_TEMPLATE, ListwiseScorer, ListwiseTask, RerankerConfig
from reranker.fusion import Fusion, Scores, fuse

EEDI_INSTRUCTION = ("A student answered a maths question incorrectly. Choose the misconception "
                    "that explains the incorrect answer.")


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    ra = np.argsort(np.argsort(-np.asarray(a)))
    rb = np.argsort(np.argsort(-np.asarray(b)))
    if np.std(ra) == 0 or np.std(rb) == 0:
        return 1.0
    return float(np.corrcoef(ra, rb)[0, 1])


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    from retriever import Embedder, read_catalog
    from retriever.eedi import eedi_queries

    data: Path = args.data
    entries = read_catalog(data / "misconception_mapping.csv", "MisconceptionId",
                           "MisconceptionName")
    queries = eedi_queries(data / "train.csv")
    queries = random.Random(args.seed).sample(queries, min(args.limit, len(queries)))
    embedder = Embedder.load("default", device="cpu")
    catalogue = embedder.encode([e.text for e in entries])
    similarity = embedder.encode([q.text for q in queries]) @ catalogue.T
    scorers = {q: await ListwiseScorer.create(RerankerConfig(
        model=args.model, quantization=q, batch_wait_ms=0.0)) for q in ("none", "int8")}
    aps: dict[str, list[float]] = {"retrieval": [], "float32": [], "int8": [],
                                   "float32 rrf 0.9": [], "int8 rrf 0.9": []}
    top1, correlations = [], []
    latency: dict[str, list[float]] = {"none": [], "int8": []}
    try:
        for n, (query, row) in enumerate(zip(queries, similarity, strict=True)):
            ranked = row.argsort()[::-1]
            head = ranked[: args.candidates]
            ids = [entries[i].id for i in ranked[:25]]
            relevant = [query.misconception_id or ""]
            aps["retrieval"].append(average_precision(ids, relevant, 25))
            task = ListwiseTask(DEFAULT_RANK_TEMPLATE,
                                {"instruction": EEDI_INSTRUCTION, "query": query.text},
                                [entries[i].text for i in head], [entries[i].id for i in head])
            probabilities = {}
            for q in (("none", "int8") if n % 2 == 0 else ("int8", "none")):
                started = time.perf_counter()
                (scored,) = await scorers[q].score([task])
                latency[q].append(time.perf_counter() - started)
                probabilities[q] = scored.probabilities
            retrieval_scores = [float(row[i]) for i in head]
            tail = ids[args.candidates:]
            for q, name in (("none", "float32"), ("int8", "int8")):
                evidence = Scores(probabilities[q], probabilities[q])
                for label, final in ((name, probabilities[q]),
                                     (f"{name} rrf 0.9", fuse(retrieval_scores, evidence,
                                                              Fusion.RRF, 0.9).scores)):
                    order = np.argsort(-np.asarray(final), kind="stable")
                    aps[label].append(average_precision(
                        [task.item_ids[i] for i in order] + tail, relevant, 25))
            a, b = probabilities["none"], probabilities["int8"]
            top1.append(int(np.argmax(a)) == int(np.argmax(b)))
            correlations.append(spearman(a, b))
    finally:
        for scorer in scorers.values():
            await scorer.close()
    return {"model": args.model, "queries": len(queries), "candidates": args.candidates,
            "map@25": {k: round(statistics.fmean(v), 4) for k, v in aps.items()},
            "top1_agreement": round(statistics.fmean(top1), 4),
            "spearman_mean": round(statistics.fmean(correlations), 4),
            "median_rerank_ms": {("float32" if k == "none" else k):
                                 round(statistics.median(v) * 1000, 1)
                                 for k, v in latency.items()}}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data/eedi"))
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--candidates", type=int, default=10)
    parser.add_argument("--limit", type=int, default=300, help="queries")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(f"load average {os.getloadavg()[0]:.2f}", flush=True)
    report = asyncio.run(main_async(args))
    report["load_average_after"] = os.getloadavg()[0]
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
