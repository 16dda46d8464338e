"""FAISS: the vectors in ``index.faiss`` and the entries in ``entries.jsonl`` beside the
manifest, searched in process."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from retriever.catalog import CatalogEntry
from retriever.embedder import Embedder
from retriever.stores.base import BuiltStore
from retriever.vocabulary import (
    ENTRIES_FILE,
    INDEX_FILE,
    MANIFEST,
    Hit,
    IndexIntegrityError,
    IndexKind,
    IndexSpec,
    Manifest,
    StoreTarget,
)


def make_index(spec: IndexSpec, vectors: np.ndarray) -> Any:
    """A FAISS inner-product index of ``spec.kind`` holding ``vectors``."""
    dim = vectors.shape[1]
    index: Any
    if spec.kind is IndexKind.FLAT:
        index = faiss.IndexFlatIP(dim)
    elif spec.kind is IndexKind.HNSW:
        index = faiss.IndexHNSWFlat(dim, spec.hnsw_m, faiss.METRIC_INNER_PRODUCT)
    else:
        n_lists = spec.lists(len(vectors))
        quantizer = faiss.IndexFlatIP(dim)
        index = faiss.IndexIVFFlat(quantizer, dim, n_lists, faiss.METRIC_INNER_PRODUCT)
        index.train(vectors)
    index.add(vectors)
    return index


class FaissBuilder:
    def __init__(self, staging: Path, spec: IndexSpec) -> None:
        self.staging = staging
        self.spec = spec
        self.entries: list[CatalogEntry] = []
        self.vectors: list[np.ndarray] = []

    def add_entries(self, entries: list[CatalogEntry], embedder: Embedder,
                    show_progress: bool) -> None:
        self.add_vectors(entries, embedder.encode([e.text for e in entries],
                                                  show_progress=show_progress))

    def add_vectors(self, entries: list[CatalogEntry], vectors: np.ndarray) -> None:
        self.entries += entries
        self.vectors.append(vectors)

    def finish(self) -> BuiltStore:
        vectors = self.vectors[0] if len(self.vectors) == 1 else np.concatenate(self.vectors)
        index = make_index(self.spec, vectors)
        faiss.write_index(index, str(self.staging / INDEX_FILE))
        with (self.staging / ENTRIES_FILE).open("w", encoding="utf-8") as fh:
            for entry in self.entries:
                fh.write(json.dumps(asdict(entry), ensure_ascii=False, default=str) + "\n")
        return BuiltStore(files=[INDEX_FILE, ENTRIES_FILE])

    def publish(self) -> None:
        """The caller's directory rename publishes FAISS files."""

    def abort(self) -> None:
        """The staging directory holds everything; the caller removes it."""

    def retire_previous(self) -> None:
        """The caller's swap removed the previous directory."""


class FaissStore:
    def __init__(self, index: Any, entries: list[CatalogEntry]) -> None:
        self.index = index
        self._entries = entries

    def search(self, vectors: np.ndarray, k: int) -> list[list[Hit]]:
        scores, ids = self.index.search(vectors, k)
        results: list[list[Hit]] = []
        for row_scores, row_ids in zip(scores, ids, strict=True):
            hits = []
            for score, idx in zip(row_scores, row_ids, strict=True):
                if idx < 0:  # approximate indexes may return fewer than k
                    continue
                entry = self._entries[idx]
                hits.append(Hit(entry.id, entry.text, float(score), entry.metadata))
            results.append(hits)
        return results

    def health(self) -> str | None:
        return None

    def entries(self) -> list[CatalogEntry]:
        return self._entries

    def close(self) -> None:
        """Nothing is held open: the index lives in memory."""


class FaissBackend:
    def builder(self, staging: Path, collection: str, dimension: int, spec: IndexSpec,
                target: StoreTarget) -> FaissBuilder:
        return FaissBuilder(staging, spec)

    def open(self, directory: Path, manifest: Manifest, target: StoreTarget) -> FaissStore:
        rebuild = manifest.rebuild_hint(directory)
        for name in (INDEX_FILE, ENTRIES_FILE):
            if name not in manifest.files:
                raise IndexIntegrityError(
                    f"{directory / MANIFEST} lists no checksum for {name}; {rebuild}")
        index: Any = faiss.read_index(str(directory / INDEX_FILE))
        if index.ntotal != manifest.count or index.d != manifest.dimension:
            raise IndexIntegrityError(
                f"{directory / INDEX_FILE} holds {index.ntotal} vectors of dimension {index.d}, "
                f"the manifest says {manifest.count} of {manifest.dimension}; {rebuild}"
            )
        defaults = IndexSpec()
        if manifest.index_kind == IndexKind.HNSW:
            index.hnsw.efSearch = manifest.search_params.get("ef", defaults.ef_search)
        elif manifest.index_kind == IndexKind.IVF:
            index.nprobe = manifest.search_params.get("nprobe", defaults.nprobe)
        entries = []
        with (directory / ENTRIES_FILE).open(encoding="utf-8") as fh:
            for line in fh:
                raw = json.loads(line)
                entries.append(CatalogEntry(raw["id"], raw["text"], raw.get("metadata") or {}))
        if len(entries) != manifest.count:
            raise IndexIntegrityError(
                f"{directory / ENTRIES_FILE} holds {len(entries)} entries, the manifest says "
                f"{manifest.count}; {rebuild}"
            )
        return FaissStore(index, entries)
