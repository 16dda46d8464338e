"""Evaluation of a reranker on validation queries, as /rank orders them, and the fusion choice.

Scores come from ``ListwiseScorer.rank`` over a ``TransformersBackend``, in pieces the
backend's queue holds (``rank_in_pieces``), and rankings from ``fused_order``: exactly the
/rank path, so `rankd serve` with the written model and `rankd eval` on ``validation.csv``
reproduce the reported figures. The fusion is chosen on validation queries of its own
(``choose_fusion``), never on the reported ones.
"""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from reranker.backends.transformers_backend import LoadedModel, TransformersBackend
from reranker.config import Scoring
from reranker.fusion import Fusion
from reranker.listwise import ListwiseScores
from reranker.ranking import fused_order
from reranker.training.config import RerankerTrainingConfig
from reranker.training.examples import PromptBuilder
from retriever.evaluation import average_precisions, paired_bootstrap, summarize

if TYPE_CHECKING:
    from retriever.vocabulary import Hit

# Retrieval weights tried for each fusion method (1.0: retrieval order alone).
FUSION_WEIGHTS = tuple(round(0.05 * i, 2) for i in range(21))
# A weight is judged by the mean MAP of the weights this close to it, in its method: on 300
# queries neighbouring weights differ by noise, and the single best of 42 is partly that noise
# (bench/fusion_choice.py: on held-out halves of validation the smoothed choice did as well or
# better, with less spread; docs/fine-tuning.md).
FUSION_SMOOTHING = 0.1


@dataclass(frozen=True)
class EvalQuery:
    key: str
    text: str
    relevant: frozenset[str]
    hits: list[Hit]  # the top-k retrieval, best first
    seen: bool
    group: str = ""  # the question: queries of one question are resampled together


def ranked_ids(query: EvalQuery, scored: ListwiseScores, n: int, fusion: Fusion,
               weight: float) -> list[str]:
    """A query's ranking as /rank returns it: the top N reranked and fused, the rest after."""
    head = query.hits[:n]
    order = fused_order(head, scored, fusion, weight).order
    return [head[i].id for i in order] + [h.id for h in query.hits[n:]]


def _rounded(figures: Mapping[str, Any]) -> dict[str, Any]:
    return {key: round(value, 4) if isinstance(value, float) else value
            for key, value in figures.items()}


def mean_average_precision(ranked: Mapping[str, list[str]], queries: Sequence[EvalQuery],
                           k: int) -> dict[str, Any]:
    """MAP@k, recall@k and recall@1 of ``queries``, overall, seen and unseen."""
    return _rounded(summarize(ranked, {q.key: q.relevant for q in queries}, k,
                              {q.key for q in queries if q.seen}))


def fusions_for(scoring: Scoring, orders: int) -> list[Fusion]:
    """The fusion methods a model can be served with: consensus only where several orders can
    agree or not (listwise, two or more orders); it equals rrf otherwise."""
    methods = [Fusion.RRF, Fusion.LINEAR]
    if scoring is Scoring.LISTWISE and orders > 1:
        methods.append(Fusion.CONSENSUS)
    return methods


@dataclass(frozen=True)
class FusionChoice:
    """The fusion method and retrieval weight that served the choice queries best, and every
    figure behind it."""

    fusion: Fusion
    weight: float
    map: float
    retrieval_map: float
    reranker_alone_map: float
    queries: int
    table: dict[str, dict[str, float]] = field(default_factory=dict)  # method -> weight -> MAP
    # method -> weight -> the mean MAP of the weights within FUSION_SMOOTHING: what chooses.
    smoothed: dict[str, dict[str, float]] = field(default_factory=dict)

    def served(self) -> dict[str, Any]:
        """The fusion as rankd_reranker.json holds it."""
        return {"fusion": self.fusion.value, "fusion_weight": self.weight,
                "chosen_on": {"queries": self.queries, "map": self.map,
                              "retrieval_map": self.retrieval_map,
                              "reranker_alone_map": self.reranker_alone_map,
                              "best_by_method": {
                                  method: max(row.items(), key=lambda kv: kv[1])
                                  for method, row in self.table.items()}}}


def choose_fusion(queries: Sequence[EvalQuery], scores: Sequence[ListwiseScores], n: int,
                  k: int, methods: Iterable[Fusion]) -> FusionChoice:
    """The method and weight of the best MAP@k on ``queries``, each weight judged with its
    neighbours (``FUSION_SMOOTHING``); a tie goes to the larger retrieval weight, then to the
    method listed first."""
    relevant = {q.key: q.relevant for q in queries}

    def map_of(fusion: Fusion, weight: float) -> float:
        ranked = {q.key: ranked_ids(q, s, n, fusion, weight)
                  for q, s in zip(queries, scores, strict=True)}
        values = average_precisions(ranked, relevant, k)
        return sum(values.values()) / max(len(values), 1)

    raw = {method.value: {w: map_of(method, w) for w in FUSION_WEIGHTS} for method in methods}
    smoothed = {method: {w: statistics.fmean(v for other, v in row.items()
                                             if abs(other - w) <= FUSION_SMOOTHING + 1e-9)
                         for w in row}
                for method, row in raw.items()}
    best = max(((method, w, value) for method, row in smoothed.items()
                for w, value in row.items()),
               key=lambda t: (round(t[2], 6), t[1], -list(raw).index(t[0])))
    retrieval = {q.key: [h.id for h in q.hits] for q in queries}
    retrieval_map = sum(average_precisions(retrieval, relevant, k).values()) / max(len(queries),
                                                                                   1)

    def rounded(table: dict[str, dict[float, float]]) -> dict[str, dict[str, float]]:
        return {m: {f"{w:.2f}": round(v, 4) for w, v in row.items()} for m, row in table.items()}

    return FusionChoice(Fusion(best[0]), best[1], round(raw[best[0]][best[1]], 4),
                        round(retrieval_map, 4), round(map_of(Fusion.NONE, 0.0), 4),
                        len(queries), rounded(raw), rounded(smoothed))


# Halvings of the choice questions behind ``carried_gain``.
CARRIED_SPLITS = 10


def carried_gain(queries: Sequence[EvalQuery], scores: Sequence[ListwiseScores], n: int, k: int,
                 methods: Sequence[Fusion], seed: int,
                 splits: int = CARRIED_SPLITS) -> dict[str, Any]:
    """The gain over retrieval that a fusion chosen by ``choose_fusion`` carries to questions
    it was not chosen on: the choice questions dealt, seeded and whole, into two halves
    ``splits`` times; chosen on each half, measured on the other. Read on validation alone,
    it compares runs (arms) without touching the questions a run reports."""
    by_group: dict[str, list[int]] = {}
    for i, query in enumerate(queries):
        by_group.setdefault(query.group or query.key, []).append(i)
    groups = sorted(by_group)
    if len(groups) < 2:
        return {"gain": None, "splits": 0, "queries": len(queries)}
    rng = random.Random(seed)
    gains: list[float] = []
    for _ in range(splits):
        rng.shuffle(groups)
        halves = [groups[: len(groups) // 2], groups[len(groups) // 2:]]
        for chosen_on, measured_on in (halves, halves[::-1]):
            pick = [i for g in chosen_on for i in by_group[g]]
            rest = [i for g in measured_on for i in by_group[g]]
            choice = choose_fusion([queries[i] for i in pick], [scores[i] for i in pick], n, k,
                                   methods)
            relevant = {queries[i].key: queries[i].relevant for i in rest}
            fused = average_precisions({queries[i].key: ranked_ids(queries[i], scores[i], n,
                                                                   choice.fusion, choice.weight)
                                        for i in rest}, relevant, k)
            alone = average_precisions({queries[i].key: [h.id for h in queries[i].hits]
                                        for i in rest}, relevant, k)
            gains.append(statistics.fmean(fused.values()) - statistics.fmean(alone.values()))
    return {"gain": round(statistics.fmean(gains), 4), "sd": round(statistics.pstdev(gains), 4),
            "splits": splits, "queries": len(queries)}


class RerankEvaluator:
    """Validation queries scored in the served mode (listwise in the configured orders, or
    pointwise), and their figures under any fusion: the top N fused with the retrieval order,
    the rest in retrieval order."""

    def __init__(self, queries: Sequence[EvalQuery], builder: PromptBuilder,
                 config: RerankerTrainingConfig) -> None:
        self.queries = list(queries)
        self.builder = builder
        self.config = config
        self.seconds: list[float] = []

    def subset(self, limit: int) -> RerankEvaluator:
        """The first ``limit`` queries (already in a seeded order), for the learning curve."""
        return RerankEvaluator(self.queries[:limit] if limit else self.queries, self.builder,
                               self.config)

    def score(self, loaded: LoadedModel) -> list[ListwiseScores]:
        """Every query's scores, read as serving reads them, in pieces the queue holds."""
        started = time.perf_counter()
        # The per-call timeout is serving's; one piece of a bulk evaluation may take longer.
        reranker = self.config.reranker.model_copy(update={"backend": "transformers",
                                                           "timeout_s": 7 * 24 * 3600.0})
        scorer = self.builder.scorer(TransformersBackend(loaded, reranker))
        n = self.config.candidates
        tasks = [self.builder.task(q.text, q.hits[:n]) for q in self.queries]

        async def run() -> list[ListwiseScores]:
            await scorer.backend.start()
            try:
                return await scorer.rank_in_pieces(tasks, reranker.max_queue_depth)
            finally:
                await scorer.close()

        scores = asyncio.run(run())
        self.seconds.append(time.perf_counter() - started)
        return scores

    def ranked(self, scores: Sequence[ListwiseScores], fusion: Fusion,
               weight: float) -> dict[str, list[str]]:
        n = self.config.candidates
        return {q.key: ranked_ids(q, s, n, fusion, weight)
                for q, s in zip(self.queries, scores, strict=True)}

    def figures(self, scores: Sequence[ListwiseScores], fusion: Fusion,
                weight: float) -> dict[str, Any]:
        figures = mean_average_precision(self.ranked(scores, fusion, weight), self.queries,
                                         self.config.k)
        if fusion is not Fusion.NONE:
            figures["fusion_weight"] = weight
        return figures

    def gain(self, scores: Sequence[ListwiseScores], fusion: Fusion,
             weight: float) -> dict[str, Any]:
        """The fused ranking's MAP@k gain over retrieval alone, with its 95% interval by a
        paired bootstrap over questions."""
        relevant = {q.key: q.relevant for q in self.queries}
        after = average_precisions(self.ranked(scores, fusion, weight), relevant,
                                   self.config.k)
        before = average_precisions(self.retrieval_ranked(), relevant, self.config.k)
        return _rounded(paired_bootstrap(after, before, {q.key: q.group for q in self.queries},
                                         seed=self.config.seed))

    def agreement(self, scores: Sequence[ListwiseScores]) -> float | None:
        agreements = [s.agreement for s in scores if s.agreement is not None]
        return round(sum(agreements) / len(agreements), 4) if agreements else None

    def retrieval_ranked(self) -> dict[str, list[str]]:
        return {q.key: [h.id for h in q.hits] for q in self.queries}

    def retrieval_only(self) -> dict[str, Any]:
        return mean_average_precision(self.retrieval_ranked(), self.queries, self.config.k)

    def ceiling(self) -> dict[str, Any]:
        """What a perfect reranker of the top N would reach: the positive first wherever it is
        among the candidates, the rest unchanged."""
        n = self.config.candidates
        ranked = {}
        for q in self.queries:
            head = [h.id for h in q.hits[:n]]
            found = [i for i in head if i in q.relevant]
            ranked[q.key] = found + [i for i in head if i not in q.relevant] + \
                [h.id for h in q.hits[n:]]
        figures = mean_average_precision(ranked, self.queries, self.config.k)
        figures["positive_in_head_share"] = round(
            sum(any(h.id in q.relevant for h in q.hits[:n]) for q in self.queries)
            / max(len(self.queries), 1), 4)
        return figures

    def write_scores(self, path: Path, header: dict[str, Any],
                     scores: Sequence[ListwiseScores]) -> None:
        """``scores``, one query a line after a header, in the form bench/rerank_quality.py
        --dump writes: bench/fusion_sweep.py judges every fusion on them without running the
        model again."""
        n = self.config.candidates
        with path.open("w", encoding="utf-8") as out:
            out.write(json.dumps({"header": header}) + "\n")
            for query, scored in zip(self.queries, scores, strict=True):
                head = query.hits[:n]
                out.write(json.dumps({
                    "id": query.key, "group": query.group, "relevant": sorted(query.relevant),
                    "head": [h.id for h in head], "retrieval_scores": [h.score for h in head],
                    "tail": [h.id for h in query.hits[n:]],
                    "orders": [{"positions": o.positions, "probabilities": o.probabilities}
                               for o in scored.orders]}) + "\n")
