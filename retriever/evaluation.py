"""How rankings are scored, in one place: ``rankd eval`` (clients/evaluate.py), both trainers and
the benchmarks use these functions, so that every MAP@25 in this project means the same.

Metrics, for one query with ranked ids ``p`` and relevant ids ``R``:

- AP@k, the competition's definition (Kaggle's ``apk``): walking the first ``k`` ids, each id in
  ``R`` that was not already seen earlier in the row adds (hits so far) / (its position); the sum
  is divided by min(|R|, k). With one relevant id it is 1/rank of that id in the top k, else 0.
  A repeated id keeps its position (it pushes later ids down) but scores only once.
- recall@k: the share of ``R`` found in the first ``k`` ids.
- nDCG@10: binary gains, DCG = sum of 1/log2(position + 1) over first occurrences of relevant
  ids in the top 10, divided by the DCG of an ideal row.

``summarize`` gives the mean figures of many queries, overall and split into *seen* queries (one
of whose relevant ids was a training positive) and *unseen* ones. ``paired_bootstrap`` says how
sure a gain of one ranking over another is, resampling whole questions (a question's queries
share its text and are not independent).
"""

from __future__ import annotations

import math
import random
from collections.abc import Collection, Mapping, Sequence

NDCG_K = 10

Ranking = Sequence[str]


def average_precision(ranked: Ranking, relevant: Sequence[str], k: int) -> float:
    if not relevant:
        return 0.0
    wanted = set(relevant)
    seen: set[str] = set()
    hits = 0
    score = 0.0
    for position, item in enumerate(ranked[:k], 1):
        if item in wanted and item not in seen:
            hits += 1
            score += hits / position
        seen.add(item)
    return score / min(len(wanted), k)


def recall(ranked: Ranking, relevant: Sequence[str], k: int) -> float:
    if not relevant:
        return 0.0
    wanted = set(relevant)
    return len(wanted.intersection(ranked[:k])) / len(wanted)


def ndcg(ranked: Ranking, relevant: Sequence[str], k: int = NDCG_K) -> float:
    wanted = set(relevant)
    if not wanted:
        return 0.0
    seen: set[str] = set()
    dcg = 0.0
    for position, item in enumerate(ranked[:k], 1):
        if item in wanted and item not in seen:
            dcg += 1.0 / math.log2(position + 1)
        seen.add(item)
    ideal = sum(1.0 / math.log2(position + 1) for position in range(1, min(len(wanted), k) + 1))
    return dcg / ideal



def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None  # JSON has no NaN


def summarize(ranked: Mapping[str, Ranking], relevant: Mapping[str, Collection[str]], k: int,
              seen: Collection[str] = ()) -> dict[str, float | int | None]:
    """MAP@k and recall@k of the queries of ``relevant`` (a missing ranking scores 0), overall
    and for the ``seen`` queries and the others."""
    rows = {key: (ranked.get(key, ()), sorted(ids)) for key, ids in relevant.items()}
    seen_keys = [key for key in rows if key in seen]
    unseen_keys = [key for key in rows if key not in seen]

    def map_of(keys: list[str]) -> float | None:
        return _mean([average_precision(*rows[key], k) for key in keys])

    return {"map": map_of(list(rows)), "map_seen": map_of(seen_keys),
            "map_unseen": map_of(unseen_keys),
            "recall": _mean([recall(*rows[key], k) for key in rows]),
            "recall_at_1": _mean([recall(*rows[key], 1) for key in rows]),
            "queries": len(rows), "seen": len(seen_keys), "unseen": len(unseen_keys)}


def average_precisions(ranked: Mapping[str, Ranking], relevant: Mapping[str, Collection[str]],
                       k: int) -> dict[str, float]:
    """AP@k of each query of ``relevant`` (a missing ranking scores 0)."""
    return {key: average_precision(ranked.get(key, ()), sorted(ids), k)
            for key, ids in relevant.items()}


def paired_bootstrap(after: Mapping[str, float], before: Mapping[str, float],
                     groups: Mapping[str, str], samples: int = 2000, seed: int = 0,
                     ) -> dict[str, float | int]:
    """The mean per-query gain ``after - before`` and its 95% interval, by a paired bootstrap
    over groups (questions): each sample draws as many groups as there are, with replacement,
    and takes the mean gain of their queries."""
    by_group: dict[str, list[float]] = {}
    for key, value in after.items():
        by_group.setdefault(groups[key], []).append(value - before[key])
    if not by_group:
        return {"gain": 0.0, "low": 0.0, "high": 0.0, "groups": 0, "samples": 0}
    sums = [(sum(gains), len(gains)) for gains in by_group.values()]
    total, count = sum(s for s, _ in sums), sum(n for _, n in sums)
    rng = random.Random(seed)
    means = []
    for _ in range(samples):
        drawn = [sums[rng.randrange(len(sums))] for _ in sums]
        means.append(sum(s for s, _ in drawn) / sum(n for _, n in drawn))
    means.sort()
    return {"gain": total / count, "low": means[int(0.025 * samples)],
            "high": means[min(samples - 1, int(0.975 * samples))], "groups": len(sums),
            "samples": samples}
