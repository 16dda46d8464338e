"""First stage of rankd: sentence-transformers embeddings searched in a FAISS index.

A library: nothing here knows about HTTP. Names are imported on first use, so that a reader of
catalogue or query files (``retriever.catalog``, ``retriever.eedi``) never loads faiss or torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from retriever.catalog import CatalogEntry, CatalogFormat, read_catalog
    from retriever.embedder import DEFAULT_EMBEDDER, Embedder, EmbedderLoadError
    from retriever.index import Collection, build_collection, load_collection
    from retriever.vocabulary import (
        CollectionUnavailableError,
        Hit,
        IndexIntegrityError,
        IndexKind,
        IndexSpec,
        Manifest,
        StoreKind,
        StoreTarget,
    )

_HOMES = {
    "CatalogEntry": "catalog", "CatalogFormat": "catalog", "read_catalog": "catalog",
    "DEFAULT_EMBEDDER": "embedder", "Embedder": "embedder", "EmbedderLoadError": "embedder",
    "Collection": "index", "build_collection": "index", "load_collection": "index",
    "CollectionUnavailableError": "vocabulary", "Hit": "vocabulary",
    "IndexIntegrityError": "vocabulary", "IndexKind": "vocabulary", "IndexSpec": "vocabulary",
    "Manifest": "vocabulary", "StoreKind": "vocabulary", "StoreTarget": "vocabulary",
}

__all__ = [
    "DEFAULT_EMBEDDER",
    "CatalogEntry",
    "CatalogFormat",
    "Collection",
    "CollectionUnavailableError",
    "Embedder",
    "EmbedderLoadError",
    "Hit",
    "IndexIntegrityError",
    "IndexKind",
    "IndexSpec",
    "Manifest",
    "StoreKind",
    "StoreTarget",
    "build_collection",
    "load_collection",
    "read_catalog",
]


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'retriever' has no attribute {name!r}")
    return getattr(importlib.import_module(f"retriever.{home}"), name)
