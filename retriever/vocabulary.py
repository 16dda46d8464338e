"""The retriever's vocabulary: the names, value types, on-disk format and errors that the
collection orchestrator (retriever/index.py) and the vector stores (retriever/stores/) share. A
leaf: it imports nothing of rankd's, so the stores need not import the orchestrator that calls
them."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

# Where `rankd serve`, `rankd index build` and `rankd quantize` look for collections by default.
DEFAULT_INDEX_DIR = Path("./rankd-index")
MANIFEST = "manifest.json"
# Milvus Lite keeps a database in a directory whose name must end so (Milvus Lite 3); no
# collection is named so, so that the database can live inside the index directory.
MILVUS_LITE_SUFFIX = ".db"
INDEX_FILE = "index.faiss"
ENTRIES_FILE = "entries.jsonl"
FORMAT_VERSION = 1

class IndexIntegrityError(RuntimeError):
    """A collection directory is missing, damaged or built for another embedder."""


class CollectionUnavailableError(IndexIntegrityError):
    """A collection's store cannot be reached or answered with an error (a Milvus server down,
    its collection dropped); the message says which and what to check."""


class IndexKind(StrEnum):
    FLAT = "flat"
    HNSW = "hnsw"
    IVF = "ivf"


class StoreKind(StrEnum):
    """Where a collection's vectors, ids and texts live."""

    FAISS = "faiss"  # files in the collection directory, searched in process
    MILVUS = "milvus"  # a Milvus collection (Lite file, Standalone or Distributed server)


@dataclass(frozen=True)
class IndexSpec:
    """The index structure and its search breadth, recorded in the manifest."""

    kind: IndexKind = IndexKind.FLAT
    hnsw_m: int = 32
    ef_construction: int = 200
    ef_search: int = 128  # HNSW: candidates kept while searching
    ivf_lists: int | None = None  # IVF: lists; None picks ~4*sqrt(n)
    nprobe: int = 16  # IVF: lists visited per query

    def lists(self, count: int, most: int | None = None) -> int:
        """IVF lists for ``count`` vectors: ``ivf_lists``, else ~4*sqrt(n), FAISS's usual
        starting point, with the >= 39 training points per list that k-means needs."""
        if self.ivf_lists:
            return self.ivf_lists
        lists = max(1, min(int(4 * math.sqrt(count)), count // 39))
        return min(lists, most) if most else lists

    def search_params(self) -> dict[str, int]:
        if self.kind is IndexKind.HNSW:
            return {"ef": self.ef_search}
        if self.kind is IndexKind.IVF:
            return {"nprobe": self.nprobe}
        return {}


@dataclass(frozen=True)
class Hit:
    id: str
    text: str
    score: float
    metadata: dict[str, Any] = field(default_factory=dict)
    aliases: tuple[str, ...] = ()  # ids merged into this entry at build (--dedup)


@dataclass(frozen=True)
class Manifest:
    collection: str
    embedder: str
    dimension: int
    count: int
    index_kind: str
    created_at: str
    instruction: str | None
    files: dict[str, str]
    metric: str = "inner_product"
    format_version: int = FORMAT_VERSION
    backend: str = StoreKind.FAISS.value
    # Search breadth ({"ef": N} or {"nprobe": N}); empty: the defaults of IndexSpec.
    search_params: dict[str, int] = field(default_factory=dict)
    # What the backend needs to find the collection again (Milvus: uri, alias, collection).
    location: dict[str, Any] = field(default_factory=dict)
    # The embedder's runtime (retriever/encoders.py): int8 vectors differ from float32 ones.
    embedder_variant: str = "torch"
    # Catalogue hygiene at build (retriever/hygiene.py): the settings and the counts.
    cleaning: dict[str, Any] = field(default_factory=dict)
    # The embedder's weights (retriever.embedder.weights_digest) when it was read from a local
    # directory: the same weights under another path still serve the collection.
    embedder_sha256: str | None = None

    @classmethod
    def read(cls, directory: Path) -> Manifest:
        path = directory / MANIFEST
        if not path.is_file():
            raise IndexIntegrityError(
                f"{path} is missing: {directory} is not a complete collection; rebuild it with "
                "`rankd index build`"
            )
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
            return cls(**raw)
        except (json.JSONDecodeError, TypeError) as exc:
            raise IndexIntegrityError(
                f"{path} is not a valid rankd manifest ({exc}); rebuild with `rankd index build`"
            ) from exc

    def rebuild_hint(self, directory: Path) -> str:
        return (f"rebuild it with `rankd index build --collection {self.collection} ...` "
                f"into {directory.parent}")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class StoreTarget:
    """Where a store other than FAISS files lives, and how to reach it (Milvus: a Lite file
    path or a server URI, and a token)."""

    uri: str | None = None
    token: str | None = None
