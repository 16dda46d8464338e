"""Vector stores behind a collection, chosen by the manifest's ``backend`` through a registry.

A store holds a collection's vectors, ids, texts and metadata and answers top-k inner-product
searches. ``faiss`` keeps them in files beside the manifest and searches in process; ``milvus``
keeps them in a Milvus collection, which Milvus Lite (one local file), Milvus Standalone and
Milvus Distributed serve through the same client, so only the URI differs.
"""

from __future__ import annotations

from retriever.stores.base import BuiltStore, StoreBackend, StoreBuilder, VectorStore
from retriever.vocabulary import CollectionUnavailableError, StoreKind


def _faiss() -> StoreBackend:
    from retriever.stores.faiss_store import FaissBackend

    return FaissBackend()


def _milvus() -> StoreBackend:
    try:
        import pymilvus  # noqa: F401

        from retriever.stores.milvus_store import MilvusBackend
    except ImportError:
        raise CollectionUnavailableError(
            "Milvus collections need pymilvus: pip install 'rankd[milvus]'") from None
    return MilvusBackend()


STORES = {StoreKind.FAISS: _faiss, StoreKind.MILVUS: _milvus}


def store_backend(kind: StoreKind) -> StoreBackend:
    return STORES[kind]()


__all__ = ["STORES", "BuiltStore", "StoreBackend", "StoreBuilder", "VectorStore",
           "store_backend"]
