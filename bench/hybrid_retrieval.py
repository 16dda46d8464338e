"""Dense retrieval alone against dense + BM25 (or + a second embedder) fused by weighted RRF,
on the Eedi split.

The weight is chosen on the validation questions (which chose everything else: checkpoints,
arms), each weight judged with its neighbours as `train-reranker` judges fusion weights; the
test questions, which no choice saw, are scored only with ``--report-on test``, once, at the
end. BM25 is bm25s (English stop words, its default Lucene variant) over the catalogue texts;
the fusion is ``w / (60 + dense rank) + (1 - w) / (60 + BM25 rank)``. ``--fuse-with MODEL``
puts a second embedder's ranks where BM25's were: an ensemble of two retrievers.

    .venv/bin/python bench/hybrid_retrieval.py --data ../shared/data/eedi \
        --model ../runs/retriever-baseline [--model sentence-transformers/all-MiniLM-L6-v2] \
        [--fuse-with ../runs/retriever-mpnet] [--report-on test]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from retriever.catalog import read_catalog  # noqa: E402
from retriever.embedder import Embedder  # noqa: E402
from retriever.evaluation import average_precisions, paired_bootstrap, summarize  # noqa: E402
from retriever.pairs import Split, ValidationSet, read_pairs, split_pairs, validation_set  # noqa: E402

K = 25
RRF_K = 60
WEIGHTS = [round(0.05 * i, 2) for i in range(21)]  # the dense side's weight; 1.0: dense alone
SMOOTHING = 0.1


def _ranks(scores: np.ndarray) -> np.ndarray:
    """1-based rank of every catalogue entry per query (row), best first."""
    order = np.argsort(-scores, axis=1, kind="stable")
    ranks = np.empty_like(order)
    rows = np.arange(scores.shape[0])[:, None]
    ranks[rows, order] = np.arange(1, scores.shape[1] + 1)
    return ranks


def _ranked(scores: np.ndarray, keys: list[str], ids: list[str]) -> dict[str, list[str]]:
    top = np.argsort(-scores, axis=1, kind="stable")[:, :K]
    return {key: [ids[i] for i in row] for key, row in zip(keys, top.tolist(), strict=True)}


def _dense(model: str, texts: list[str], catalogue: list[str]) -> np.ndarray:
    embedder = Embedder.load(model, "cpu")
    docs = embedder.model.encode_document(catalogue, batch_size=64, normalize_embeddings=True)
    queries = embedder.model.encode_query(texts, batch_size=64, normalize_embeddings=True)
    return np.asarray(queries) @ np.asarray(docs).T


def _bm25(texts: list[str], catalogue: list[str]) -> np.ndarray:
    import bm25s

    index = bm25s.BM25()
    index.index(bm25s.tokenize(catalogue, stopwords="en", show_progress=False),
                show_progress=False)
    tokens = bm25s.tokenize(texts, stopwords="en", show_progress=False, return_ids=False)
    return np.stack([index.get_scores(query) for query in tokens])


def _fused(dense_ranks: np.ndarray, other_ranks: np.ndarray, weight: float) -> np.ndarray:
    return weight / (RRF_K + dense_ranks) + (1 - weight) / (RRF_K + other_ranks)


def _queries(split_set: ValidationSet) -> tuple[list[str], list[str]]:
    keys = sorted(split_set.queries)
    return keys, [split_set.queries[k] for k in keys]


def evaluate(model: str, sets: dict[str, ValidationSet], ids: list[str], catalogue: list[str],
             report_on_test: bool, fuse_with: str | None = None) -> dict[str, Any]:
    """``model``'s dense ranks fused with BM25's, or with ``fuse_with``'s dense ranks."""
    started = time.perf_counter()
    by_split: dict[str, Any] = {}
    for name, split_set in sets.items():
        keys, texts = _queries(split_set)
        dense = _dense(model, texts, catalogue)
        other = _dense(fuse_with, texts, catalogue) if fuse_with else _bm25(texts, catalogue)
        by_split[name] = (keys, _ranks(dense), _ranks(other))
    keys, dense_ranks, other_ranks = by_split["validation"]
    relevant = sets["validation"].relevant

    def map_at(weight: float) -> float:
        ranked = _ranked(_fused(dense_ranks, other_ranks, weight), keys, ids)
        return statistics.fmean(average_precisions(ranked, relevant, K).values())

    table = {w: map_at(w) for w in WEIGHTS}
    smoothed = {w: statistics.fmean(v for o, v in table.items() if abs(o - w) <= SMOOTHING + 1e-9)
                for w in WEIGHTS}
    chosen = max(WEIGHTS, key=lambda w: (round(smoothed[w], 6), w))
    result: dict[str, Any] = {
        "model": model, "fused_with": fuse_with or "bm25", "chosen_weight": chosen,
        "validation": {"queries": len(keys), "dense_alone": round(table[1.0], 4),
                       "other_alone": round(table[0.0], 4), "chosen": round(table[chosen], 4),
                       "table": {f"{w:.2f}": round(v, 4) for w, v in table.items()}}}
    if report_on_test:
        keys, dense_ranks, other_ranks = by_split["test"]
        test = sets["test"]
        dense_alone = _ranked(-dense_ranks.astype(float), keys, ids)
        hybrid = _ranked(_fused(dense_ranks, other_ranks, chosen), keys, ids)
        gain = paired_bootstrap(average_precisions(hybrid, test.relevant, K),
                                average_precisions(dense_alone, test.relevant, K),
                                test.groups)
        result["test"] = {
            "queries": len(keys),
            "dense_alone": summarize(dense_alone, test.relevant, K, test.seen),
            "other_alone": summarize(_ranked(-other_ranks.astype(float), keys, ids),
                                     test.relevant, K, test.seen),
            "hybrid": summarize(hybrid, test.relevant, K, test.seen),
            "gain": {k: round(v, 4) if isinstance(v, float) else v for k, v in gain.items()}}
    result["seconds"] = round(time.perf_counter() - started, 1)
    return result


def add_split_options(parser: argparse.ArgumentParser) -> None:
    """The data and the trainers' split, as both retrieval benches read them."""
    parser.add_argument("--data", type=Path, required=True,
                        help="folder with Eedi's train.csv and misconception_mapping.csv")
    parser.add_argument("--validation-fraction", type=float, default=0.2)
    parser.add_argument("--test-fraction", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=42)


def eedi_split(args: argparse.Namespace) -> tuple[list[str], list[str], Split]:
    """The catalogue's ids and texts, and the labelled pairs split as the trainers split them."""
    entries = read_catalog(args.data / "misconception_mapping.csv", "MisconceptionId",
                           "MisconceptionName")
    split = split_pairs(read_pairs(args.data / "train.csv", "eedi"), args.validation_fraction,
                        seed=args.seed, test_fraction=args.test_fraction)
    return [e.id for e in entries], [e.text for e in entries], split


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_split_options(parser)
    parser.add_argument("--model", action="append", required=True,
                        help="embedder (a model name or a train-retriever output); repeatable")
    parser.add_argument("--fuse-with", metavar="MODEL",
                        help="a second embedder whose ranks take BM25's place")
    parser.add_argument("--report-on", choices=["validation", "test"], default="validation",
                        help="test: also score the test questions, once, at the end")
    args = parser.parse_args(argv)
    ids, catalogue, split = eedi_split(args)
    sets = {"validation": validation_set(split),
            "test": validation_set(replace(split, validation=split.test))}
    if args.report_on != "test":
        del sets["test"]
    print(json.dumps({"host": platform.processor() or platform.machine(),
                      "validation_queries": len(sets["validation"].queries)}))
    for model in args.model:
        print(json.dumps(evaluate(model, sets, ids, catalogue, args.report_on == "test",
                                  args.fuse_with)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
