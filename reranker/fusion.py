"""Fusing the reranker's scores with the retrieval order.

``w`` is the retrieval's weight (RANKD_RERANKER_FUSION_WEIGHT); every function takes the
candidates in retrieval order.

- ``rrf``: weighted reciprocal-rank fusion, ``w / (K + a) + (1 - w) / (K + b)`` with ``a`` and
  ``b`` a candidate's retrieval and rerank ranks and ``K = 60`` (Cormack et al.); at ``w = 0.5``
  it orders exactly as plain RRF. Over a handful of candidates ``1 / (K + r)`` is nearly linear
  in ``r``, so the order is that of ``w * a + (1 - w) * b``: the reranker moves a candidate past
  its retrieval neighbour only when ``(1 - w) * (rank gain) > w``. At ``w = 0.9`` that needs a
  gain of 9 ranks, which 10 candidates cannot give: the reranker is silenced by construction.
- ``linear``: ``w * z(retrieval score) + (1 - w) * z(rerank score)`` with z-scores taken over the
  reranked candidates, reported through a logistic so that scores lie in (0, 1) and stay above
  the 0 of the candidates that were not reranked.
- ``consensus``: rrf whose rerank weight is ``(1 - w) * max(0, A)`` for each query, where
  ``A``, the orders' agreement, is the Spearman correlation of the candidates' probabilities
  between the orders (``ListwiseScores.agreement``). A model that reads content prefers the
  same candidates wherever they stand: ``A`` near 1, and the reranker acts with its full
  weight. A model that reads positions prefers whatever stands at one place, which the reversed
  order moves to the other end: ``A`` at or below 0, and retrieval order stays; so does it for
  a model whose preferences are noise. (The sum of each candidate's least probability over the
  orders was tried as the agreement and rejected: a model that spreads its probability evenly
  scores high on it while saying nothing; docs/reranker.md has the figures.) A single order
  cannot tell content from position and counts as ``A = 1``; pointwise scores have no position
  and count so too.
- ``none``: the rerank scores alone.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

RRF_K = 60
# The defaults (RANKD_RERANKER_FUSION, RANKD_RERANKER_FUSION_WEIGHT), chosen on Eedi with the
# embedded and a fine-tuned model (docs/reranker.md, "Fusion").
DEFAULT_FUSION_WEIGHT = 0.5


class Fusion(StrEnum):
    NONE = "none"
    RRF = "rrf"
    LINEAR = "linear"
    CONSENSUS = "consensus"


DEFAULT_FUSION = Fusion.CONSENSUS


class RerankEvidence(Protocol):
    """What the scorer read for one query (``reranker.listwise.ListwiseScores``)."""

    @property
    def probabilities(self) -> list[float]: ...  # the mean over the orders

    @property
    def consensus(self) -> list[float]: ...  # the least over the orders

    @property
    def agreement(self) -> float | None: ...


@dataclass(frozen=True)
class Fused:
    order: list[int]  # indices into the retrieval order, best first
    scores: list[float]  # the final score of each candidate, in retrieval order
    rerank_weight: float  # the reranker's share of this query's fused score
    agreement: float | None  # the orders' agreement, where several were read
    moved: int  # candidates whose rank differs from their retrieval rank


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


def _rrf(rerank_weight: float, rerank_scores: Sequence[float]) -> list[float]:
    return [(1 - rerank_weight) / (RRF_K + a) + rerank_weight / (RRF_K + b)
            for a, b in enumerate(_ranks(rerank_scores), 1)]


def fuse(retrieval_scores: Sequence[float], rerank: RerankEvidence, fusion: Fusion,
         weight: float) -> Fused:
    """The fused order and scores of one query's reranked candidates."""
    probabilities = rerank.probabilities
    n = len(retrieval_scores)
    if len(probabilities) != n:
        raise ValueError("retrieval and rerank scores differ in length")
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"fusion weight must be in [0, 1], got {weight}")
    agreement = rerank.agreement
    if not probabilities:
        final: list[float] = []
        rerank_weight = 0.0
    elif fusion is Fusion.NONE:
        final, rerank_weight = list(probabilities), 1.0
    elif fusion is Fusion.RRF:
        rerank_weight = 1 - weight
        final = _rrf(rerank_weight, probabilities)
    elif fusion is Fusion.CONSENSUS:
        rerank_weight = (1 - weight) * (1.0 if agreement is None else max(0.0, agreement))
        final = _rrf(rerank_weight, rerank.consensus or probabilities)
    else:
        rerank_weight = 1 - weight
        fused = [weight * a + rerank_weight * b for a, b in
                 zip(_zscores(retrieval_scores), _zscores(probabilities), strict=True)]
        final = [1.0 / (1.0 + math.exp(-x)) for x in fused]
    order = sorted(range(n), key=lambda i: -final[i])  # stable: ties keep retrieval order
    moved = sum(index != rank for rank, index in enumerate(order))
    return Fused(order, final, rerank_weight, agreement, moved)


@dataclass(frozen=True)
class Scores:
    """Rerank evidence given as plain lists (benchmarks, tests, stored scores)."""

    probabilities: list[float]
    consensus: list[float]
    agreement: float | None = None
