"""Every fusion at every weight, judged on the same scored queries: how the default is chosen.

Reads the per-query dumps that bench/rerank_quality.py writes (``--dump``: each query's
retrieval order and its two orders' label probabilities, from the real app) and ranks each query
with the service's own ``order_evidence`` and ``fuse``, so a scheme here
is exactly what /rank would answer with that fusion and weight. No model runs: one dump per
model and retriever is scored once, and the sweep takes seconds.

Reported per dump: MAP@25 and recall@1/5 of retrieval alone, of the reranker alone (mean over
the orders, and each order's least probability), and of rrf, linear and consensus fusion at
each retrieval weight; for consensus also the mean agreement, the mean rerank weight and the
share of queries whose order the reranker changed.

    .venv/bin/python bench/fusion_sweep.py /tmp/embedded.jsonl /tmp/fine-tuned.jsonl
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

WEIGHTS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
MAP_K = 25


def read_dump(path: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    lines = path.read_text(encoding="utf-8").splitlines()
    header = json.loads(lines[0])["header"]
    return header, [json.loads(line) for line in lines[1:] if line.strip()]


def evidence(query: dict[str, Any], measure: str = "spearman") -> Any:
    """A query's scores as the scorer reads them, with the agreement ``measure``: spearman (the
    service's), least-sum (the rejected one), or spearman-mean (the service's agreement, the
    mean probability ranking instead of the least)."""
    from reranker.fusion import Scores
    from reranker.listwise import order_consensus, order_evidence

    n = len(query["head"])
    perms = [o["positions"] for o in query["orders"]]
    probs = [o["probabilities"] for o in query["orders"]]
    means, _, least, rho = order_evidence(n, perms, probs)
    least_sum = order_consensus(n, perms, probs)[1]
    if measure == "least-sum":
        return Scores(means, least, least_sum)
    return Scores(means, means if measure == "spearman-mean" else least, rho)


MEASURES = ("spearman", "spearman-mean", "least-sum")


def sweep(queries: Sequence[dict[str, Any]],
          weights: Sequence[float]) -> dict[str, dict[str, float]]:
    from reranker.fusion import Fusion, Scores, fuse
    from retriever.evaluation import average_precision, recall

    scored = [evidence(q) for q in queries]

    def judge(orders: list[list[int]], extra: dict[str, float] | None = None,
              ) -> dict[str, float]:
        ranked = [[q["head"][i] for i in order] + q["tail"] for q, order in
                  zip(queries, orders, strict=True)]
        out = {"MAP@25": statistics.fmean(average_precision(r, q["relevant"], MAP_K)
                                          for r, q in zip(ranked, queries, strict=True))}
        for k in (1, 5):
            out[f"recall@{k}"] = statistics.fmean(recall(r, q["relevant"], k)
                                                  for r, q in zip(ranked, queries, strict=True))
        return {**out, **(extra or {})}

    rows: dict[str, dict[str, float]] = {
        "retrieval only": judge([list(range(len(q["head"]))) for q in queries])}
    by_least = [Scores(s.consensus, s.consensus, s.agreement) for s in scored]
    for name, evidences in (("reranker alone (mean over orders)", scored),
                            ("reranker alone (least over orders)", by_least)):
        rows[name] = judge([fuse(q["retrieval_scores"], e, Fusion.NONE, 0).order
                            for q, e in zip(queries, evidences, strict=True)])
    variants = [(f.value, f, scored) for f in (Fusion.RRF, Fusion.LINEAR)]
    variants += [(f"consensus[{m}]", Fusion.CONSENSUS, [evidence(q, m) for q in queries])
                 for m in MEASURES]
    for name, fusion, evidences in variants:
        for w in weights:
            fused = [fuse(q["retrieval_scores"], e, fusion, w)
                     for q, e in zip(queries, evidences, strict=True)]
            extra = {"rerank weight": statistics.fmean(f.rerank_weight for f in fused),
                     "moved share": statistics.fmean(f.moved > 0 for f in fused)}
            rows[f"{name} w={w}"] = judge([f.order for f in fused], extra)
    for measure in ("spearman", "least-sum"):
        agreements = [evidence(q, measure).agreement for q in queries]
        known = [a for a in agreements if a is not None]
        if known:
            rows["retrieval only"][f"mean agreement ({measure})"] = statistics.fmean(known)
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dumps", nargs="+", help="bench/rerank_quality.py --dump files")
    parser.add_argument("--weights", type=float, nargs="*", default=list(WEIGHTS),
                        help="retrieval weights to try")
    parser.add_argument("--json", help="write every table here")
    parser.add_argument("--common", action="store_true",
                        help="score only the queries every dump holds (before/after runs of "
                             "different sizes)")
    args = parser.parse_args(argv)
    dumps = {path: read_dump(Path(path)) for path in args.dumps}
    if args.common:
        shared = set.intersection(*({q["id"] for q in queries} for _, queries in dumps.values()))
        dumps = {path: (header, [q for q in queries if q["id"] in shared])
                 for path, (header, queries) in dumps.items()}
    tables = {}
    for path, (header, queries) in dumps.items():
        rows = sweep(queries, args.weights)
        tables[path] = {"header": header, "rows": rows}
        print(f"\n{path}: {len(queries)} queries, {header['candidates']} candidates, reranker "
              f"{header['reranker']}, embedder {header['embedder']}")
        print("| ranking | MAP@25 | recall@1 | recall@5 | rerank weight | moved |")
        print("|---|---|---|---|---|---|")
        for name, m in rows.items():
            weight = f"{m['rerank weight']:.3f}" if "rerank weight" in m else ""
            moved = f"{m['moved share']:.2f}" if "moved share" in m else ""
            print(f"| {name} | {m['MAP@25']:.4f} | {m['recall@1']:.3f} | {m['recall@5']:.3f} | "
                  f"{weight} | {moved} |")
        for key, value in rows["retrieval only"].items():
            if key.startswith("mean agreement"):
                print(f"{key}: {value:.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(tables, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
