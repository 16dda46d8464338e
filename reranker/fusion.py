"""Fusing the reranker's scores with the retrieval order.

A small zero-shot reranker reads content weakly and positions strongly; on good candidates its
order alone can be worse than the retriever's (docs/benchmarks.md, "Rerank quality"). Fusion
keeps the retriever's evidence in the final order:

- ``rrf``: weighted reciprocal-rank fusion, ``w / (K + rank_retrieval) + (1 - w) / (K + rank_rerank)``
  with ``K = 60`` (Cormack et al.); at ``w = 0.5`` it orders exactly as plain RRF.
- ``linear``: ``w * z(retrieval score) + (1 - w) * z(rerank score)`` with z-scores taken over the
  reranked candidates, reported through a logistic so that scores lie in (0, 1) and stay above
  the 0 of the candidates that were not reranked.

``w`` is the retrieval's weight. Every function takes the candidates in retrieval order.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from enum import StrEnum

RRF_K = 60
# The retrieval's weight by default (RANKD_RERANK_FUSION_WEIGHT): measured on Eedi as the rrf
# weight at which the embedded model does not fall below retrieval alone.
DEFAULT_FUSION_WEIGHT = 0.9


class Fusion(StrEnum):
    NONE = "none"
    RRF = "rrf"
    LINEAR = "linear"


def _ranks(scores: Sequence[float]) -> list[int]:
    """1-based ranks by descending score; ties keep input (retrieval) order."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    ranks = [0] * len(scores)
    for rank, index in enumerate(order, 1):
        ranks[index] = rank
    return ranks


def _zscores(values: Sequence[float]) -> list[float]:
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
    return [(v - mean) / std if std > 0 else 0.0 for v in values]


def fuse(retrieval_scores: Sequence[float], rerank_scores: Sequence[float], fusion: Fusion,
         weight: float) -> list[float]:
    """The final score of each candidate (retrieval order in, same order out)."""
    if len(retrieval_scores) != len(rerank_scores):
        raise ValueError("retrieval and rerank scores differ in length")
    if not rerank_scores or fusion is Fusion.NONE:
        return list(rerank_scores)
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"fusion weight must be in [0, 1], got {weight}")
    if fusion is Fusion.RRF:
        retrieval_ranks = range(1, len(retrieval_scores) + 1)
        return [weight / (RRF_K + a) + (1 - weight) / (RRF_K + b)
                for a, b in zip(retrieval_ranks, _ranks(rerank_scores), strict=True)]
    fused = [weight * a + (1 - weight) * b
             for a, b in zip(_zscores(retrieval_scores), _zscores(rerank_scores), strict=True)]
    return [1.0 / (1.0 + math.exp(-x)) for x in fused]


def fused_order(retrieval_scores: Sequence[float], rerank_scores: Sequence[float],
                fusion: Fusion, weight: float) -> tuple[list[int], list[float]]:
    """The reranked candidates' order (indices into the retrieval order) and their final
    scores. The sort is stable: equal scores keep the retrieval order."""
    final = fuse(retrieval_scores, rerank_scores, fusion, weight)
    return sorted(range(len(final)), key=lambda i: -final[i]), final
