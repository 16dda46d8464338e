"""Collections on disk: a FAISS index, its entries and a manifest that lets a load verify them."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import uuid
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from retriever.catalog import CatalogEntry
from retriever.embedder import Embedder

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
INDEX_FILE = "index.faiss"
ENTRIES_FILE = "entries.jsonl"
FORMAT_VERSION = 1
# Build and swap directories start with a dot so that loaders never mistake them for collections.
_STAGING_PREFIX = ".staging-"
_RETIRED_PREFIX = ".retired-"


class IndexIntegrityError(RuntimeError):
    """A collection directory is missing, damaged or built for another embedder."""


class IndexKind(StrEnum):
    FLAT = "flat"
    HNSW = "hnsw"
    IVF = "ivf"


@dataclass(frozen=True)
class Hit:
    id: str
    text: str
    score: float
    metadata: dict[str, Any] = field(default_factory=dict)


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


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _make_index(kind: IndexKind, vectors: np.ndarray, hnsw_m: int, ivf_lists: int | None) -> Any:
    dim = vectors.shape[1]
    index: Any
    if kind is IndexKind.FLAT:
        index = faiss.IndexFlatIP(dim)
    elif kind is IndexKind.HNSW:
        index = faiss.IndexHNSWFlat(dim, hnsw_m, faiss.METRIC_INNER_PRODUCT)
    else:
        # ~4*sqrt(n) lists is FAISS's usual starting point; training needs >= 39 points per list.
        n_lists = ivf_lists or max(1, min(int(4 * math.sqrt(len(vectors))), len(vectors) // 39))
        quantizer = faiss.IndexFlatIP(dim)
        index = faiss.IndexIVFFlat(quantizer, dim, n_lists, faiss.METRIC_INNER_PRODUCT)
        index.train(vectors)
    index.add(vectors)
    return index


def build_collection(
    entries: list[CatalogEntry],
    embedder: Embedder,
    index_dir: str | Path,
    collection: str,
    *,
    instruction: str | None = None,
    kind: IndexKind = IndexKind.FLAT,
    hnsw_m: int = 32,
    ivf_lists: int | None = None,
    show_progress: bool = True,
) -> Path:
    """Embed ``entries`` and write ``index_dir/collection`` atomically.

    Everything is written into a staging directory first and renamed into place at the end,
    so an interrupted build leaves the previous collection untouched.
    """
    if not collection or collection.startswith(".") or "/" in collection:
        raise ValueError(f"invalid collection name {collection!r}")
    root = Path(index_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / collection
    staging = root / f"{_STAGING_PREFIX}{collection}-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        vectors = embedder.encode([e.text for e in entries], show_progress=show_progress)
        index = _make_index(kind, vectors, hnsw_m, ivf_lists)
        faiss.write_index(index, str(staging / INDEX_FILE))
        with (staging / ENTRIES_FILE).open("w", encoding="utf-8") as fh:
            for entry in entries:
                fh.write(json.dumps(asdict(entry), ensure_ascii=False, default=str) + "\n")
        manifest = Manifest(
            collection=collection,
            embedder=embedder.name,
            dimension=embedder.dimension,
            count=len(entries),
            index_kind=kind.value,
            created_at=datetime.now(UTC).isoformat(timespec="seconds"),
            instruction=instruction,
            files={name: _sha256(staging / name) for name in (INDEX_FILE, ENTRIES_FILE)},
        )
        (staging / MANIFEST).write_text(json.dumps(asdict(manifest), indent=2), encoding="utf-8")
        _swap_into_place(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return final


def _swap_into_place(staging: Path, final: Path) -> None:
    retired = None
    if final.exists():
        retired = final.with_name(f"{_RETIRED_PREFIX}{final.name}-{uuid.uuid4().hex[:8]}")
        os.replace(final, retired)
    os.replace(staging, final)
    if retired is not None:
        shutil.rmtree(retired, ignore_errors=True)


class Collection:
    """A loaded, verified collection: FAISS index plus entries."""

    def __init__(self, directory: Path, manifest: Manifest, index: Any,
                 entries: list[CatalogEntry]) -> None:
        self.directory = directory
        self.manifest = manifest
        self.index = index
        self.entries = entries

    @property
    def name(self) -> str:
        return self.manifest.collection

    def __len__(self) -> int:
        return len(self.entries)

    def search(self, vectors: np.ndarray, k: int) -> list[list[Hit]]:
        """Top-``k`` hits for each row of ``vectors`` (unit vectors), best first."""
        k = min(k, len(self.entries))
        if k <= 0 or len(vectors) == 0:
            return [[] for _ in range(len(vectors))]
        scores, ids = self.index.search(np.ascontiguousarray(vectors, dtype=np.float32), k)
        results: list[list[Hit]] = []
        for row_scores, row_ids in zip(scores, ids, strict=True):
            hits = []
            for score, idx in zip(row_scores, row_ids, strict=True):
                if idx < 0:  # approximate indexes may return fewer than k
                    continue
                entry = self.entries[idx]
                hits.append(Hit(entry.id, entry.text, float(score), entry.metadata))
            results.append(hits)
        return results


def load_collection(directory: str | Path, embedder_name: str | None = None,
                    dimension: int | None = None, hnsw_ef_search: int = 128,
                    ivf_nprobe: int = 16) -> Collection:
    """Load and verify a collection; raise IndexIntegrityError naming the file and the fix."""
    directory = Path(directory)
    if not directory.is_dir():
        raise IndexIntegrityError(f"collection directory {directory} does not exist")
    manifest = Manifest.read(directory)
    rebuild = (f"rebuild it with `rankd index build --collection {manifest.collection} ...` "
               f"into {directory.parent}")
    for name in (INDEX_FILE, ENTRIES_FILE):
        path = directory / name
        if not path.is_file():
            raise IndexIntegrityError(f"{path} is missing; {rebuild}")
        expected = manifest.files.get(name)
        if expected is None or _sha256(path) != expected:
            raise IndexIntegrityError(
                f"{path} does not match the sha256 recorded in {directory / MANIFEST}: the file was "
                f"modified or truncated after the build; {rebuild}"
            )
    if embedder_name is not None and manifest.embedder != embedder_name:
        raise IndexIntegrityError(
            f"{directory / MANIFEST} says collection {manifest.collection!r} was built with embedder "
            f"{manifest.embedder!r}, but the configured embedder is {embedder_name!r}; set "
            f"RANKD_EMBEDDER_MODEL={manifest.embedder} or {rebuild} with --model {embedder_name}"
        )
    if dimension is not None and manifest.dimension != dimension:
        raise IndexIntegrityError(
            f"{directory / MANIFEST} records dimension {manifest.dimension}, the embedder gives "
            f"{dimension}; {rebuild}"
        )
    index: Any = faiss.read_index(str(directory / INDEX_FILE))
    if index.ntotal != manifest.count or index.d != manifest.dimension:
        raise IndexIntegrityError(
            f"{directory / INDEX_FILE} holds {index.ntotal} vectors of dimension {index.d}, the "
            f"manifest says {manifest.count} of {manifest.dimension}; {rebuild}"
        )
    if manifest.index_kind == IndexKind.HNSW:
        index.hnsw.efSearch = hnsw_ef_search
    elif manifest.index_kind == IndexKind.IVF:
        index.nprobe = ivf_nprobe
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
    return Collection(directory, manifest, index, entries)


def collection_dirs(index_dir: str | Path) -> list[Path]:
    """Collection directories under ``index_dir``, skipping staging and hidden ones."""
    root = Path(index_dir)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
