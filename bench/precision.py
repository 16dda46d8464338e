"""The reranker in bfloat16 and int8 against float32, on Eedi, in one run on the same candidates.

What ``RANKD_RERANKER_DTYPE=auto`` chooses is decided by this bench: bfloat16 where the CPU has
AMX-BF16 or AVX512-BF16, float32 elsewhere (reranker/precision.py).

Each Eedi query (a seeded sample of ``--limit``) gets its top ``--candidates`` from the MiniLM
retriever over the catalogue (exact FAISS); then one scorer per variant scores them in the
default two orders, with prefix sharing, the variants taking turns query by query so that load
falls on all alike. The variants: float32 (the reference), bfloat16 (RANKD_RERANKER_DTYPE),
int8 (RANKD_RERANKER_QUANTIZATION, from float32 weights), bfloat16 with passes of at most 512
tokens of work (the cap before issue 30, which split most queries' two orders), and pointwise scoring in float32 and
bfloat16 (one prompt per candidate, beside listwise's two orders). Reported per variant: the
median time of one rerank (one query: both orders, or one prompt per candidate); for the
listwise ones, top-1 agreement with float32, the mean Spearman correlation of the candidates'
scores with float32's, the largest probability difference; for all,
MAP@25 of the reranker alone (fusion none) and under the service's default fusion; MAP@25 of
retrieval alone beside them. The host's CPU, its bf16 flags, the torch threads and the load
average are printed with the figures.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/precision.py --data ../shared/data/eedi --limit 300

A benchmark, not a test: run it on a quiet machine.
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

from reranker import DEFAULT_RANK_TEMPLATE, ListwiseScorer, RerankerConfig
from reranker.fusion import DEFAULT_FUSION, DEFAULT_FUSION_WEIGHT, Fusion, fuse
from reranker.listwise import spearman
from reranker.precision import NATIVE_BF16_FLAGS, cpu_flags, cpu_model_name
from reranker.ranking import rank_task
from retriever.evaluation import average_precision
from retriever.vocabulary import Hit

EEDI_INSTRUCTION = ("A student answered a maths question incorrectly. Choose the misconception "
                    "that explains the incorrect answer.")
VARIANTS: dict[str, dict[str, Any]] = {
    "float32": {"dtype": "float32"},
    "bfloat16": {"dtype": "bfloat16"},
    # The cap before issue 30: most queries' two orders ran in separate passes, unshared.
    "bfloat16 512-token passes": {"dtype": "bfloat16", "batch_tokens": 512},
    "int8": {"dtype": "float32", "quantization": "int8"},
    # Pointwise beside listwise, in both dtypes: one prompt per candidate (yes/no).
    "float32 pointwise": {"dtype": "float32", "scoring": "pointwise"},
    "bfloat16 pointwise": {"dtype": "bfloat16", "scoring": "pointwise"},
}


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    import torch

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
    names = ["float32", *[v for v in args.variants if v != "float32"]]
    scorers = {name: await ListwiseScorer.create(RerankerConfig(
        model=args.model, batch_wait_ms=0.0, device="cpu", **VARIANTS[name])) for name in names}
    aps: dict[str, list[float]] = {"retrieval": []}
    for name in names:
        aps[name] = []
        aps[f"{name} {DEFAULT_FUSION}"] = []
    # Agreement with float32 is measured for the listwise variants (the same prompts).
    compared = [n for n in names[1:] if "pointwise" not in n]
    top1: dict[str, list[bool]] = {n: [] for n in compared}
    correlations: dict[str, list[float]] = {n: [] for n in compared}
    largest: dict[str, float] = dict.fromkeys(compared, 0.0)
    latency: dict[str, list[float]] = {n: [] for n in names}
    try:
        for n, (query, row) in enumerate(zip(queries, similarity, strict=True)):
            ranked = row.argsort()[::-1]
            head = ranked[: args.candidates]
            ids = [entries[i].id for i in ranked[:25]]
            relevant = [query.misconception_id or ""]
            aps["retrieval"].append(average_precision(ids, relevant, 25))
            task = rank_task(DEFAULT_RANK_TEMPLATE, EEDI_INSTRUCTION, query.text,
                             [Hit(entries[i].id, entries[i].text, float(row[i])) for i in head])
            scored = {}
            for name in names[n % len(names):] + names[: n % len(names)]:  # take turns
                started = time.perf_counter()
                (scored[name],) = await scorers[name].rank([task])
                latency[name].append(time.perf_counter() - started)
            retrieval_scores = [float(row[i]) for i in head]
            tail = ids[args.candidates:]
            for name, scores in scored.items():
                alone = fuse(retrieval_scores, scores, Fusion.NONE, 0.0).order
                fused = fuse(retrieval_scores, scores, DEFAULT_FUSION, DEFAULT_FUSION_WEIGHT)
                for label, order in ((name, alone), (f"{name} {DEFAULT_FUSION}", fused.order)):
                    aps[label].append(average_precision(
                        [task.item_ids[i] for i in order] + tail, relevant, 25))
            reference = scored["float32"].probabilities
            for name in compared:
                other = scored[name].probabilities
                top1[name].append(int(np.argmax(reference)) == int(np.argmax(other)))
                correlations[name].append(spearman(reference, other))
                largest[name] = max(largest[name], max(abs(a - b) for a, b in
                                                       zip(reference, other, strict=True)))
    finally:
        for scorer in scorers.values():
            await scorer.close()
    return {"model": args.model, "queries": len(queries), "candidates": args.candidates,
            "cpu": cpu_model_name(),
            "native_bf16_flags": sorted(f for f in NATIVE_BF16_FLAGS if f in cpu_flags()),
            "avx512f": "avx512f" in cpu_flags(), "torch_threads": torch.get_num_threads(),
            "map@25": {k: round(statistics.fmean(v), 4) for k, v in aps.items()},
            "top1_agreement_with_float32": {k: round(statistics.fmean(v), 4)
                                            for k, v in top1.items()},
            "spearman_with_float32": {k: round(statistics.fmean(v), 4)
                                      for k, v in correlations.items()},
            "largest_probability_difference": {k: round(v, 4) for k, v in largest.items()},
            "median_rerank_ms": {k: round(statistics.median(v) * 1000, 1)
                                 for k, v in latency.items()},
            "speed_against_float32": {k: round(statistics.median(latency["float32"])
                                               / statistics.median(v), 2)
                                      for k, v in latency.items()}}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data/eedi"))
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--candidates", type=int, default=10)
    parser.add_argument("--limit", type=int, default=300, help="queries")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS),
                        default=list(VARIANTS), help="float32 always runs, as the reference")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    load_before = os.getloadavg()
    report = asyncio.run(main_async(args))
    report["load_average_before"] = load_before
    report["load_average_after"] = os.getloadavg()
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
