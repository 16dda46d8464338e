"""The one step from a query's retrieved hits to its reranked order: the rank task that /rank,
`rankd quantize`'s calibration, `rankd train-reranker` and the benchmarks build from the hits,
and the fused order of the hits from the scorer's answer."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from reranker.fusion import Fused, Fusion, RerankEvidence, fuse
from reranker.listwise import ListwiseTask
from retriever.vocabulary import Hit


def rank_task(template: str, instruction: str, query: str, hits: Sequence[Hit],
              orders: int | None = None, field_prefix: str = "") -> ListwiseTask:
    """The task that reranks ``hits`` for ``query``; errors name ``{field_prefix}query`` and the
    catalogue entry behind an item."""
    task = ListwiseTask.for_query(
        template, instruction, query, [h.text for h in hits], [h.id for h in hits], orders,
        [f"{field_prefix}candidates (catalogue entry {h.id})" for h in hits])
    return replace(task, prompt_field=f"{field_prefix}query")


def fused_order(hits: Sequence[Hit], scored: RerankEvidence, fusion: Fusion,
                weight: float) -> Fused:
    """The fused order of ``hits`` (the reranked head, in retrieval order; ``order`` indexes
    them) and the fusion's report."""
    return fuse([h.score for h in hits], scored, fusion, weight)
