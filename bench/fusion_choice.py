"""How well a fusion chosen on part of validation carries over to the rest: choice rules judged
on random halvings of a `rankd train-reranker` run's validation scores.

`train-reranker` chooses its fusion on some validation questions and reports it on the others.
This bench reads both score files it writes (``fusion_scores.jsonl`` and
``validation_scores.jsonl``: each query's retrieval head, its relevant ids and the reranker's
scores), deals the questions, seeded and whole, into two halves ``--splits`` times, chooses on
one half and measures the gain over retrieval on the other. Rules: ``choose_fusion`` as
`train-reranker` runs it (each weight judged with its neighbours), the single best method and
weight on the choice half, and fixed fusions for reference. No model runs; it takes seconds.

    .venv/bin/python bench/fusion_choice.py ../runs/reranker-default --splits 300
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from reranker.fusion import Fusion  # noqa: E402
from reranker.listwise import ListwiseScores, order_evidence  # noqa: E402
from reranker.training.evaluate import (  # noqa: E402
    FUSION_WEIGHTS,
    EvalQuery,
    choose_fusion,
    ranked_ids,
)
from retriever.evaluation import average_precision  # noqa: E402
from retriever.vocabulary import Hit  # noqa: E402

K = 25


def read_run(run: Path, names: Sequence[str] = ("fusion_scores.jsonl", "validation_scores.jsonl"),
             ) -> list[tuple[EvalQuery, ListwiseScores]]:
    """The run's queries in the score files ``names`` (default: every validation query; a run
    with a test split reports its test questions in test_scores.jsonl, never read here unless
    named), with their scores as the scorer reported them."""
    found = []
    for name in names:
        if not (run / name).is_file():
            continue
        lines = (run / name).read_text(encoding="utf-8").splitlines()[1:]
        for row in map(json.loads, lines):
            hits = [Hit(i, "", s) for i, s in zip(row["head"], row["retrieval_scores"],
                                                  strict=True)]
            hits += [Hit(i, "", 0.0) for i in row["tail"]]
            orders = row["orders"]
            if all(len(o["positions"]) == 1 for o in orders):  # pointwise: P(yes) each
                yes = [o["probabilities"][0] for o in orders]
                scores = ListwiseScores(yes, [0.0] * len(yes), [], consensus=yes)
            else:
                perms = [o["positions"] for o in orders]
                means, spreads, least, rho = order_evidence(
                    len(row["head"]), perms, [o["probabilities"] for o in orders])
                scores = ListwiseScores(means, spreads, [], consensus=least, agreement=rho)
            found.append((EvalQuery(row["id"], "", frozenset(row["relevant"]), hits, False,
                                    row["group"]), scores))
    return found


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="a train-reranker output directory")
    parser.add_argument("--splits", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    rows = read_run(args.run)
    # The N the scores were read at, as the run wrote it.
    n = int(json.loads((args.run / "fusion_scores.jsonl").read_text(encoding="utf-8")
                       .splitlines()[0])["header"]["candidates"])
    methods = [Fusion.RRF, Fusion.LINEAR]
    if rows[0][1].agreement is not None:
        methods.append(Fusion.CONSENSUS)

    def ap(query: EvalQuery, scores: ListwiseScores, fusion: Fusion, weight: float) -> float:
        return average_precision(ranked_ids(query, scores, n, fusion, weight),
                                 sorted(query.relevant), K)

    # Every query's AP under every fusion, once.
    table = {(m, w): [ap(q, s, m, w) for q, s in rows] for m in methods for w in FUSION_WEIGHTS}
    retrieval = [average_precision([h.id for h in q.hits], sorted(q.relevant), K)
                 for q, _ in rows]

    def single_best(chosen: list[int]) -> tuple[Fusion, float]:
        return max(table, key=lambda key: (statistics.fmean(table[key][i] for i in chosen),
                                           key[1]))

    def smoothed(chosen: list[int]) -> tuple[Fusion, float]:
        choice = choose_fusion([rows[i][0] for i in chosen], [rows[i][1] for i in chosen], n, K,
                               methods)
        return choice.fusion, choice.weight

    def fixed(fusion: Fusion, weight: float) -> Callable[[list[int]], tuple[Fusion, float]]:
        return lambda _chosen: (fusion, weight)

    rules: dict[str, Callable[[list[int]], tuple[Fusion, float]]] = {
        "choose_fusion (smoothed, as train-reranker)": smoothed,
        "single best of the table": single_best,
        **{f"fixed {m.value} {w}": fixed(m, w)
           for m, w in ((Fusion.RRF, 0.5), (Fusion.RRF, 0.7), (Fusion.LINEAR, 0.5))}}
    groups = sorted({q.group for q, _ in rows})
    rng = random.Random(args.seed)
    gains: dict[str, list[float]] = {name: [] for name in rules}
    for _ in range(args.splits):
        rng.shuffle(groups)
        half = set(groups[: len(groups) // 2])
        chosen = [i for i, (q, _) in enumerate(rows) if q.group in half]
        held = [i for i, (q, _) in enumerate(rows) if q.group not in half]
        base = statistics.fmean(retrieval[i] for i in held)
        for name, rule in rules.items():
            key = rule(chosen)
            gains[name].append(statistics.fmean(table[key][i] for i in held) - base)
    best_all = max(table, key=lambda key: statistics.fmean(table[key]))
    report: dict[str, Any] = {
        "run": str(args.run), "queries": len(rows), "questions": len(groups),
        "splits": args.splits, "retrieval_map": round(statistics.fmean(retrieval), 4),
        "reranker_alone_map": round(statistics.fmean(table[(Fusion.RRF, 0.0)]), 4),
        "best_on_all": {"fusion": best_all[0].value, "weight": best_all[1],
                        "gain": round(statistics.fmean(table[best_all])
                                      - statistics.fmean(retrieval), 4)},
        "held_out_gain": {name: {"mean": round(statistics.fmean(v), 4),
                                 "sd": round(statistics.pstdev(v), 4)}
                          for name, v in gains.items()}}
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
