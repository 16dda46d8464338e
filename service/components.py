"""Everything the app loads at start-up, and how it is started and closed."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from reranker import NO_RERANKER, ListwiseScorer, RerankerConfig, RerankerConfigError
from reranker.backends import Batcher
from retriever import Collection, Embedder, IndexIntegrityError, load_collection
from retriever.index import Hit, collection_dirs
from retriever.search import Retriever, SearchQuery
from service.batching import MemoryRelease, MicroBatcher
from service.memory import release_freed_memory
from service.metrics import Metrics
from service.settings import OnIndexError, Settings

log = logging.getLogger(__name__)


def reranker_config(settings: Settings) -> RerankerConfig:
    return RerankerConfig(
        model=settings.reranker_model,
        device=settings.reranker_device,
        dtype=settings.reranker_dtype,
        vllm_url=settings.vllm_url,
        vllm_model_name=settings.vllm_model_name,
        timeout_s=settings.rerank_timeout_s,
        retries=settings.rerank_retries,
        label_alphabet=settings.label_alphabet,
        use_chat_template=settings.rerank_chat_template,
        max_batch_size=settings.rerank_batch_size,
        batch_wait_ms=settings.batch_wait_ms,
        max_queue_depth=settings.max_queue_depth,
        rank_template=settings.rerank_prompt_template,
        default_orders=settings.rerank_orders,
        cache_dir=settings.model_cache_dir,
        threads=settings.reranker_threads or settings.torch_threads,
    )


@dataclass
class Components:
    settings: Settings
    metrics: Metrics
    embedder: Embedder
    collections: dict[str, Collection]
    collection_errors: dict[str, str]
    retriever: Retriever
    search_batcher: MicroBatcher[SearchQuery, list[Hit]]
    scorer: ListwiseScorer | None
    batchers: list[Batcher] = field(default_factory=list)

    @classmethod
    async def start(cls, settings: Settings, metrics: Metrics) -> Components:
        if settings.torch_threads:
            import torch

            torch.set_num_threads(settings.torch_threads)
        # The micro-batch (up to RANKD_EMBED_BATCH_SIZE queries) is encoded in length-sorted
        # chunks: one chunk padded to its longest query costs far more per query at high load.
        embedder = await asyncio.to_thread(
            Embedder.load, settings.embedder_model, settings.device, settings.embed_chunk_size
        )
        collections, errors = await asyncio.to_thread(load_all, settings, embedder)
        batchers: list[Batcher] = []

        def make_batcher(stage: str, fn: Callable[[list[Any]], Sequence[Any]]) -> Batcher:
            size = settings.embed_batch_size if stage == "search" else settings.rerank_batch_size
            batcher: MicroBatcher[Any, Any] = MicroBatcher(
                stage, fn, max_batch_size=size, max_wait_ms=settings.batch_wait_ms,
                max_queue_depth=settings.max_queue_depth, observer=metrics,
                memory_release=MemoryRelease(release_freed_memory,
                                             every_batches=settings.memory_release_batches,
                                             idle_s=settings.memory_release_idle_s),
            )
            batchers.append(batcher)
            return batcher

        retriever = Retriever(embedder, collections)
        search_batcher = make_batcher("search", retriever.search)
        assert isinstance(search_batcher, MicroBatcher)
        await search_batcher.start()
        scorer = None
        if settings.reranker_backend == NO_RERANKER:
            log.warning("no reranker configured (RANKD_RERANKER_BACKEND=none): serving retrieval "
                        "order only")
        else:
            try:
                labels = len(settings.label_alphabet.labels())
                if settings.default_candidates > labels:
                    raise RerankerConfigError(
                        f"RANKD_DEFAULT_CANDIDATES ({settings.default_candidates}) exceeds the "
                        f"{labels} labels of RANKD_LABEL_ALPHABET={settings.label_alphabet}; "
                        "lower it or choose a larger alphabet")
                scorer = await ListwiseScorer.create(settings.reranker_backend,
                                                     reranker_config(settings), make_batcher)
            except BaseException:
                await search_batcher.close()  # start-up refused: leave no worker behind
                raise
        return cls(settings, metrics, embedder, collections, errors, retriever, search_batcher,
                   scorer, batchers)

    async def close(self) -> None:
        await self.search_batcher.close()
        if self.scorer is not None:
            await self.scorer.close()


def load_all(settings: Settings, embedder: Embedder) -> tuple[dict[str, Collection], dict[str, str]]:
    """Load every collection; a damaged one stops start-up or is skipped, as configured."""
    collections: dict[str, Collection] = {}
    errors: dict[str, str] = {}
    directories = collection_dirs(settings.index_dir)
    if not directories:
        log.error("no collections under RANKD_INDEX_DIR=%s; build one with `rankd index build`",
                  settings.index_dir)
    for directory in directories:
        try:
            collection = load_collection(directory, embedder.name, embedder.dimension)
        except IndexIntegrityError as exc:
            if settings.on_index_error is OnIndexError.FAIL:
                raise
            log.error("skipping collection %s: %s", directory.name, exc)
            errors[directory.name] = str(exc)
            continue
        collections[collection.name] = collection
        log.info("collection %s: %d entries, embedder %s", collection.name, len(collection),
                 collection.manifest.embedder)
    return collections, errors
