"""The retrieval stage behind the engine: what it has loaded, and a batched search.

``LocalRetrieval`` runs the embedder and the collections in this process behind the search
micro-batcher. The Ray Serve application (service/ray_app.py) puts the same object in a
deployment of its own and gives the engine a stage that calls it, so the engine does not know
where retrieval runs.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Protocol

from retriever import Collection, Embedder, IndexIntegrityError, Manifest
from retriever.index import collection_dirs, load_collection
from retriever.search import Retriever, SearchQuery
from retriever.vocabulary import Hit
from runtime.batching import BatchObserver, MicroBatcher, default_memory_release
from service.settings import OnIndexError, Settings

log = logging.getLogger(__name__)


class RetrievalStage(Protocol):
    embedder_name: str
    manifests: dict[str, Manifest]  # the collections loaded, by name
    errors: dict[str, str]  # collections that could not be loaded at start-up, and why

    async def search(self, queries: Sequence[SearchQuery]) -> list[list[Hit]]: ...

    async def health(self) -> dict[str, str | None]:
        """For each loaded collection, None while its store answers, else why not."""
        ...

    async def close(self) -> None: ...


class LocalRetrieval:
    def __init__(self, embedder: Embedder, collections: dict[str, Collection],
                 errors: dict[str, str], batcher: MicroBatcher[SearchQuery, list[Hit]]) -> None:
        self.embedder = embedder
        self.embedder_name = embedder.name
        self.collections = collections
        self.manifests = {name: c.manifest for name, c in collections.items()}
        self.errors = errors
        self.batcher = batcher

    @classmethod
    async def start(cls, settings: Settings, observer: BatchObserver | None = None
                    ) -> LocalRetrieval:
        # The micro-batch (up to RANKD_EMBEDDER_BATCH_SIZE queries) is encoded in length-sorted
        # chunks: one chunk padded to its longest query costs far more per query at high load.
        embedder = await asyncio.to_thread(
            Embedder.load, settings.embedder_model, settings.embedder_device, settings.embedder_chunk_size,
            settings.embedder_variant, settings.embedder_cache_dir)
        collections, errors = await asyncio.to_thread(load_all, settings, embedder)
        retriever = Retriever(embedder, collections)
        batcher: MicroBatcher[SearchQuery, list[Hit]] = MicroBatcher(
            "search", retriever.search, max_batch_size=settings.embedder_batch_size,
            max_wait_ms=settings.embedder_batch_wait_ms, max_queue_depth=settings.embedder_max_queue_depth,
            observer=observer, memory_release=default_memory_release())
        await batcher.start()
        return cls(embedder, collections, errors, batcher)

    async def search(self, queries: Sequence[SearchQuery]) -> list[list[Hit]]:
        return await self.batcher.submit_many(queries)

    async def health(self) -> dict[str, str | None]:
        def probe() -> dict[str, str | None]:
            return {name: c.health() for name, c in self.collections.items()}

        return await asyncio.to_thread(probe)

    async def close(self) -> None:
        await self.batcher.close()
        for collection in self.collections.values():
            collection.close()


def load_all(settings: Settings, embedder: Embedder) -> tuple[dict[str, Collection], dict[str, str]]:
    """Load every collection; a damaged or unreachable one stops start-up or is skipped, as
    configured."""
    collections: dict[str, Collection] = {}
    errors: dict[str, str] = {}
    directories = collection_dirs(settings.index_dir)
    if not directories:
        log.error("no collections under RANKD_INDEX_DIR=%s; build one with `rankd index build`",
                  settings.index_dir)
    target = settings.store_target
    for directory in directories:
        try:
            collection = load_collection(directory, embedder.name, embedder.dimension, target,
                                         embedder.variant, lambda: embedder.weights_sha256)
        except IndexIntegrityError as exc:
            if settings.on_index_error is OnIndexError.FAIL:
                for loaded in collections.values():
                    loaded.close()
                raise
            log.error("skipping collection %s: %s", directory.name, exc)
            errors[directory.name] = str(exc)
            continue
        collections[collection.name] = collection
        log.info("collection %s: %d entries, embedder %s, backend %s", collection.name,
                 len(collection), collection.manifest.embedder, collection.manifest.backend)
    return collections, errors
