"""Helpers for the reranker library's tests: real scorers on the tiny LM, real catalogue texts."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence
from typing import Any

import pytest

from reranker import DEFAULT_RANK_TEMPLATE, ListwiseScorer, ListwiseTask, RerankerConfig
from retriever.catalog import CatalogEntry
from retriever.data import sample_entries


@pytest.fixture(scope="session")
def catalogue() -> list[CatalogEntry]:
    return sample_entries()


def make_task(entries: Sequence[CatalogEntry], query: str) -> ListwiseTask:
    return ListwiseTask(template=DEFAULT_RANK_TEMPLATE,
                        fields={"instruction": "Choose the misconception.", "query": query},
                        items=[e.text for e in entries], item_ids=[e.id for e in entries])


@contextlib.asynccontextmanager
async def open_scorer(backend: str, **config: Any) -> AsyncIterator[ListwiseScorer]:
    """A started ListwiseScorer; an in-process backend runs its own micro-batcher. float32
    unless a test says otherwise, so figures compared across backends do not depend on whether
    this CPU has native bf16 (what dtype=auto chooses is tested on its own)."""
    config.setdefault("dtype", "float32")
    scorer = await ListwiseScorer.create(RerankerConfig(backend=backend, **config))
    try:
        yield scorer
    finally:
        await scorer.close()
