"""Catalogue hygiene measured: duplicates in the Eedi catalogue, MAP@25 with and without near
dedup (retrieval only and reranked), and the build time with and without it.

1. Duplicates in misconception_mapping.csv: exact (NFKC, case folding, whitespace) and near at
   each of ``--thresholds``, with the largest groups as examples.
2. MAP@25 on the Eedi queries (every labelled wrong answer of train.csv), retrieval only, against
   an index built with ``--dedup off`` and one with ``--dedup near`` at ``--threshold``; a label
   merged into another entry counts through its survivor (``rankd eval --aliases``).
3. The same with the reranker (the embedded SmolLM2, both orders, the top ``--candidates``) on a
   seeded subset of ``--rerank-queries`` queries, fused (rrf 0.9, the service's default) and not.
4. Build time: the Eedi catalogue (embedding included) and a ``--synthetic``-entry catalogue
   (noisy copies of the Eedi embeddings, as bench/scale.py makes them; vectors given, so the
   time is the cleaning and the index), each without and with near dedup.

    python bench/hygiene.py --data ../shared/data/eedi --json /tmp/hygiene.json

A benchmark, not a test: the times depend on the machine (the load average is printed).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True,
                        help="directory with misconception_mapping.csv and train.csv")
    parser.add_argument("--thresholds", type=_floats, default=[0.90, 0.95, 0.98])
    parser.add_argument("--threshold", type=float, default=0.95, help="near dedup for MAP")
    parser.add_argument("--rerank-queries", type=int, default=120)
    parser.add_argument("--candidates", type=int, default=10)
    parser.add_argument("--synthetic", type=int, default=100_000)
    parser.add_argument("--noise", type=float, default=0.02)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    from clients.evaluate import canonical_labels
    from retriever import Embedder, build_collection, load_collection, read_catalog
    from retriever.catalog import CatalogEntry
    from retriever.eedi import eedi_queries
    from retriever.evaluation import average_precision
    from retriever.hygiene import CleaningSpec, DedupMode, clean_catalog

    print(f"{os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.2f}", flush=True)
    entries = read_catalog(args.data / "misconception_mapping.csv", "MisconceptionId",
                           "MisconceptionName")
    queries = [q for q in eedi_queries(args.data / "train.csv") if q.misconception_id]
    embedder = Embedder.load("default", "cpu")
    vectors = embedder.encode([e.text for e in entries])
    lookup = {e.text: v for e, v in zip(entries, vectors, strict=True)}

    def embed(texts: list[str]) -> np.ndarray:
        return np.stack([lookup[t] for t in texts])

    results: dict[str, Any] = {"catalogue": len(entries), "queries": len(queries)}

    # 1. duplicates
    exact = clean_catalog(entries, CleaningSpec(dedup=DedupMode.EXACT))
    results["exact"] = exact.report.as_dict()
    print(f"\nexact duplicates: {exact.report.merged_exact} entries in "
          f"{len(exact.report.groups)} groups")
    for group in exact.report.groups[:3]:
        print(f"  {group['kept']['id']}: {group['kept']['text']!r} <- "
              + ", ".join(f"{m['id']}: {m['text']!r}" for m in group["merged"]))
    results["near"] = {}
    for threshold in args.thresholds:
        near = clean_catalog(entries, CleaningSpec(dedup=DedupMode.NEAR,
                                                   near_threshold=threshold), embed)
        results["near"][str(threshold)] = near.report.as_dict()
        print(f"\nnear at {threshold}: {near.report.merged_exact} exact + "
              f"{near.report.merged_near} near merged into {len(near.report.groups)} groups; "
              f"{near.report.entries_out} of {len(entries)} kept")
        for group in near.report.groups[:4]:
            print(f"  {group['kept']['id']}: {group['kept']['text']!r}")
            for m in group["merged"][:3]:
                print(f"      <- {m['id']} ({m['similarity']}): {m['text']!r}")

    # 2. and 3. MAP@25, off against near
    rng = random.Random(args.seed)
    subset = rng.sample(range(len(queries)), min(args.rerank_queries, len(queries)))
    query_vectors = embedder.encode([q.text for q in queries])
    maps: dict[str, Any] = {}
    scorer_parts = _reranker(args.candidates)
    with tempfile.TemporaryDirectory(prefix="rankd-hygiene-") as tmp:
        for mode in ("off", "near"):
            spec = CleaningSpec(dedup=DedupMode(mode), near_threshold=args.threshold)
            cleaned = clean_catalog(entries, spec, embed)
            kept_vectors = (cleaned.vectors if cleaned.vectors is not None
                            else embed([e.text for e in cleaned.entries]))
            collection = load_collection(build_collection(
                cleaned.entries, embedder, Path(tmp) / mode, "eedi", show_progress=False,
                vectors=kept_vectors, aliases=cleaned.aliases))
            labels = canonical_labels({q.id: [str(q.misconception_id)] for q in queries},
                                      cleaned.aliases)
            hits = collection.search(query_vectors, 25)
            retrieval = float(np.mean([average_precision([h.id for h in row], labels[q.id], 25)
                                       for q, row in zip(queries, hits, strict=True)]))
            reranked = scorer_parts([queries[i] for i in subset], [hits[i] for i in subset],
                                    labels)
            retrieval_subset = float(np.mean([average_precision(
                [h.id for h in hits[i]], labels[queries[i].id], 25) for i in subset]))
            maps[mode] = {"entries": len(cleaned.entries), "retrieval_map": round(retrieval, 4),
                          "subset_retrieval_map": round(retrieval_subset, 4), **reranked}
            print(f"\n{mode}: {len(cleaned.entries)} entries; MAP@25 retrieval {retrieval:.4f} "
                  f"(all {len(queries)} queries); on {len(subset)} queries: retrieval "
                  f"{retrieval_subset:.4f}, reranked {reranked}", flush=True)
    results["map"] = maps

    # 4. build time
    results["build_seconds"] = {}
    with tempfile.TemporaryDirectory(prefix="rankd-hygiene-") as tmp:
        for mode in ("off", "near"):
            spec = CleaningSpec(dedup=DedupMode(mode), near_threshold=args.threshold)
            started = time.perf_counter()
            cleaned = clean_catalog(entries, spec, embedder.encode)
            build_collection(cleaned.entries, embedder, Path(tmp) / f"eedi-{mode}", "eedi",
                             show_progress=False, vectors=cleaned.vectors,
                             aliases=cleaned.aliases)
            results["build_seconds"][f"eedi_{mode}"] = round(time.perf_counter() - started, 2)
        rng_np = np.random.default_rng(args.seed)
        picks = rng_np.integers(0, len(entries), args.synthetic)
        synthetic = vectors[picks] + rng_np.normal(0, args.noise, (args.synthetic,
                                                                   vectors.shape[1]))
        synthetic = (synthetic / np.linalg.norm(synthetic, axis=1, keepdims=True)).astype(
            np.float32)
        fake = [CatalogEntry(str(i), f"{entries[p].text} #{i}") for i, p in enumerate(picks)]
        by_text = {e.text: v for e, v in zip(fake, synthetic, strict=True)}
        for mode in ("off", "near"):
            spec = CleaningSpec(dedup=DedupMode(mode), near_threshold=args.threshold)
            started = time.perf_counter()
            cleaned = clean_catalog(fake, spec,
                                    lambda texts: np.stack([by_text[t] for t in texts]))
            kept = cleaned.vectors if cleaned.vectors is not None else synthetic
            build_collection(cleaned.entries, embedder, Path(tmp) / f"synthetic-{mode}", "s",
                             show_progress=False, vectors=kept, aliases=cleaned.aliases)
            seconds = time.perf_counter() - started
            results["build_seconds"][f"synthetic_{mode}"] = round(seconds, 2)
            results[f"synthetic_{mode}_merged"] = (cleaned.report.merged_exact
                                                   + cleaned.report.merged_near)
    print(f"\nbuild seconds: {results['build_seconds']}; synthetic merged at "
          f"{args.threshold}: {results.get('synthetic_near_merged')}; load average "
          f"{os.getloadavg()[0]:.2f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n",
                             encoding="utf-8")
    return 0


def _reranker(candidates: int) -> Any:
    """``score(queries, hits, labels)``: MAP@25 of the reranked lists, fused and not, through
    the trainer's evaluator (the /rank path)."""
    from reranker.backends.transformers_backend import TransformersBackend
    from reranker.config import RerankerConfig
    from reranker.fusion import DEFAULT_FUSION, DEFAULT_FUSION_WEIGHT, Fusion
    from reranker.models import resolve_model
    from reranker.prompt import load_tokenizer
    from reranker.training import EvalQuery, PromptBuilder, RerankerTrainingConfig, RerankEvaluator

    config = RerankerConfig(device="cpu")
    location = resolve_model(config.model or "", config.cache_dir)
    tokenizer = load_tokenizer(location)
    builder = PromptBuilder(tokenizer, config, config.instruction)
    loaded = TransformersBackend.load(config.model_copy(update={"model": location}), tokenizer)
    training = RerankerTrainingConfig(output_dir=Path("."), reranker=config,
                                      candidates=candidates)

    def score(queries: list[Any], hits: list[Any], labels: dict[str, list[str]]
              ) -> dict[str, Any]:
        evaluated = [EvalQuery(q.id, q.text, frozenset(labels[q.id]), list(row), False)
                     for q, row in zip(queries, hits, strict=True)]
        evaluator = RerankEvaluator(evaluated, builder, training)
        scores = evaluator.score(loaded)
        return {f"reranked_{fusion}": evaluator.figures(scores, fusion, DEFAULT_FUSION_WEIGHT)["map"]
                for fusion in (Fusion.NONE, DEFAULT_FUSION)}

    return score


if __name__ == "__main__":
    sys.exit(main())
