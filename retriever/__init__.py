"""First stage of rankd: sentence-transformers embeddings searched in a FAISS index.

A library: nothing here knows about HTTP.
"""

from retriever.catalog import CatalogEntry, CatalogFormat, read_catalog
from retriever.embedder import DEFAULT_EMBEDDER, Embedder, EmbedderLoadError
from retriever.index import (
    Collection,
    Hit,
    IndexIntegrityError,
    IndexKind,
    Manifest,
    build_collection,
    load_collection,
    load_collections,
)

__all__ = [
    "DEFAULT_EMBEDDER",
    "CatalogEntry",
    "CatalogFormat",
    "Collection",
    "Embedder",
    "EmbedderLoadError",
    "Hit",
    "IndexIntegrityError",
    "IndexKind",
    "Manifest",
    "build_collection",
    "load_collection",
    "load_collections",
    "read_catalog",
]
